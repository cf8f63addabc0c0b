"""The Redis store as users run it: `virtsvc serve --store redis://...` replicas (separate processes) sharing
one real redis-server (or a three-node Redis Cluster), driven over the wire."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from _redis import RedisServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from virtsvc.engine.redis_store import RedisStore, redact_url
from virtsvc.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30


def _scenario(directory: Path) -> Path:
    """A sequence of STEPS distinct replies (then FAILED_PRECONDITION) and a rule limited to 5 uses."""
    steps = "\n".join(f"      - reply: {{reservationId: r{i}}}" for i in range(STEPS))
    path = directory / "shared.yaml"
    path.write_text(
        "scenario: shared\n"
        "rules:\n"
        "  - method: shop.v1.Inventory/Reserve\n"
        "    sequence:\n"
        f"{steps}\n"
        "    after: fail\n"
        "  - method: shop.v1.Inventory/GetItem\n"
        "    times: 5\n"
        "    reply: {sku: limited}\n"
        "  - method: shop.v1.Inventory/GetItem\n"
        "    status: {code: RESOURCE_EXHAUSTED, message: used up}\n"
    )
    return path


def _replicas(spawn: Callable[..., Any], tmp_path: Path, url: str, n: int) -> list[Any]:
    scenario = _scenario(tmp_path)
    procs = [
        spawn("serve", "--protos", str(ROOT / "protos"), "--scenarios", str(scenario), "--port", "0",
              "--store", url)
        for _ in range(n)
    ]  # fmt: skip
    for proc in procs:
        proc.wait_serving()
    return procs


def _meta(session: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", "shared"), ("x-virtsvc-session", session))


def _drive_sequence(pb: SimpleNamespace, channels: list[grpc.Channel], sessions: list[str]) -> None:
    """Every session's STEPS + 4 calls, from 8 threads spread over the replicas: each step answered once."""
    stubs = [pb.inv_grpc.InventoryStub(c) for c in channels]

    def one(i: int, session: str) -> str:
        try:
            reply = stubs[i % len(stubs)].Reserve(
                pb.inv.ReserveRequest(sku="A"), metadata=_meta(session), timeout=20
            )
            return str(reply.reservation_id)
        except grpc.RpcError as err:
            return err.code().name

    jobs = [(i, s) for s in sessions for i in range(STEPS + 4)]
    with futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: (job[1], one(*job)), jobs))
    for session in sessions:
        got = sorted(a for s, a in answers if s == session)
        expected = sorted([f"r{i}" for i in range(STEPS)] + ["FAILED_PRECONDITION"] * 4)
        assert got == expected, session


def test_replicas_share_sequences_and_times_exactly(
    spawn: Callable[..., Any], tmp_path: Path, redis_url: str, pb: SimpleNamespace, channel_to: Any
) -> None:
    """Three replicas answering concurrent calls of four sessions: each sequence step is given exactly once
    (never skipped nor repeated) and a `times: 5` rule answers exactly five calls of a session in all."""
    procs = _replicas(spawn, tmp_path, redis_url, 3)
    assert procs[0].ready["store"] == redis_url
    channels = [channel_to(p.address) for p in procs]
    _drive_sequence(pb, channels, [f"s{i}" for i in range(4)])
    stubs = [pb.inv_grpc.InventoryStub(c) for c in channels]

    def get(i: int) -> str:
        try:
            stubs[i % 3].GetItem(pb.inv.GetItemRequest(sku="x"), metadata=_meta("t"), timeout=20)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    with futures.ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(get, range(12)))
    assert outcomes.count("OK") == 5
    assert outcomes.count("RESOURCE_EXHAUSTED") == 7


def test_replicas_share_sequences_on_a_cluster(
    spawn: Callable[..., Any], tmp_path: Path, redis_cluster_url: str, pb: SimpleNamespace, channel_to: Any
) -> None:
    """The same exactness on a three-node Redis Cluster (sessions' keys spread over its slots)."""
    procs = _replicas(spawn, tmp_path, redis_cluster_url, 2)
    channels = [channel_to(p.address) for p in procs]
    _drive_sequence(pb, channels, [f"c{i}" for i in range(3)])


def _health(channel: grpc.Channel) -> int:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)
    except grpc.RpcError:
        return -1


def _until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.1)


