"""Admin ``WatchJournal``: a server stream of journal entries as calls finish, over real sockets, with a real
grpc client and with grpcurl through reflection."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from helpers import fails

from virtsvc.admin import ADMIN_SERVICE, AdminClient
from virtsvc.contracts import Catalog
from virtsvc.engine.journal import Entry
from virtsvc.errors import Refusal
from virtsvc.scenarios import compile_text
from virtsvc.server import VirtualServer
from virtsvc.server import admin as admin_service

SHOP = """\
scenario: shop
rules:
  - method: shop.v1.Inventory/Reserve
    headers: {x-served-by: virtsvc}
    reply: {reservation_id: "r-{{ request.sku }}"}
  - method: shop.v1.Inventory/GetItem
    status:
      code: NOT_FOUND
      message: no such item
      details:
        - "@type": type.googleapis.com/google.rpc.ErrorInfo
          reason: MISSING
          domain: shop.example.com
"""


@pytest.fixture
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    srv = VirtualServer(catalog, compile_text(SHOP, catalog, origin="shop.yaml"), port=0, admin=True).start()
    yield srv
    srv.stop(0)


@pytest.fixture
def channel(server: VirtualServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _md(session: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", "shop"), ("x-virtsvc-session", session))


class _Reader:
    """Reads a watch on a thread of its own, so the test can make calls meanwhile."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.items: queue.Queue[Any] = queue.Queue()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.stream:
                self.items.put(item)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def take(self, n: int, timeout: float = 10.0) -> list[Any]:
        return [self.items.get(timeout=timeout) for _ in range(n)]

    def nothing_more(self, wait: float = 0.3) -> bool:
        time.sleep(wait)
        return self.items.empty()


def _ready(server: VirtualServer, watches: int = 1) -> None:
    """Waits until the server has subscribed the watch (the stream has no "ready" message of its own)."""
    deadline = time.monotonic() + 10
    while len(server.journal._subscribers) < watches:
        assert time.monotonic() < deadline, "the watch never subscribed"
        time.sleep(0.01)


def test_a_watch_streams_entries_as_calls_finish(
    server: VirtualServer, channel: grpc.Channel, pb: SimpleNamespace, sid: str
) -> None:
    inv = pb.inv_grpc.InventoryStub(channel)
    reader = _Reader(AdminClient(channel).watch(session=sid))
    _ready(server)
    inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md(sid))
    inv.Reserve(pb.inv.ReserveRequest(sku="B"), metadata=_md("someone-else"))  # filtered out
    fails(inv.GetItem, pb.inv.GetItemRequest(sku="Z"), metadata=_md(sid))
    first, second = reader.take(2)
    assert (first.method, first.session, first.code) == ("shop.v1.Inventory/Reserve", sid, "OK")
    assert dict(first.reply) == {"reservationId": "r-A"}
    assert dict(first.headers) == {"x-served-by": "virtsvc"}
    assert first.rule == "shop.yaml:3" and first.matched
    assert (second.method, second.code, second.message) == (
        "shop.v1.Inventory/GetItem",
        "NOT_FOUND",
        "no such item",
    )
    [detail] = second.details
    assert dict(detail) == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "MISSING",
        "domain": "shop.example.com",
    }
    assert second.seq > first.seq
    assert reader.nothing_more()
    reader.stream.cancel()
    assert reader.ended.wait(5)
    assert reader.error is not None and reader.error.code() is grpc.StatusCode.CANCELLED
    # The cancelled watch let go of its subscription.
    deadline = time.monotonic() + 5
    while server.journal._subscribers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.journal._subscribers == []


def test_include_existing_sends_the_backlog_first_without_repeats(
    server: VirtualServer, channel: grpc.Channel, pb: SimpleNamespace, sid: str
) -> None:
    inv = pb.inv_grpc.InventoryStub(channel)
    for sku in ("A", "B"):
        inv.Reserve(pb.inv.ReserveRequest(sku=sku), metadata=_md(sid))
    reader = _Reader(
        AdminClient(channel).watch(session=sid, method="shop.v1.Inventory.Reserve", include_existing=True)
    )
    backlog = reader.take(2)
    assert [e.reply["reservationId"] for e in backlog] == ["r-A", "r-B"]
    _ready(server)
    inv.Reserve(pb.inv.ReserveRequest(sku="C"), metadata=_md(sid))
    fails(inv.GetItem, pb.inv.GetItemRequest(sku="Z"), metadata=_md(sid))  # another method: filtered out
    [live] = reader.take(1)
    assert live.reply["reservationId"] == "r-C"
    assert reader.nothing_more()
    reader.stream.cancel()


def test_an_unknown_method_filter_is_refused_with_the_near_miss(channel: grpc.Channel) -> None:
    error = fails(lambda: next(iter(AdminClient(channel).watch(method="shop.v1.Inventory/Reserv"))))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert 'did you mean "shop.v1.Inventory/Reserve"' in error.details()


