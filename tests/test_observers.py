"""Call observers (``virtsvc.engine.observers``), over real sockets: told of every call as it starts and
after it is journaled, exactly once each, for every kind; one that raises is dropped and the call goes on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from virtsvc.contracts import Catalog
from virtsvc.engine.pipeline import Exchange
from virtsvc.scenarios import compile_text
from virtsvc.server import VirtualServer

RULES = """\
scenario: observed
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: SLOW}}
    delay: 300ms
    reply: {reservation_id: slow}
  - method: shop.v1.Inventory/Reserve
    reply: {reservation_id: r-1}
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {sku: A, on_hand: 1}
"""


class Recorder:
    """Records what it is told, and what was journaled by the time it is told of the finish."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.in_flight = 0

    def on_start(self, exchange: Exchange) -> object:
        self.in_flight += 1
        self.events.append(("start", exchange.spec.full_name))
        return exchange.spec.name

    def on_finish(self, exchange: Exchange, token: object) -> None:
        self.in_flight -= 1
        assert exchange.entry is not None
        self.events.append(("finish", (token, exchange.entry.code.name, exchange.entry.rule is not None)))


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    srv = VirtualServer(catalog, compile_text(RULES, catalog, origin="observed.yaml"), port=0).start()
    yield srv
    srv.stop(0)


MD = (("x-virtsvc-scenario", "observed"),)


def test_without_observers_the_pipeline_has_none(server: VirtualServer) -> None:
    """No observer added: the dispatcher holds None, the one test the pipeline pays per call."""
    assert server.dispatcher.observers is None


def test_an_observer_hears_each_call_start_and_finish_once(
    server: VirtualServer, inv: Any, pb: SimpleNamespace
) -> None:
    """Unary, server-streaming and a refused call: one start, one finish each, the token handed back."""
    recorder = Recorder()
    remove = server.add_observer(recorder)
    try:
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=MD)
        list(inv.Watch(pb.inv.WatchRequest(skus=["A"]), metadata=MD))
        with pytest.raises(grpc.RpcError):
            inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=(("x-virtsvc-scenario", "nope"),))
    finally:
        remove()
    assert recorder.events == [
        ("start", "shop.v1.Inventory/Reserve"),
        ("finish", ("Reserve", "OK", True)),
        ("start", "shop.v1.Inventory/Watch"),
        ("finish", ("Watch", "OK", True)),
        ("start", "shop.v1.Inventory/Reserve"),
        ("finish", ("Reserve", "NOT_FOUND", False)),
    ]
    assert server.dispatcher.observers is None  # removed: back to nothing per call


def test_a_call_in_flight_is_seen_between_start_and_finish(
    server: VirtualServer, inv: Any, pb: SimpleNamespace
) -> None:
    """During a delayed call the observer has seen its start and not its finish."""
    recorder = Recorder()
    remove = server.add_observer(recorder)
    try:
        future = inv.Reserve.future(pb.inv.ReserveRequest(sku="SLOW"), metadata=MD)
        deadline = threading.Event()
        for _ in range(100):
            if recorder.in_flight == 1:
                break
            deadline.wait(0.01)
        assert recorder.in_flight == 1
        assert future.result(timeout=5).reservation_id == "slow"
        assert recorder.in_flight == 0
    finally:
        remove()


class Broken:
    def on_start(self, exchange: Exchange) -> object:
        raise RuntimeError("observer bug")

    def on_finish(self, exchange: Exchange, token: object) -> None:  # pragma: no cover - dropped first
        raise AssertionError


def test_an_observer_that_raises_is_dropped_and_the_call_goes_on(
    server: VirtualServer, inv: Any, pb: SimpleNamespace
) -> None:
    """A broken observer never breaks a call: it is removed, the others still hear the call."""
    recorder = Recorder()
    server.add_observer(Broken())
    remove = server.add_observer(recorder)
    try:
        assert inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=MD).reservation_id == "r-1"
        assert [type(o) for o in server.dispatcher._observers.observers] == [Recorder]
        assert [kind for kind, _ in recorder.events] == ["start", "finish"]
    finally:
        remove()
