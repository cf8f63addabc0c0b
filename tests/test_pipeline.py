"""The one call pipeline, over real sockets: what every call goes through, whichever answer it gets.

- a step feature reaches the fixed-reply plan and the general path alike (headers and trailers here);
- an unexpected exception inside a rule's matching or rendering answers INTERNAL naming the rule, and the
  call is journaled;
- journal entries keep what was sent (headers, trailers, status details) for every RPC kind;
- journal subscribers hear every finished call, and one that raises never breaks a call.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from helpers import fails

from virtsvc.contracts import Catalog
from virtsvc.engine.journal import Entry
from virtsvc.scenarios import compile_text
from virtsvc.scenarios.model import Call, CompiledScenario, Location, MatchResult, Rule, Step
from virtsvc.server import VirtualServer

RESERVE = "shop.v1.Inventory/Reserve"

# The same static reply with the same headers and trailers, three ways: plainly (a fixed plan), limited by
# `times` and conditioned by `when` (both the general path: they count or look at the call).
HEADERS = """\
scenario: headers
rules:
  - method: shop.v1.Inventory/Reserve
    when: {metadata: {x-path: times}}
    times: 100
    priority: 2
    headers: {x-feature: "on", x-blob-bin: "AAEC"}
    trailers: {x-done: "yes"}
    reply: {reservation_id: r-1}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: WHEN}}
    priority: 1
    headers: {x-feature: "on", x-blob-bin: "AAEC"}
    trailers: {x-done: "yes"}
    reply: {reservation_id: r-1}
  - method: shop.v1.Inventory/Reserve
    headers: {x-feature: "on", x-blob-bin: "AAEC"}
    trailers: {x-done: "yes"}
    reply: {reservation_id: r-1}
"""

SENT = """\
scenario: sent
rules:
  - method: shop.v1.Inventory/Reserve
    headers: {x-kind: unary, x-trace-bin: "aGVsbG8="}
    trailers: {x-served-by: virtsvc}
    status:
      code: FAILED_PRECONDITION
      message: out of stock
      details:
        - "@type": type.googleapis.com/google.rpc.ErrorInfo
          reason: OUT_OF_STOCK
          domain: shop.example.com
  - method: shop.v1.Inventory/Watch
    headers: {x-kind: server_streaming}
    trailers: {x-served-by: virtsvc}
    stream:
      - reply: {sku: A, on_hand: 1}
      - reply: {sku: A, on_hand: 2}
    status:
      code: UNAVAILABLE
      message: feed closed
      details:
        - "@type": type.googleapis.com/google.rpc.RetryInfo
          retryDelay: 2s
  - method: shop.v1.Inventory/BulkUpdate
    headers: {x-kind: client_streaming}
    trailers: {x-served-by: virtsvc}
    status:
      code: INVALID_ARGUMENT
      message: bad counts
      details:
        - "@type": type.googleapis.com/google.rpc.BadRequest
          fieldViolations: [{field: count, description: negative}]
  - method: shop.v1.Orders/Track
    headers: {x-kind: bidi_streaming}
    trailers: {x-served-by: virtsvc}
    stream:
      - reply: {order_id: o-1, text: first}
    status:
      code: ABORTED
      message: tracking lost
      details:
        - "@type": type.googleapis.com/google.rpc.ErrorInfo
          reason: LOST
          domain: shop.example.com
