"""Sessions under concurrency: many sessions in parallel threads against ONE server each see exactly their own
state (sequence positions, ``times`` counters, journal), every time."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.scenarios import load_scenarios

ENGINE = Path(__file__).resolve().parent / "scenarios" / "engine.yaml"
SESSIONS = 80  # at least 64
ROUNDS = 3  # each session walks its 5-step cycle this many times
STEPS = ["A", "B", "C", "D", "E"]
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pb(generated: Path) -> SimpleNamespace:
    from shop.v1 import inventory_pb2, inventory_pb2_grpc, payments_pb2, payments_pb2_grpc

    return SimpleNamespace(
        inv=inventory_pb2, inv_grpc=inventory_pb2_grpc, pay=payments_pb2, pay_grpc=payments_pb2_grpc
    )


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    with VirtualServer(catalog, load_scenarios([ENGINE], catalog), journal_size=1000) as srv:
        yield srv


@pytest.fixture(scope="module")
def channels(server: VirtualServer) -> Iterator[list[grpc.Channel]]:
    chans = [grpc.insecure_channel(server.address) for _ in range(4)]
    yield chans
    for ch in chans:
        ch.close()


def metadata(scenario: str, session: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session))


def test_parallel_sessions_each_walk_their_own_sequence(
    server: VirtualServer, channels: list[grpc.Channel], pb: SimpleNamespace
) -> None:
    """80 sessions in 64 threads each walk their own 5-step cycle 3 times, exactly, journal too."""
    start = threading.Barrier(64)
    run = f"walk-{random.randrange(10**9)}"

    def walk(n: int) -> tuple[str, list[str]]:
        session = f"{run}-{n}"
        stub = pb.pay_grpc.PaymentsStub(channels[n % len(channels)])
        if n < 64:
            start.wait(timeout=TIMEOUT)  # all threads start together, to collide as much as possible
        seen = [
            stub.Charge(
                pb.pay.ChargeRequest(account=session), metadata=metadata("seq", session), timeout=TIMEOUT
            ).charge_id
            for _ in range(ROUNDS * len(STEPS))
        ]
        return session, seen

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(walk, range(SESSIONS)))

    assert len(results) == SESSIONS
    for session, seen in results:
        assert seen == [f"{session}:{step}" for step in STEPS] * ROUNDS
        entries = server.journal.entries("seq", session)
        assert [e.replies()[0]["chargeId"] for e in entries] == seen
        assert {(e.session, e.code) for e in entries} == {(session, grpc.StatusCode.OK)}


def test_times_counters_per_session_under_concurrency(
    channels: list[grpc.Channel], pb: SimpleNamespace
) -> None:
    """With 64 sessions' calls all in parallel, each session gets exactly times: 3 limited answers."""
    run = f"times-{random.randrange(10**9)}"
    calls = [f"{run}-{n}" for n in range(64) for _ in range(6)]
    random.Random(7).shuffle(calls)

    def reserve(indexed: tuple[int, str]) -> tuple[str, str]:
        i, session = indexed
        stub = pb.inv_grpc.InventoryStub(channels[i % len(channels)])
        reply = stub.Reserve(pb.inv.ReserveRequest(), metadata=metadata("times", session), timeout=TIMEOUT)
        return session, reply.reservation_id

    with ThreadPoolExecutor(max_workers=48) as pool:
        answers = list(pool.map(reserve, enumerate(calls)))

    per_session = Counter(answers)
    assert len({s for s, _ in answers}) == 64
    for n in range(64):
        session = f"{run}-{n}"
        assert (per_session[(session, "limited")], per_session[(session, "rest")]) == (3, 3), session


def test_one_session_hammered_in_parallel_hands_out_each_position_once(
    server: VirtualServer, channels: list[grpc.Channel], pb: SimpleNamespace
) -> None:
    """Parallel calls of ONE session take each cycle step and each times use exactly once."""
    session = f"shared-{random.randrange(10**9)}"

    def charge(i: int) -> str:
        stub = pb.pay_grpc.PaymentsStub(channels[i % len(channels)])
        reply = stub.Charge(pb.pay.ChargeRequest(), metadata=metadata("seq", session), timeout=TIMEOUT)
        return str(reply.charge_id)

    def reserve(i: int) -> str:
        stub = pb.inv_grpc.InventoryStub(channels[i % len(channels)])
        reply = stub.Reserve(pb.inv.ReserveRequest(), metadata=metadata("times", session), timeout=TIMEOUT)
        return str(reply.reservation_id)

    with ThreadPoolExecutor(max_workers=50) as pool:
        charges: list[Any] = list(pool.map(charge, range(100)))
        reserves = list(pool.map(reserve, range(64)))
    assert Counter(charges) == {f"{session}:{step}": 20 for step in STEPS}
    assert Counter(reserves) == {"limited": 3, "rest": 61}
    assert len(server.journal.entries("seq", session)) == 100