def test_stopping_the_server_ends_the_watch_cleanly(catalog: Catalog) -> None:
    srv = VirtualServer(catalog, compile_text(SHOP, catalog, origin="shop.yaml"), port=0, admin=True).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            reader = _Reader(AdminClient(ch).watch())
            _ready(srv)
            started = time.monotonic()
            srv.stop(5)
            assert reader.ended.wait(5)
            assert time.monotonic() - started < 3  # the watch does not hold the stop for its whole grace
            assert reader.error is None  # the stream ended with OK
    finally:
        srv.stop(0)


def test_open_watches_are_capped_and_released(catalog: Catalog) -> None:
    # max_workers 4: one watch may hold a worker thread, the others stay free for calls.
    srv = VirtualServer(
        catalog, compile_text(SHOP, catalog, origin="shop.yaml"), port=0, admin=True, max_workers=4
    ).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            client = AdminClient(ch)
            first = _Reader(client.watch())
            _ready(srv)
            error = fails(lambda: next(iter(client.watch())))
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 journal watches are open" in error.details() and "--max-workers" in error.details()
            first.stream.cancel()
            assert first.ended.wait(5)
            deadline = time.monotonic() + 5
            while True:  # the slot is free once the first watch's handler has returned
                second = client.watch()
                reader = _Reader(second)
                time.sleep(0.3)
                if not reader.ended.is_set():
                    break
                assert time.monotonic() < deadline, f"the slot was never released: {reader.error}"
            second.cancel()
    finally:
        srv.stop(0)


def test_a_watch_needs_the_token(catalog: Catalog) -> None:
    srv = VirtualServer(catalog, [], port=0, admin=True, admin_token="t0ken").start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            error = fails(lambda: next(iter(AdminClient(ch).watch())))
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
            reader = _Reader(AdminClient(ch, token="t0ken").watch())
            _ready(srv)
            reader.stream.cancel()
            assert reader.ended.wait(5)
    finally:
        srv.stop(0)


def test_a_watcher_that_falls_too_far_behind_is_ended(
    server: VirtualServer, monkeypatch: pytest.MonkeyPatch, catalog: Catalog
) -> None:
    """The backlog bound: entries pile up while the watcher does not read; past the bound its watch is ended
    with RESOURCE_EXHAUSTED instead of the server buffering without end. (Driven directly, through the
    service's own generator: over the wire, grpc's flow-control buffers hide a slow reader for long.)"""
    monkeypatch.setattr(admin_service, "WATCH_BACKLOG", 3)

    class _Context:
        def is_active(self) -> bool:
            return True

        def add_callback(self, callback: Any) -> bool:
            return True

    service = admin_service.AdminService(server)
    stream = service.WatchJournal(admin_service.messages.WatchJournalRequest(), _Context())
    spec = catalog.method("shop.v1.Inventory/Reserve")

    def record(sku: str) -> None:
        server.journal.record(
            Entry("shop", "a", spec, {}, time.time(), [spec.input_class(sku=sku).SerializeToString()])
        )

    got: list[Any] = []
    first = threading.Thread(target=lambda: got.append(next(stream)))
    first.start()
    _ready(server)
    record("s0")
    first.join(10)
    assert got[0].request["sku"] == "s0"
    for n in range(1, 5):  # the watcher reads nothing meanwhile: 4 entries for a backlog of 3
        record(f"s{n}")
    with pytest.raises(Refusal) as info:
        next(stream)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this watch fell 3 entries behind" in info.value.message
    assert server.journal._subscribers == []
    assert service._watches == 0


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl_watches_the_journal(
    server: VirtualServer, channel: grpc.Channel, pb: SimpleNamespace, sid: str
) -> None:
    """``grpcurl -d '{"session": ...}' HOST virtsvc.admin.v1.Admin/WatchJournal`` prints entries as they
    come."""
    watch = subprocess.Popen(
        [
            "grpcurl",
            "-plaintext",
            "-d",
            json.dumps({"session": sid}),
            server.address,
            f"{ADMIN_SERVICE}/WatchJournal",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _ready(server)
        inv = pb.inv_grpc.InventoryStub(channel)
        for sku in ("A", "B"):
            inv.Reserve(pb.inv.ReserveRequest(sku=sku), metadata=_md(sid))
        entries = _json_objects(watch, 2)
    finally:
        watch.terminate()
        watch.communicate(timeout=10)
    assert [e["reply"]["reservationId"] for e in entries] == ["r-A", "r-B"]
    assert all(e["session"] == sid and e["code"] == "OK" for e in entries)
    assert entries[0]["headers"] == {"x-served-by": "virtsvc"}


def _json_objects(process: subprocess.Popen[str], n: int, timeout: float = 15.0) -> list[Any]:
    """The first ``n`` JSON objects grpcurl prints (pretty-printed, one after another)."""
    found: list[Any] = []
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: list(map(lines.put, stdout)), daemon=True).start()
    buffer = ""
    decoder = json.JSONDecoder()
    deadline = time.monotonic() + timeout
    while len(found) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"grpcurl printed only {found!r} then {buffer!r}"
        try:
            buffer += lines.get(timeout=remaining)
        except queue.Empty:
            continue
        try:
            obj, end = decoder.raw_decode(buffer.strip())
        except json.JSONDecodeError:
            continue
        found.append(obj)
        buffer = buffer.strip()[end:]
    return found