"""


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    scenarios = [*compile_text(HEADERS, catalog, origin="headers.yaml"), *compile_text(SENT, catalog)]
    srv = VirtualServer(catalog, scenarios, port=0).start()
    yield srv
    srv.stop(0)


def _md(scenario: str, session: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session), *extra)


def _only_entry(server: VirtualServer, scenario: str, session: str) -> Entry:
    entries = server.journal.entries(scenario, session)
    assert len(entries) == 1, entries
    return entries[0]


# -- one step feature, both paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_sku", "extra", "line", "planned"),
    [
        ("PLAIN", (), 16, True),
        ("WHEN", (), 10, False),
        ("PLAIN", (("x-path", "times"),), 3, False),
    ],
    ids=["fixed-plan", "when", "times"],
)
def test_headers_and_trailers_reach_the_plan_and_the_general_path(
    server: VirtualServer,
    inv: Any,
    pb: SimpleNamespace,
    sid: str,
    request_sku: str,
    extra: tuple[tuple[str, str], ...],
    line: int,
    planned: bool,
) -> None:
    """``headers:``/``trailers:`` written once answer alike whether the rule has a fixed plan or not: the
    client receives them and the journal records them as sent."""
    scenario = server.registry.get("headers")
    assert scenario is not None
    rule = next(r for r in scenario.rules if r.location.line == line)
    assert (rule.plan is not None) is planned  # the three rules really take the two paths

    reply, call = inv.Reserve.with_call(
        pb.inv.ReserveRequest(sku=request_sku), metadata=_md("headers", sid, *extra)
    )
    assert reply.reservation_id == "r-1"
    received = dict(call.initial_metadata())
    assert received["x-feature"] == "on"
    assert received["x-blob-bin"] == b"\x00\x01\x02"
    assert dict(call.trailing_metadata())["x-done"] == "yes"

    entry = _only_entry(server, "headers", sid)
    assert entry.rule == f"headers.yaml:{line}"
    assert entry.headers == (("x-feature", "on"), ("x-blob-bin", b"\x00\x01\x02"))
    assert entry.trailers == (("x-done", "yes"),)
    assert entry.to_dict()["headers"] == {
        "x-feature": "on",
        "x-blob-bin": base64.b64encode(b"\0\1\2").decode(),
    }


# -- what was sent, every RPC kind ---------------------------------------------------------------------------


def _details(error: grpc.RpcError) -> list[str]:
    raw = dict(error.trailing_metadata())["grpc-status-details-bin"]
    return [d.type_url for d in status_pb2.Status.FromString(raw).details]


def test_unary_entry_keeps_headers_trailers_and_details(
    server: VirtualServer, inv: Any, pb: SimpleNamespace, sid: str
) -> None:
    error = fails(inv.Reserve, pb.inv.ReserveRequest(sku="A"), metadata=_md("sent", sid))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert dict(error.initial_metadata())["x-kind"] == "unary"
    assert _details(error) == ["type.googleapis.com/google.rpc.ErrorInfo"]
    entry = _only_entry(server, "sent", sid)
    assert (entry.code, entry.message) == (grpc.StatusCode.FAILED_PRECONDITION, "out of stock")
    assert entry.headers == (("x-kind", "unary"), ("x-trace-bin", b"hello"))
    assert entry.trailers == (("x-served-by", "virtsvc"),)
    assert entry.status_details() == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "OUT_OF_STOCK",
            "domain": "shop.example.com",
        }
    ]
    as_dict = entry.to_dict()
    assert as_dict["headers"] == {"x-kind": "unary", "x-trace-bin": "aGVsbG8="}
    assert as_dict["trailers"] == {"x-served-by": "virtsvc"}
    assert as_dict["details"] == entry.status_details()


def test_server_streaming_entry_keeps_replies_headers_trailers_and_details(
    server: VirtualServer, inv: Any, pb: SimpleNamespace, sid: str
) -> None:
    stream = inv.Watch(pb.inv.WatchRequest(skus=["A"]), metadata=_md("sent", sid))
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for event in stream:
            got.append(event.on_hand)
    assert got == [1, 2]
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert dict(stream.initial_metadata())["x-kind"] == "server_streaming"
    entry = _only_entry(server, "sent", sid)
    assert [r["onHand"] for r in entry.replies()] == ["1", "2"]
    assert entry.headers == (("x-kind", "server_streaming"),)
    assert entry.trailers == (("x-served-by", "virtsvc"),)
    assert entry.status_details() == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}
    ]
    assert _details(info.value) == ["type.googleapis.com/google.rpc.RetryInfo"]


def test_client_streaming_entry_keeps_requests_headers_trailers_and_details(
    server: VirtualServer, inv: Any, pb: SimpleNamespace, sid: str
) -> None:
    counts = iter([pb.inv.StockCount(sku="A", count=-1), pb.inv.StockCount(sku="B", count=2)])
    error = fails(inv.BulkUpdate, counts, metadata=_md("sent", sid))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    entry = _only_entry(server, "sent", sid)
    assert [r["sku"] for r in entry.requests()] == ["A", "B"]
    assert entry.headers == (("x-kind", "client_streaming"),)
    assert entry.trailers == (("x-served-by", "virtsvc"),)
    assert entry.status_details() == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "count", "description": "negative"}],
        }
    ]


def test_bidi_entry_keeps_replies_headers_trailers_and_details(
    server: VirtualServer, orders: Any, pb: SimpleNamespace, sid: str
) -> None:
    stream = orders.Track(iter([pb.orders.TrackRequest(order_id="o-1")]), metadata=_md("sent", sid))
    texts = []
    with pytest.raises(grpc.RpcError) as info:
        for update in stream:
            texts.append(update.text)
    assert texts == ["first"]
    assert info.value.code() is grpc.StatusCode.ABORTED
    entry = _only_entry(server, "sent", sid)
    assert [r["text"] for r in entry.replies()] == ["first"]
    assert entry.headers == (("x-kind", "bidi_streaming"),)
    assert entry.trailers == (("x-served-by", "virtsvc"),)
    assert [d["reason"] for d in entry.status_details()] == ["LOST"]
    assert entry.code is grpc.StatusCode.ABORTED and entry.message == "tracking lost"


# -- unexpected failures inside a rule ------------------------------------------------------------------


@dataclass(frozen=True)
class _BrokenMatcher:
    """A ``when`` with a bug: raises what no matcher is expected to raise."""

    needs_request: bool = True

    def check(self, call: Call) -> MatchResult:
        raise ZeroDivisionError("division by zero in a matcher")


@dataclass(frozen=True)
class _BrokenBody:
    """A reply template with a bug."""

    static: bytes | None = None
    needs_request: bool = True
    calls: list[int] = field(default_factory=list)

    def render(self, call: Call, index: int) -> bytes:
        self.calls.append(index)
        raise KeyError("no-such-key")


@pytest.fixture(scope="module")
def broken(catalog: Catalog) -> Iterator[VirtualServer]:
    where = Location("broken.py", 1)

    def step(line: int, **parts: Any) -> tuple[Step, ...]:
        return (Step(Location("broken.py", line), **parts),)

    rules = (
        Rule("broken", "0", RESERVE, Location("broken.py", 7), when=_BrokenMatcher(), steps=step(7)),
        Rule(
            "broken",
            "1",
            "shop.v1.Inventory/GetItem",
            Location("broken.py", 12),
            steps=step(12, body=_BrokenBody()),
        ),
        Rule(
            "broken",
            "2",
            "shop.v1.Inventory/Watch",
            Location("broken.py", 20),
            steps=step(20, stream=step(22, body=_BrokenBody())),
        ),
    )
    srv = VirtualServer(catalog, [CompiledScenario("broken", where, rules)], port=0).start()
    yield srv
    srv.stop(0)


def test_an_exception_in_matching_answers_internal_naming_the_rule(
    broken: VirtualServer, channel_to: Any, pb: SimpleNamespace, sid: str
) -> None:
    inv = pb.inv_grpc.InventoryStub(channel_to(broken.address))
    error = fails(inv.Reserve, pb.inv.ReserveRequest(sku="A"), metadata=_md("broken", sid))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == (
        "the rule at broken.py:7 failed unexpectedly: ZeroDivisionError: division by zero in a matcher"
    )
    entry = _only_entry(broken, "broken", sid)
    assert entry.rule == "broken.py:7"
    assert (entry.code, entry.message) == (grpc.StatusCode.INTERNAL, error.details())
    assert [r["sku"] for r in entry.requests()] == ["A"]


@pytest.mark.parametrize("method", ["GetItem", "Watch"])
def test_an_exception_in_rendering_answers_internal_naming_the_rule(
    broken: VirtualServer, channel_to: Any, pb: SimpleNamespace, sid: str, method: str
) -> None:
    inv = pb.inv_grpc.InventoryStub(channel_to(broken.address))
    if method == "GetItem":
        error = fails(inv.GetItem, pb.inv.GetItemRequest(sku="A"), metadata=_md("broken", sid))
        line, written = 12, 12
    else:
        error = fails(lambda: list(inv.Watch(pb.inv.WatchRequest(skus=["A"]), metadata=_md("broken", sid))))
        line, written = 20, 22  # the stream item's own line
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == (
        f"the reply template of the rule at broken.py:{written} failed: KeyError: 'no-such-key'"
    )
    entry = _only_entry(broken, "broken", sid)
    assert entry.rule == f"broken.py:{line}"
    assert (entry.code, entry.message) == (grpc.StatusCode.INTERNAL, error.details())


# -- subscribers ----------------------------------------------------------------------------------------


def test_subscribers_hear_every_call_and_a_raising_one_breaks_none(
    server: VirtualServer, inv: Any, pb: SimpleNamespace, sid: str
) -> None:
    heard: list[Entry] = []
    raised = threading.Event()

    def broken_subscriber(entry: Entry) -> None:
        raised.set()
        raise RuntimeError("a subscriber's bug")

    unsubscribe_broken = server.subscribe(broken_subscriber)
    unsubscribe = server.subscribe(lambda entry: heard.append(entry) if entry.session == sid else None)
    try:
        for n in range(3):
            reply = inv.Reserve(pb.inv.ReserveRequest(sku=f"S-{n}"), metadata=_md("headers", sid))
            assert reply.reservation_id == "r-1"  # the raising subscriber did not break the call
    finally:
        unsubscribe()
        unsubscribe_broken()  # already dropped: unsubscribing again is harmless
    assert raised.is_set()
    assert [e.requests()[0]["sku"] for e in heard] == ["S-0", "S-1", "S-2"]
    assert all(e.code is grpc.StatusCode.OK and e.duration > 0 for e in heard)
    assert server.journal.dropped == 0  # subscribers do not count as dropped entries
    assert len(server.journal.entries("headers", sid)) == 3