def test_redis_going_away_answers_unavailable_and_recovers(
    spawn: Callable[..., Any],
    tmp_path: Path,
    redis_server: RedisServer,
    pb: SimpleNamespace,
    channel_to: Any,
) -> None:
    """Redis stopped: calls answer UNAVAILABLE naming the store and health turns NOT_SERVING; Redis back on
    the same port: health SERVING and calls answered again, without a restart."""
    (proc,) = _replicas(spawn, tmp_path, redis_server.url, 1)
    channel = channel_to(proc.address)
    stub = pb.inv_grpc.InventoryStub(channel)
    assert (
        stub.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_meta("u"), timeout=10).reservation_id == "r0"
    )
    redis_server.stop()
    with pytest.raises(grpc.RpcError) as err:
        stub.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_meta("u"), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details().startswith(f"session store {redis_server.url} unreachable: ")
    _until(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
    redis_server.start()
    _until(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING, "SERVING again")
    # The restarted Redis kept nothing (no persistence): the session starts over, from Redis, not memory.
    reply = stub.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_meta("u"), timeout=10)
    assert reply.reservation_id == "r0"


def test_the_password_is_never_shown() -> None:
    """A password in the URL is replaced by *** in what the store and its errors say."""
    assert redact_url("redis://:s3cret@db.internal:6380/2") == "redis://***@db.internal:6380/2"
    assert redact_url("rediss://app:s3cret@[::1]:6380/0") == "rediss://***@[::1]:6380/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    with pytest.raises(ConfigError) as err:
        RedisStore("redis://:s3cret@127.0.0.1:1/0")
    assert str(err.value).startswith("session store redis://***@127.0.0.1:1/0 unreachable: ")
    assert "s3cret" not in str(err.value)


def test_session_rules_put_by_one_replica_are_compiled_by_another(redis_url: str, catalog: Any) -> None:
    """Rules a session got through one process's store are read, compiled and used by another's."""
    from virtsvc.engine.store import RuleSet
    from virtsvc.server import VirtualServer

    first, second = (VirtualServer(catalog, store=RedisStore(redis_url)) for _ in range(2))
    text = "rules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: own}\n"
    first.store.put_rules("shop", "a", first.compile_session_rules("shop", text))
    rules = second.store.session("shop", "a").rules
    assert isinstance(rules, RuleSet) and rules.source == text
    assert [r.method for r in rules.rules()] == ["shop.v1.Inventory/Reserve"]


def _in_process(catalog: Any, tmp_path: Path, url: str) -> Any:
    from virtsvc.scenarios import load_scenarios
    from virtsvc.server import VirtualServer

    return VirtualServer(
        catalog, load_scenarios([_scenario(tmp_path)], catalog), port=0, store=RedisStore(url)
    )


def test_connections_redis_closed_are_replaced_without_failing_a_call(
    catalog: Any, tmp_path: Path, redis_url: str, pb: SimpleNamespace, channel_to: Any
) -> None:
    """Redis closing every client connection (as a restart or a proxy's idle timeout does) fails no call:
    the next calls go on new connections, the sequence goes on where it was and every entry is journaled."""
    import redis

    with _in_process(catalog, tmp_path, redis_url) as srv:
        stub = pb.inv_grpc.InventoryStub(channel_to(srv.address))

        def reserve() -> str:
            reply = stub.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_meta("k"), timeout=10)
            return str(reply.reservation_id)

        assert [reserve() for _ in range(3)] == ["r0", "r1", "r2"]
        admin = redis.Redis.from_url(redis_url)
        try:
            killed = admin.client_kill_filter(_type="normal", skipme=True)
        finally:
            admin.close()
        assert killed >= 1
        assert [reserve() for _ in range(3)] == ["r3", "r4", "r5"]
        entries = srv.journal.entries(scenario="shared", session="k")
        assert [e.code for e in entries] == [grpc.StatusCode.OK] * 6


def test_a_step_moved_in_the_look_up_waits_for_the_session_s_own_rules(
    catalog: Any, tmp_path: Path, redis_url: str, pb: SimpleNamespace, channel_to: Any
) -> None:
    """The sequence step of a rule that answers every call moves in the session's look-up, but not while
    the session has rules of its own for the method: they answer, and the sequence goes on after them from
    where it was, no step skipped."""
    with _in_process(catalog, tmp_path, redis_url) as srv:
        stub = pb.inv_grpc.InventoryStub(channel_to(srv.address))

        def reserve() -> str:
            reply = stub.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_meta("own"), timeout=10)
            return str(reply.reservation_id)

        assert [reserve() for _ in range(2)] == ["r0", "r1"]
        text = "rules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: own}\n"
        srv.store.put_rules("shared", "own", srv.compile_session_rules("shared", text))
        assert [reserve() for _ in range(3)] == ["own"] * 3
        assert srv.store.clear_rules("shared", "own") == 1
        assert [reserve() for _ in range(2)] == ["r2", "r3"]
