"""The journal on Redis: separate replicas (real `virtsvc serve` processes) on one real redis-server (and
on a Redis Cluster) read each other's entries, watch each other's calls, keep the per-session cap and TTL,
and a replica killed with SIGKILL mid-run loses no entry of a call whose reply its client received."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import redis
from _redis import RedisServer
from _workers import Served
from google.protobuf import json_format
from test_redis_store import _meta, _scenario
from test_replicas import _serve

from virtsvc.admin import AdminClient


def _two(launch: Any, tmp_path: Path, url: str, *flags: str) -> list[Served]:
    scenario = _scenario(tmp_path)
    replicas = [_serve(launch, scenario, url, *flags) for _ in range(2)]
    for replica in replicas:
        replica.wait_for("serving")
    return replicas


def _reserve(pb: SimpleNamespace, channel: grpc.Channel, session: str) -> str:
    stub = pb.inv_grpc.InventoryStub(channel)
    return str(
        stub.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_meta(session), timeout=20).reservation_id
    )


def _journal(channel: grpc.Channel, session: str) -> list[Any]:
    return list(AdminClient(channel).call("GetJournal", scenario="shared", session=session).entries)


def _reply(entry: Any) -> str:
    return str(json_format.MessageToDict(entry.reply).get("reservationId"))


@pytest.mark.parametrize("redis_kind", ["server", "cluster"])
def test_replica_b_reads_and_watches_the_calls_replica_a_answered(
    launch: Any, tmp_path: Path, redis_kind: str, request: pytest.FixtureRequest, pb: SimpleNamespace
) -> None:
    """Calls answered by A are in B's GetJournal, in order with their replies, and B's WatchJournal hears
    A's calls as they finish; on one redis-server and on a three-node Redis Cluster."""
    url = request.getfixturevalue("redis_url" if redis_kind == "server" else "redis_cluster_url")
    a, b = _two(launch, tmp_path, url)
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        replies = [_reserve(pb, ca, "s1") for _ in range(3)]
        entries = _journal(cb, "s1")
        assert [e.method for e in entries] == ["shop.v1.Inventory/Reserve"] * 3
        assert [e.code for e in entries] == ["OK"] * 3
        assert [_reply(e) for e in entries] == replies
        heard: list[Any] = []
        watch = AdminClient(cb, timeout=None)
        calls = watch.watch(scenario="shared", session="s2")

        def read() -> None:
            try:
                for entry in calls:
                    heard.append(entry)
                    if len(heard) == 2:
                        calls.cancel()
            except grpc.RpcError:  # cancelled once two were heard
                return

        reader = threading.Thread(target=read)
        reader.start()
        try:
            # The watch is subscribed once its first message could arrive: calls go on until B hears two.
            sent = []
            for _ in range(40):
                sent.append(_reserve(pb, ca, "s2"))
                reader.join(0.25)
                if not reader.is_alive():
                    break
        finally:
            calls.cancel()
            reader.join(10)
        assert len(heard) == 2
        assert all(e.session == "s2" and e.method == "shop.v1.Inventory/Reserve" for e in heard)
        assert all(_reply(e) in sent for e in heard)


def test_the_journal_keeps_its_cap_and_the_session_ttl(
    launch: Any, tmp_path: Path, redis_server: RedisServer, pb: SimpleNamespace
) -> None:
    """--journal-size 5: GetJournal gives the newest five of eight calls; the stream is trimmed and expires
    with the session's TTL."""
    a, b = _two(launch, tmp_path, redis_server.url, "--journal-size", "5", "--session-ttl", "120")
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        replies = [_reserve(pb, ca, "capped") for _ in range(8)]
        entries = _journal(cb, "capped")
        assert len(entries) == 5
        assert [_reply(e) for e in entries] == replies[-5:]
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() for k in client.scan_iter(match="virtsvc:{shared|capped}:journal")]
        assert len(keys) == 1
        assert client.type(keys[0]) == b"stream"
        assert 5 <= client.xlen(keys[0]) <= 8
        ttl = client.pttl(keys[0])
        assert 0 < ttl <= (120 + 60) * 1000
    finally:
        client.close()


def test_a_replica_killed_mid_run_loses_no_entry_of_a_call_it_answered(
    launch: Any, tmp_path: Path, redis_url: str, pb: SimpleNamespace
) -> None:
    """Four sessions called concurrently on A (two workers) until A gets SIGKILL: every reply a client
    received is in B's journal."""
    a, b = _two(launch, tmp_path, redis_url, "--workers", "2")
    received: list[tuple[str, str]] = []
    lock = threading.Lock()
    enough = threading.Event()

    def drive(session: str) -> None:
        with grpc.insecure_channel(a.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            for _ in range(30):
                try:
                    reply = _reserve(pb, ch, session)
                except grpc.RpcError:
                    return
                with lock:
                    received.append((session, reply))
                    if len(received) >= 20:
                        enough.set()

    sessions = [f"k{i}" for i in range(4)]
    with futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(drive, s) for s in sessions]
        assert enough.wait(60)
        for pid in [*a.worker_pids, a.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for job in running:
            job.result(60)
    with grpc.insecure_channel(b.address) as cb:
        journaled = {(s, _reply(e)) for s in sessions for e in _journal(cb, s)}
    missing = [pair for pair in received if pair not in journaled]
    assert len(received) >= 20
    assert missing == []
