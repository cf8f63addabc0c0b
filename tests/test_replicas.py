"""Three replicas as users run them: separate `virtsvc serve --workers 2 --store redis://...` processes on one
real redis-server, driven over the wire as one service."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from _workers import ROOT, Served
from test_redis_store import _drive_sequence, _meta, _scenario

from virtsvc.admin import AdminClient

REPLICAS = 3
CHANNELS = 3  # per replica: connections spread over its two workers (SO_REUSEPORT picks one each)


def _serve(launch: Callable[..., Served], scenario: Path, url: str, *flags: str) -> Served:
    return launch(
        sys.executable, "-m", "virtsvc.cli", "--log-format", "json", "serve", "--protos",
        str(ROOT / "protos"), "--scenarios", str(scenario), "--port", "0", "--store", url, *flags,
    )  # fmt: skip


def _three(launch: Callable[..., Served], tmp_path: Path, url: str) -> list[Served]:
    scenario = _scenario(tmp_path)
    replicas = [_serve(launch, scenario, url, "--workers", "2") for _ in range(REPLICAS)]
    for replica in replicas:
        replica.wait_for("serving")
    return replicas


def _channels(replicas: list[Served]) -> list[grpc.Channel]:
    # A subchannel pool of each channel's own: grpc would otherwise share one connection per address.
    return [
        grpc.insecure_channel(r.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for r in replicas
        for _ in range(CHANNELS)
    ]


def _reserve(pb: SimpleNamespace, channel: grpc.Channel, scenario: str, session: str) -> str:
    meta = (("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session))
    try:
        reply = pb.inv_grpc.InventoryStub(channel).Reserve(
            pb.inv.ReserveRequest(sku="A"), metadata=meta, timeout=20
        )
    except grpc.RpcError as err:
        return err.code().name
    return str(reply.reservation_id)


@pytest.fixture
def replicas(launch: Any, tmp_path: Path, redis_url: str) -> list[Served]:
    return _three(launch, tmp_path, redis_url)


@pytest.fixture
def channels(replicas: list[Served]) -> Iterator[list[grpc.Channel]]:
    opened = _channels(replicas)
    try:
        yield opened
    finally:
        for channel in opened:
            channel.close()


def test_sequences_and_times_are_exact_across_replicas_and_workers(
    channels: list[grpc.Channel], pb: SimpleNamespace
) -> None:
    """Three replicas of two workers each, concurrent calls of four sessions over nine connections: each
    sequence step answered exactly once, a `times: 5` rule exactly five times in all."""
    _drive_sequence(pb, channels, [f"w{i}" for i in range(4)])
    stubs = [pb.inv_grpc.InventoryStub(c) for c in channels]
    outcomes = []
    for i in range(12):
        try:
            stubs[i % len(stubs)].GetItem(pb.inv.GetItemRequest(sku="x"), metadata=_meta("t"), timeout=20)
            outcomes.append("OK")
        except grpc.RpcError as err:
            outcomes.append(err.code().name)
    assert outcomes == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 7


FRESH = """\
scenario: fresh
rules:
  - method: shop.v1.Inventory/Reserve
    sequence:
      - {reply: {reservationId: "VERSION-a"}}
      - {reply: {reservationId: "VERSION-b"}}
"""


def test_admin_changes_on_one_replica_are_served_by_all_on_the_next_call(
    replicas: list[Served], channels: list[grpc.Channel], pb: SimpleNamespace
) -> None:
    """PutScenario, a replacing PutScenario, ResetSession, PutSessionRules and DeleteScenario, each through
    one replica's admin API: every connection of every replica serves the change on its first call after."""
    admins = [AdminClient(channels[i * CHANNELS]) for i in range(REPLICAS)]

    admins[0].call("PutScenario", text=FRESH.replace("VERSION", "v1"))
    assert [_reserve(pb, c, "fresh", f"p{i}") for i, c in enumerate(channels)] == ["v1-a"] * len(channels)

    replaced = admins[1].call("PutScenario", text=FRESH.replace("VERSION", "v2"))
    assert list(replaced.replaced) == ["fresh"]
    # A session's sequence is in Redis: the next step, whichever connection answers it.
    assert [_reserve(pb, c, "fresh", "one") for c in channels[:2]] == ["v2-a", "v2-b"]

    admins[2].call("ResetSession", scenario="fresh", session="one")
    assert _reserve(pb, channels[-1], "fresh", "one") == "v2-a"

    rules = "rules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: own}\n"
    admins[0].call("PutSessionRules", scenario="fresh", session="own", text=rules)
    assert {_reserve(pb, c, "fresh", "own") for c in channels} == {"own"}

    admins[1].call("DeleteScenario", name="fresh")
    assert {_reserve(pb, c, "fresh", "gone") for c in channels} == {"NOT_FOUND"}
    # The files' scenarios are untouched everywhere.
    assert {_reserve(pb, c, "shared", f"f{i}") for i, c in enumerate(channels)} == {"r0"}


def test_a_replica_started_later_serves_what_was_put_before(
    launch: Any,
    replicas: list[Served],
    channels: list[grpc.Channel],
    pb: SimpleNamespace,
    tmp_path: Path,
    redis_url: str,
) -> None:
    """A fourth replica, started after a PutScenario, serves the scenario from its first call."""
    AdminClient(channels[0]).call("PutScenario", text=FRESH.replace("VERSION", "early"))
    late = _serve(launch, _scenario(tmp_path), redis_url)
    with grpc.insecure_channel(late.address) as channel:
        assert _reserve(pb, channel, "fresh", "late") == "early-a"
