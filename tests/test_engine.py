"""The scenario engine end to end: real grpc clients (generated stubs) against a server on 127.0.0.1.

Every test makes real calls over a socket and asserts what the client receives: messages, status codes,
status texts word for word, metadata and rich error details. The scenarios are in ``tests/scenarios/``.
"""

from __future__ import annotations

import datetime as dt
import queue
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import fails

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.engine.store import RuleSet
from virtsvc.scenarios import load_scenarios

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "scenarios"
OPERATORS = HERE / "operators.yaml"
ENGINE = HERE / "engine.yaml"
SCRIPTED = HERE / "scripted.py"
INTEROP = ROOT / "scenarios" / "interop.py"
TIMEOUT = 5.0


def at(path: Path, marker: str) -> str:
    """``file:line`` of the rule tagged ``# rule: MARKER`` in a scenario file, as the server reports it."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.rstrip().endswith(f"# rule: {marker}"):
            return f"{path}:{number}"
    raise AssertionError(f"no rule tagged {marker!r} in {path}")


def md(scenario: str, session: str | None = None, **extra: str) -> tuple[tuple[str, str], ...]:
    pairs = [("x-virtsvc-scenario", scenario)]
    if session is not None:
        pairs.append(("x-virtsvc-session", session))
    pairs.extend((k.replace("_", "-"), v) for k, v in extra.items())
    return tuple(pairs)


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    scenarios = load_scenarios([OPERATORS, ENGINE, SCRIPTED, INTEROP], catalog)
    with VirtualServer(catalog, scenarios) as srv:
        yield srv


def near_miss(method: str, scenario: str, session: str, *lines: str) -> str:
    return "\n".join([f'no rule matched {method} in scenario "{scenario}", session "{session}"', *lines])


# -- operators ---------------------------------------------------------------------------------------------

# (scenario, rule marker, method, matching request, expected reply, non-matching request, failure text)
OPERATOR_CASES: list[tuple[str, str, str, str, dict[str, Any], dict[str, Any], dict[str, Any], str]] = [
    (
        "$eq",
        "op-eq",
        "op-eq",
        "Reserve",
        {"sku": "ABC-1"},
        {"reservation_id": "eq"},
        {"sku": "XYZ"},
        'request.sku: expected "ABC-1", got "XYZ"',
    ),
    (
        "$ne",
        "op-ne",
        "op-ne",
        "Reserve",
        {"sku": "ABC"},
        {"reservation_id": "ne"},
        {"sku": "XYZ"},
        'request.sku: expected not "XYZ", got "XYZ"',
    ),
    (
        "$gt",
        "op-gt",
        "op-gt",
        "Reserve",
        {"qty": 6},
        {"reservation_id": "gt"},
        {"qty": 5},
        "request.qty: expected > 5, got 5",
    ),
    (
        "$gte",
        "op-gte",
        "op-gte",
        "Reserve",
        {"qty": 5},
        {"reservation_id": "gte"},
        {"qty": 4},
        "request.qty: expected >= 5, got 4",
    ),
    (
        "$lt",
        "op-lt",
        "op-lt",
        "Reserve",
        {"qty": 4},
        {"reservation_id": "lt"},
        {"qty": 5},
        "request.qty: expected < 5, got 5",
    ),
    (
        "$lte",
        "op-lte",
        "op-lte",
        "Reserve",
        {"qty": 5},
        {"reservation_id": "lte"},
        {"qty": 6},
        "request.qty: expected <= 5, got 6",
    ),
    (
        "$in",
        "op-in",
        "op-in",
        "Reserve",
        {"region": 2},
        {"reservation_id": "in"},
        {"region": 3},
        'request.region: expected one of ["REGION_EU", "REGION_US"], got "REGION_APAC"',
    ),
    (
        "$regex",
        "op-regex",
        "op-regex",
        "Reserve",
        {"sku": "ABC-12"},
        {"reservation_id": "regex"},
        {"sku": "ABC-1x"},
        'request.sku: expected to match /^ABC-[0-9]+$/, got "ABC-1x"',
    ),
    (
        "$contains-list",
        "op-contains",
        "op-contains",
        "ListItems",
        {"tags": ["new", "sale"]},
        {"items": [{"sku": "on-sale"}]},
        {"tags": ["new"]},
        'request.tags: expected to contain "sale", got ["new"]',
    ),
    (
        "$contains-text",
        "op-contains",
        "op-contains-text",
        "Reserve",
        {"sku": "ABC"},
        {"reservation_id": "contains"},
        {"sku": "XYZ"},
        'request.sku: expected to contain "BC", got "XYZ"',
    ),
    (
        "$exists-true",
        "op-exists",
        "op-exists",
        "ListItems",
        {"page": {}},
        {"items": [{"sku": "paged"}]},
        {"tags": ["x"]},
        "request.page: expected to be present, got nothing",
    ),
    (
        "$exists-false",
        "op-exists",
        "op-absent",
        "Reserve",
        {"sku": "A"},
        {"reservation_id": "no-hold"},
        {"hold_for": {"seconds": 5}},
        'request.holdFor: expected to be absent, got "5s"',
    ),
    # int64 compared exactly, as integers: beyond 2^53 a float would see 2^53 + 1 == 2^53,
    (
        "int64-exact",
        "op-int64-exact",
        "op-int64-exact",
        "Refund",
        {"amount": {"units": 2**53 + 1}},
        {"refund_id": "exact"},
        {"amount": {"units": 2**53}},
        "request.amount.units: expected > 9007199254740992, got 9007199254740992",
    ),
    # and as numbers, not text: 200 < 1000 although "200" > "1000"; 10^12 is beyond int32.
    (
        "int64",
        "op-int64",
        "op-int64",
        "Refund",
        {"amount": {"units": 10**12}},
        {"refund_id": "big"},
        {"amount": {"units": 200}},
        "request.amount.units: expected > 1000, got 200",
    ),
]
_METHODS = {
    "Reserve": ("inv", "ReserveRequest", "ReserveResponse", "shop.v1.Inventory/Reserve"),
    "ListItems": ("inv", "ListItemsRequest", "ListItemsResponse", "shop.v1.Inventory/ListItems"),
    "Refund": ("pay", "RefundRequest", "RefundResponse", "shop.v1.Payments/Refund"),
}


@pytest.mark.parametrize(
    ("scenario", "marker", "method", "good", "reply", "bad", "failure"),
    [pytest.param(*case[1:], id=case[0]) for case in OPERATOR_CASES],
)
def test_operator_matches_and_reports_the_failed_condition(
    scenario: str,
    marker: str,
    method: str,
    good: dict[str, Any],
    reply: dict[str, Any],
    bad: dict[str, Any],
    failure: str,
    pb: SimpleNamespace,
    inv: Any,
    pay: Any,
    sid: str,
) -> None:
    """Each operator answers a call whose request satisfies it and refuses one that does not, naming it."""
    module_name, request_name, reply_name, full = _METHODS[method]
    module = getattr(pb, module_name)
    rpc = getattr(inv if module_name == "inv" else pay, method)
    answer = rpc(getattr(module, request_name)(**good), metadata=md(scenario, sid), timeout=TIMEOUT)
    assert answer == getattr(module, reply_name)(**reply)
    err = fails(rpc, getattr(module, request_name)(**bad), metadata=md(scenario, sid), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    rule = at(OPERATORS, marker)
    assert err.details() == near_miss(
        full, scenario, sid, f"  closest: rule at {rule} (0 of 1 conditions held): " + failure
    )


def test_metadata_condition(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``when.metadata`` matches a header's value and names the header and the value received when not."""
    req = pb.inv.ReserveRequest(sku="A")
    ok = inv.Reserve(req, metadata=md("metadata-match", sid, x_tenant="acme"), timeout=TIMEOUT)
    assert ok.reservation_id == "acme"
    err = fails(inv.Reserve, req, metadata=md("metadata-match", sid, x_tenant="globex"), timeout=TIMEOUT)
    assert err.details() == near_miss(
        "shop.v1.Inventory/Reserve",
        "metadata-match",
        sid,
        f"  closest: rule at {at(OPERATORS, 'metadata-match')} (0 of 1 conditions held): "
        'metadata.x-tenant: expected "acme", got "globex"',
    )
    err = fails(inv.Reserve, req, metadata=md("metadata-match", sid), timeout=TIMEOUT)
    assert err.details().endswith('metadata.x-tenant: expected "acme", got nothing')


def test_json_and_proto_field_names_and_enums_by_name(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``when`` takes camelCase and proto field names alike, and enum values by name."""

    def call(**fields: Any) -> Any:
        return inv.Reserve(pb.inv.ReserveRequest(**fields), metadata=md("field-names", sid), timeout=TIMEOUT)

    assert call(order_id="o-json").reservation_id == "json-name"
    assert call(order_id="o-proto", region=pb.types.REGION_APAC).reservation_id == "proto-name"
    err = fails(call, order_id="o-proto", region=pb.types.REGION_EU)
    assert err.details() == near_miss(
        "shop.v1.Inventory/Reserve",
        "field-names",
        sid,
        f"  closest: rule at {at(OPERATORS, 'proto-name')} (1 of 2 conditions held): "
        'request.region: expected "REGION_APAC", got "REGION_EU"',
        f"  also: rule at {at(OPERATORS, 'json-name')} (0 of 1 conditions held): "
        'request.orderId: expected "o-json", got "o-proto"',
    )


# -- sequences, times, priority, extends -----------------------------------------------------------------


def _reserve(inv: Any, pb: SimpleNamespace, scenario: str, session: str, **fields: Any) -> Any:
    return inv.Reserve(pb.inv.ReserveRequest(**fields), metadata=md(scenario, session), timeout=TIMEOUT)


def test_sequence_repeat_last_is_the_default(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """A sequence answers its steps in order, then repeats the last one; ``index`` is the step's position."""
    got = [_reserve(inv, pb, "seq", sid, sku="REPEAT").reservation_id for _ in range(4)]
    assert got == ["r0", "r1", "r1", "r1"]


def test_sequence_cycle(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``after: cycle`` starts the sequence over after its last step."""
    got = [_reserve(inv, pb, "seq", sid, sku="CYCLE").reservation_id for _ in range(7)]
    assert got == ["c0", "c1", "c2", "c0", "c1", "c2", "c0"]


def test_sequence_fail(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``after: fail`` answers FAILED_PRECONDITION once the steps are used, naming the rule and the count."""
    assert _reserve(inv, pb, "seq", sid, sku="FAIL").reservation_id == "f0"
    err = fails(_reserve, inv, pb, "seq", sid, sku="FAIL")
    assert (err.code(), err.details()) == (grpc.StatusCode.ABORTED, "second of 1")
    for call_number in (3, 4):
        err = fails(_reserve, inv, pb, "seq", sid, sku="FAIL")
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == (
            f"the sequence of the rule at {at(ENGINE, 'seq-fail')} is exhausted: it had 2 steps and this is "
            f"call {call_number} (after: fail)"
        )


def test_sequences_of_different_rules_advance_apart(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """Each rule's sequence has its own position within a session."""
    assert _reserve(inv, pb, "seq", sid, sku="CYCLE").reservation_id == "c0"
    assert _reserve(inv, pb, "seq", sid, sku="REPEAT").reservation_id == "r0"
    assert _reserve(inv, pb, "seq", sid, sku="CYCLE").reservation_id == "c1"
    assert _reserve(inv, pb, "seq", sid, sku="REPEAT").reservation_id == "r1"


def test_reset_restarts_sequences(server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``store.reset(scenario, session)`` forgets the session: its sequences start over."""
    assert [_reserve(inv, pb, "seq", sid, sku="FAIL").reservation_id] == ["f0"]
    fails(_reserve, inv, pb, "seq", sid, sku="FAIL")
    assert server.store.reset("seq", sid) is True
    assert _reserve(inv, pb, "seq", sid, sku="FAIL").reservation_id == "f0"
    assert server.store.reset("seq", "never-used") is False


def test_times_then_the_next_rule(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """A rule with ``times: 3`` answers three calls of a session, then the next rule answers."""
    got = [_reserve(inv, pb, "times", sid).reservation_id for _ in range(5)]
    assert got == ["limited"] * 3 + ["rest"] * 2
    # another session has its own counter
    assert _reserve(inv, pb, "times", sid + "-2").reservation_id == "limited"


def test_used_up_is_reported_apart_from_did_not_match(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """Past its ``times``, a rule is listed as used up, apart from the rules whose conditions failed."""

    def get() -> Any:
        return inv.GetItem(pb.inv.GetItemRequest(sku="ABC"), metadata=md("times", sid), timeout=TIMEOUT)

    assert [get().title, get().title] == ["twice", "twice"]
    err = fails(get)
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == near_miss(
        "shop.v1.Inventory/GetItem",
        "times",
        sid,
        f"  closest: rule at {at(ENGINE, 'times-other')} (0 of 1 conditions held): "
        'request.sku: expected "OTHER", got "ABC"',
        f"  used up: rule at {at(ENGINE, 'times-used-up')} matched but is used up (times=2)",
    )


def test_priority_higher_first_ties_in_file_order(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """Higher priority rules are tried first whatever their place in the file; equal ones in file order."""
    assert _reserve(inv, pb, "priority", sid, sku="A", qty=1).reservation_id == "high-a"  # tie: file order
    assert _reserve(inv, pb, "priority", sid, sku="B", qty=1).reservation_id == "high-b"  # 5 beats 1 and 0
    assert _reserve(inv, pb, "priority", sid, sku="B", qty=0).reservation_id == "low"


def test_extends_own_rules_first_then_the_parents(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """extends: own rules first (whatever the parent's priority), then the parent's, every generation."""

    def get(scenario: str, sku: str) -> Any:
        return inv.GetItem(pb.inv.GetItemRequest(sku=sku), metadata=md(scenario, sid), timeout=TIMEOUT)

    assert get("parent", "OWN").title == "parent-priority"
    assert get("child", "OWN").title == "child"
    assert (get("child", "X").sku, get("child", "X").title) == ("X", "parent")
    assert _reserve(inv, pb, "child", sid).reservation_id == "parent"
    assert _reserve(inv, pb, "grandchild", sid, qty=1).reservation_id == "grandchild"
    assert _reserve(inv, pb, "grandchild", sid, qty=2).reservation_id == "parent"
    assert get("grandchild", "OWN").title == "child"


# -- delays and faults ------------------------------------------------------------------------------------


def test_fixed_delay(server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """A 200ms delay holds the answer for at least 0.2 s."""
    t0 = time.perf_counter()
    reply = inv.GetItem(pb.inv.GetItemRequest(), metadata=md("delays", sid), timeout=TIMEOUT)
    elapsed = time.perf_counter() - t0
    assert reply.title == "slow"
    assert elapsed >= 0.2
    assert server.journal.entries("delays", sid)[-1].duration >= 0.2


def test_uniform_delay_within_bounds(server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``uniform: [20ms, 60ms]`` waits a draw between the bounds; the journal records the draw, and the
    call lasts at least as long."""
    for _ in range(6):
        assert _reserve(inv, pb, "delays", sid).reservation_id == "uniform"
    entries = server.journal.entries("delays", sid)
    assert len(entries) == 6
    for entry in entries:
        assert 0.02 <= entry.delay <= 0.06, entry.delay
        assert entry.duration >= entry.delay
    assert len({e.delay for e in entries}) == 6  # draws, not one value


def test_delay_cut_short_by_the_deadline(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """A client deadline shorter than the delay ends the call DEADLINE_EXCEEDED; the journal records it."""
    err = fails(inv.GetItem, pb.inv.GetItemRequest(), metadata=md("delays", sid), timeout=0.05)
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    (entry,) = _wait_for_entries(server, "delays", sid, 1)
    assert (entry.code, entry.message) in ENDED_BY_DEADLINE


def test_fault_drop_leaves_it_to_the_clients_deadline(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """``fault: drop`` never answers: the client gets DEADLINE_EXCEEDED when its deadline passes."""
    t0 = time.perf_counter()
    err = fails(inv.Reserve, pb.inv.ReserveRequest(sku="DROP"), metadata=md("faults", sid), timeout=0.8)
    assert time.perf_counter() - t0 >= 0.75
    assert (err.code(), err.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert _reserve(inv, pb, "faults", sid, sku="ok").reservation_id == "still-serving"
    entry = _wait_for_entries(server, "faults", sid, 2)[0]
    assert (entry.code, entry.message) in ENDED_BY_DEADLINE


def test_fault_garbage_fails_to_parse_on_the_client(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``fault: garbage`` sends bytes no parser accepts: grpcio reports INTERNAL, failing to deserialise."""
    err = fails(
        inv.Reserve, pb.inv.ReserveRequest(sku="GARBAGE"), metadata=md("faults", sid), timeout=TIMEOUT
    )
    assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "Exception deserializing response!")
    assert _reserve(inv, pb, "faults", sid, sku="ok").reservation_id == "still-serving"


def test_fault_reset_ends_the_call_and_the_server_keeps_serving(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """``fault: reset`` ends the call abruptly (grpcio reports CANCELLED); the next calls are served."""
    for _ in range(3):
        err = fails(
            inv.Reserve, pb.inv.ReserveRequest(sku="RESET"), metadata=md("faults", sid), timeout=TIMEOUT
        )
        assert (err.code(), err.details()) == (grpc.StatusCode.CANCELLED, "CANCELLED")
        assert _reserve(inv, pb, "faults", sid, sku="ok").reservation_id == "still-serving"
    codes = [(e.code, e.message) for e in server.journal.entries("faults", sid)]
    assert codes == [(grpc.StatusCode.CANCELLED, "fault: reset"), (grpc.StatusCode.OK, "")] * 3


# How the journal records a call the client's deadline ended: the client's RST_STREAM arrives a hair before
# the server's copy of the deadline passes, which the server counts as the deadline too.
ENDED_BY_DEADLINE = {(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline expired")}


def _wait_for_entries(server: VirtualServer, scenario: str, session: str, n: int) -> list[Any]:
    """A cancelled call is journaled when the server notices; wait briefly for it."""
    deadline = time.monotonic() + 3
    while True:
        entries = server.journal.entries(scenario, session)
        if len(entries) >= n or time.monotonic() > deadline:
            return sorted(entries, key=lambda e: e.started_at)
        time.sleep(0.01)


# -- rich errors, headers and trailers --------------------------------------------------------------------


def test_rich_error_details_readable_with_grpcio_status(pb: SimpleNamespace, pay: Any, sid: str) -> None:
    """Details decode with grpcio-status (RetryInfo, ErrorInfo); the rule's metadata arrives too."""
    err = fails(pay.Charge, pb.pay.ChargeRequest(account="acct-9"), metadata=md("rich", sid), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert err.details() == "provider busy for acct-9"
    status = rpc_status.from_call(err)
    assert status is not None
    assert (status.code, status.message) == (grpc.StatusCode.UNAVAILABLE.value[0], "provider busy for acct-9")
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(retry) and status.details[1].Unpack(info)
    assert retry.retry_delay.ToTimedelta() == dt.timedelta(seconds=1.5)
    assert (info.reason, info.domain, dict(info.metadata)) == ("BUSY", "pay.example.com", {"shard": "7"})
    assert ("x-rich-header", "early") in err.initial_metadata()
    assert ("x-rich-trailer", "late-acct-9") in err.trailing_metadata()


def test_status_by_number_and_by_name(pb: SimpleNamespace, pay: Any, inv: Any, sid: str) -> None:
    """A status code may be written as a number (7) or a name (NOT_FOUND); the message is a template."""
    err = fails(pay.Refund, pb.pay.RefundRequest(), metadata=md("rich", sid), timeout=TIMEOUT)
    assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, "refunds need a human")
    assert rpc_status.from_call(err) is None  # no details: no grpc-status-details-bin
    err = fails(inv.GetItem, pb.inv.GetItemRequest(sku="Q-1"), metadata=md("rich", sid), timeout=TIMEOUT)
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "no item Q-1")


def test_headers_and_trailers_reach_the_client(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``headers`` arrive as initial metadata and ``trailers`` as trailing metadata, templates rendered."""
    reply, call = inv.Reserve.with_call(
        pb.inv.ReserveRequest(), metadata=md("rich", sid, x_tenant="acme"), timeout=TIMEOUT
    )
    assert reply.reservation_id == "with-metadata"
    initial = dict(call.initial_metadata())
    assert (initial["x-served-by"], initial["x-tenant-echo"]) == ("virtsvc", "acme")
    assert dict(call.trailing_metadata())["x-trace-id"] == "trace-1"


# -- templates --------------------------------------------------------------------------------------------

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def _near_now(moment: dt.datetime) -> bool:
    return abs((dt.datetime.now(dt.timezone.utc) - moment).total_seconds()) < 60


def test_templates_read_request_fields_metadata_and_convert(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """Templates read request fields (proto and JSON names), metadata; text fills int32, Timestamp."""
    reply = inv.Reserve(
        pb.inv.ReserveRequest(sku="ABC-1", qty=4, order_id="o-7"),
        metadata=md("tmpl", sid, x_tenant="acme"),
        timeout=TIMEOUT,
    )
    assert reply.reservation_id == "ABC-1|o-7|o-7|acme"
    assert reply.qty_reserved == 8
    assert _near_now(reply.expires_at.ToDatetime(tzinfo=dt.timezone.utc))


def test_single_expressions_session_and_type_conversions(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """One-expression values (list, object, number), text to enum, session.id and session.calls."""

    def get(sku: str) -> Any:
        return inv.GetItem(pb.inv.GetItemRequest(sku=sku), metadata=md("tmpl", sid), timeout=TIMEOUT)

    first, second = get("BX-12-Q"), get("A-1")
    assert (first.sku, second.sku) == (f"{sid}#1", f"{sid}#2")
    assert first.on_hand == 7 and second.on_hand == 3
    assert first.availability == pb.inv.Item.BACKORDER and second.availability == pb.inv.Item.IN_STOCK
    assert list(first.tags) == ["BX", "12", "Q"]
    assert (first.dimensions.width_cm, first.dimensions.height_cm) == (1.5, 7.0)


def test_now_is_rfc3339_near_now(pb: SimpleNamespace, pay: Any, sid: str) -> None:
    """``now()`` renders the current UTC time as RFC 3339 text, and fills a Timestamp field."""
    reply = pay.Charge(pb.pay.ChargeRequest(), metadata=md("tmpl", sid), timeout=TIMEOUT)
    assert RFC3339.match(reply.charge_id), reply.charge_id
    assert _near_now(dt.datetime.fromisoformat(reply.charge_id.replace("Z", "+00:00")))
    assert _near_now(reply.charged_at.ToDatetime(tzinfo=dt.timezone.utc))
    assert reply.outcome == pb.pay.ChargeResponse.APPROVED


def test_lists_and_objects_from_the_request(pb: SimpleNamespace, orders: Any, sid: str) -> None:
    """``"{{ request.lines }}"`` fills a repeated message field, an object fills a message, text an enum."""
    lines = [
        pb.orders.OrderLine(sku="A", qty=2, unit_price=pb.money.Money(currency_code="EUR", units=250)),
        pb.orders.OrderLine(sku="B", qty=1),
    ]
    order = orders.PlaceOrder(
        pb.orders.PlaceOrderRequest(customer_id="cu-1", lines=lines),
        metadata=md("tmpl", sid),
        timeout=TIMEOUT,
    )
    assert order.order_id == "o-cu-1"
    assert list(order.lines) == lines
    assert order.total == pb.money.Money(currency_code="EUR", units=250)
    assert order.state == pb.orders.Order.CONFIRMED
    single = orders.PlaceOrder(
        pb.orders.PlaceOrderRequest(lines=lines[:1]), metadata=md("tmpl", sid), timeout=TIMEOUT
    )
    assert single.state == pb.orders.Order.PENDING


def test_index_in_a_stream_and_bool_conversion(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``index`` is the position in a server stream; a rendered "True"/"False" fills a bool field."""
    events = list(
        inv.Watch(pb.inv.WatchRequest(skus=["S0", "S1"]), metadata=md("tmpl", sid), timeout=TIMEOUT)
    )
    assert [e.sku for e in events] == ["S0#0", "S1#1"]
    assert [e.discontinued for e in events] == [False, True]


def test_random_helpers_repeat_per_session_across_restarts(catalog: Catalog, pb: SimpleNamespace) -> None:
    """uuid() and randint() repeat per session id on a fresh server and differ across sessions."""

    def titles(sessions: list[str]) -> list[str]:
        with (
            VirtualServer(catalog, load_scenarios([ENGINE], catalog)) as srv,
            grpc.insecure_channel(srv.address) as ch,
        ):
            stub = pb.inv_grpc.InventoryStub(ch)
            return [
                stub.GetItem(pb.inv.GetItemRequest(sku="A"), metadata=md("tmpl", s), timeout=TIMEOUT).title
                for s in sessions
            ]

    first = titles(["seeded-1", "seeded-2"])
    second = titles(["seeded-2", "seeded-1"])
    assert first == second[::-1]
    assert first[0] != first[1]
    uid, number = first[0].split("|")
    assert uuid.UUID(uid).version == 4
    assert 1 <= int(number) <= 1_000_000_000


# -- each RPC kind ----------------------------------------------------------------------------------------


def test_server_stream_per_item_delays(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """A server stream sends each item after its own delay: item 2 arrives after both delays (60ms + 60ms)."""
    t0 = time.perf_counter()
    arrivals = []
    for event in inv.Watch(pb.inv.WatchRequest(skus=["x"]), metadata=md("streams", sid), timeout=TIMEOUT):
        arrivals.append((event.sku, time.perf_counter() - t0))
    assert [sku for sku, _ in arrivals] == ["one", "two", "three"]
    assert arrivals[0][1] >= 0.06
    assert arrivals[1][1] >= 0.12


def test_server_stream_ends_with_a_non_ok_status(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """A stream's final status may fail the call after its messages were delivered."""
    received = []
    call = inv.Watch(pb.inv.WatchRequest(skus=["BROKEN", "x"]), metadata=md("streams", sid), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        for event in call:
            received.append(event.sku)
    assert received == ["first", "second"]
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.DATA_LOSS, "feed lost after 2 skus")
    status = rpc_status.from_call(info.value)
    assert status is not None
    error = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(error)
    assert (error.reason, error.domain) == ("FEED_LOST", "stock.example.com")


def test_client_stream_matches_on_the_first_message(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``when.request`` looks at the first message of a client stream; templates see them all."""
    counts = [
        pb.inv.StockCount(sku="FIRST"),
        pb.inv.StockCount(sku="B", warehouse="ams"),
        pb.inv.StockCount(sku="LAST"),
    ]
    summary = inv.BulkUpdate(iter(counts), metadata=md("streams", sid), timeout=TIMEOUT)
    assert summary == pb.inv.BulkUpdateSummary(accepted=3, rejected_skus=["FIRST", "LAST", "ams"])
    later = [pb.inv.StockCount(sku="A"), pb.inv.StockCount(sku="FIRST")]
    assert inv.BulkUpdate(iter(later), metadata=md("streams", sid), timeout=TIMEOUT).rejected == 2


def test_bidi_each_request_answers_as_messages_arrive(pb: SimpleNamespace, orders: Any, sid: str) -> None:
    """each_request answers each bidi message before the next is sent; index counts them."""
    answered: queue.Queue[None] = queue.Queue()

    def requests() -> Iterator[Any]:
        for i, text in enumerate(["echo a", "b", "c"]):
            yield pb.orders.TrackRequest(order_id=f"o-{i}", text=text)
            answered.get(timeout=TIMEOUT)

    updates = []
    for update in orders.Track(requests(), metadata=md("streams", sid), timeout=TIMEOUT):
        updates.append((update.order_id, update.text, update.state))
        answered.put(None)
    shipped = pb.orders.Order.SHIPPED
    assert updates == [("o-0", "0:ECHO A", shipped), ("o-1", "1:B", shipped), ("o-2", "2:C", shipped)]


def test_bidi_server_speaks_first(pb: SimpleNamespace, orders: Any, sid: str) -> None:
    """A bidi rule that needs no request answers before the client sends anything."""
    first_reply: queue.Queue[None] = queue.Queue()

    def requests() -> Iterator[Any]:
        first_reply.get(timeout=TIMEOUT)  # send only once the server has spoken
        yield pb.orders.TrackRequest(text="hello yourself")

    texts = []
    for update in orders.Track(requests(), metadata=md("speaks-first", sid), timeout=TIMEOUT):
        texts.append(update.text)
        first_reply.put(None)
    assert texts == ["welcome", "second 1"]


def test_bidi_plain_stream(server: VirtualServer, pb: SimpleNamespace, orders: Any, sid: str) -> None:
    """A bidi rule with a ``stream`` sends its messages and reads the client's to the end before OK."""
    requests = [pb.orders.TrackRequest(text="hi"), pb.orders.TrackRequest(text="there")]
    updates = list(orders.Track(iter(requests), metadata=md("streams", sid), timeout=TIMEOUT))
    assert [u.text for u in updates] == ["hello", "bye 1"]
    entry = server.journal.entries("streams", sid)[-1]
    assert [r["text"] for r in entry.requests()] == ["hi", "there"]
    assert entry.code is grpc.StatusCode.OK


# -- Python scripts ---------------------------------------------------------------------------------------


def test_script_handler_keeps_state_per_session_and_aborts(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """A Python handler keeps state per session in ``virtsvc.session()`` and may abort with a status."""
    assert _reserve(inv, pb, "interop", sid, qty=4) == pb.inv.ReserveResponse(
        reservation_id="r-4", qty_reserved=4
    )
    assert _reserve(inv, pb, "interop", sid, qty=3).reservation_id == "r-7"
    assert _reserve(inv, pb, "interop", sid + "-other", qty=2).reservation_id == "r-2"
    err = fails(_reserve, inv, pb, "interop", sid, qty=5)
    assert (err.code(), err.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "only 10 units, 12 asked")
    assert inv.Ping(empty_pb2.Empty(), metadata=md("interop", sid), timeout=TIMEOUT) == empty_pb2.Empty()


def test_script_server_streaming_handler(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """A generator handler streams what it yields."""
    events = list(
        inv.Watch(pb.inv.WatchRequest(skus=["a", "b", "c"]), metadata=md("interop", sid), timeout=TIMEOUT)
    )
    assert [(e.sku, e.on_hand) for e in events] == [("a", 10), ("b", 9), ("c", 8)]


def test_script_handler_that_raises_answers_internal(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """A handler that raises answers INTERNAL with the handler, its rule's file:line and the error."""
    err = fails(inv.GetItem, pb.inv.GetItemRequest(sku="Q"), metadata=md("scripted", sid), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.INTERNAL
    assert err.details() == (
        f"the scenario handler explode (rule at {at(SCRIPTED, 'explode')}) raised "
        "ValueError: no stock data for Q"
    )
    assert server.journal.entries("scripted", sid)[-1].code is grpc.StatusCode.INTERNAL


def test_script_client_streaming_and_bidi_handlers(
    pb: SimpleNamespace, inv: Any, orders: Any, sid: str
) -> None:
    """Handlers get the request iterator for client streams and bidi, and bidi state lasts the session."""
    counts = [pb.inv.StockCount(sku=s) for s in ("a", "b", "c")]
    summary = inv.BulkUpdate(iter(counts), metadata=md("scripted", sid), timeout=TIMEOUT)
    assert summary == pb.inv.BulkUpdateSummary(accepted=3, rejected_skus=["c", "b", "a"])

    def track(texts: list[str]) -> list[str]:
        requests = iter(pb.orders.TrackRequest(text=t) for t in texts)
        return [u.text for u in orders.Track(requests, metadata=md("scripted", sid), timeout=TIMEOUT)]

    assert track(["x", "y"]) == ["1:x", "2:y"]
    assert track(["z"]) == ["3:z"]


# -- the journal ------------------------------------------------------------------------------------------


def test_journal_records_every_call(server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """The journal keeps method, metadata, request, reply, status, rule or near miss, duration, version."""
    assert _reserve(inv, pb, "journal", sid, sku="ABC", qty=2).reservation_id == "j-ABC"
    err = fails(
        inv.Reserve,
        pb.inv.ReserveRequest(sku="ABC", qty=11),
        metadata=md("journal", sid, x_tenant="t"),
        timeout=TIMEOUT,
    )
    ok, missed = server.journal.entries("journal", sid)
    assert ok.method == "shop.v1.Inventory/Reserve"
    assert ("x-virtsvc-session", sid) in ok.metadata
    assert ok.requests() == [{"sku": "ABC", "qty": 2}]
    assert ok.replies() == [{"reservationId": "j-ABC"}]
    assert (ok.code, ok.message, ok.near_miss) == (grpc.StatusCode.OK, "", None)
    assert ok.rule == at(ENGINE, "journal-reserve")
    assert ok.duration > 0 and ok.scenario_version == "v2"
    assert dict(missed.metadata)["x-tenant"] == "t"
    assert (missed.code, missed.rule) == (grpc.StatusCode.UNIMPLEMENTED, None)
    assert missed.message == missed.near_miss == err.details()
    assert missed.near_miss.endswith("request.qty: expected <= 10, got 11")
    as_dict = missed.to_dict()
    assert (as_dict["request"], as_dict["reply"], as_dict["code"]) == (
        {"sku": "ABC", "qty": 11},
        None,
        "UNIMPLEMENTED",
    )
    assert server.journal.entries("journal", sid, method="/shop.v1.Inventory/Reserve", limit=1) == [missed]
    assert server.journal.entries("journal", sid, method="shop.v1.Inventory/GetItem") == []
    _reserve(inv, pb, "seq", sid, sku="CYCLE")
    assert server.journal.entries("seq", sid)[0].scenario_version == 7


def test_journal_records_every_message_of_streams(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """Client-streaming requests and server-streaming replies are all journaled."""
    inv.BulkUpdate(
        iter([pb.inv.StockCount(sku="FIRST"), pb.inv.StockCount(sku="X")]),
        metadata=md("streams", sid),
        timeout=TIMEOUT,
    )
    entry = server.journal.entries("streams", sid, method="shop.v1.Inventory/BulkUpdate")[0]
    assert entry.requests() == [{"sku": "FIRST"}, {"sku": "X"}]
    assert entry.rule == at(ENGINE, "bulk-first")
    with pytest.raises(grpc.RpcError):
        list(inv.Watch(pb.inv.WatchRequest(skus=["BROKEN"]), metadata=md("streams", sid), timeout=TIMEOUT))
    watch = server.journal.entries("streams", sid, method="shop.v1.Inventory/Watch")[0]
    assert watch.replies() == [{"sku": "first"}, {"sku": "second"}]
    assert (watch.code, watch.message) == (grpc.StatusCode.DATA_LOSS, "feed lost after 1 skus")


def test_journal_is_bounded(catalog: Catalog, pb: SimpleNamespace) -> None:
    """``journal_size=5`` keeps the five newest entries of a session."""
    with (
        VirtualServer(catalog, load_scenarios([ENGINE], catalog), journal_size=5) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb.inv_grpc.InventoryStub(ch)
        for i in range(8):
            stub.Reserve(pb.inv.ReserveRequest(sku=f"S{i}"), metadata=md("journal", "j"), timeout=TIMEOUT)
        entries = srv.journal.entries("journal", "j")
    assert [e.requests()[0]["sku"] for e in entries] == ["S3", "S4", "S5", "S6", "S7"]


def test_binary_metadata_is_sent_as_bytes(catalog: Catalog, tmp_path: Path) -> None:
    """`-bin` headers and trailers are written as base64 text (padding optional) and arrive as bytes."""
    path = tmp_path / "bin.yaml"
    path.write_text(
        "scenario: bin\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: b}\n"
        "    headers: {x-blob-bin: AAEC}\n    trailers: {x-trace-bin: /w}\n"
    )
    spec = catalog.method("shop.v1.Inventory/Reserve")
    with (
        VirtualServer(catalog, load_scenarios([path], catalog)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        call = channel.unary_unary(spec.path)
        _, outcome = call.with_call(
            spec.input_class(sku="x").SerializeToString(), metadata=[("x-virtsvc-scenario", "bin")]
        )
        assert dict(outcome.initial_metadata())["x-blob-bin"] == b"\x00\x01\x02"
        assert dict(outcome.trailing_metadata())["x-trace-bin"] == b"\xff"


# -- the fixed-reply fast path: which rules take it (behaviour is the same either way; tested above)

_PLAIN_CASES = [
    ("reply: {reservation_id: r-1}", True),
    ("status: {code: OK}", True),
    ("reply: {reservation_id: 'r-{{ request.sku }}'}", False),
    ("when: {request: {sku: A}}\n    reply: {reservation_id: r-1}", False),
    ("times: 1\n    reply: {reservation_id: r-1}", False),
    ("delay: 5ms\n    reply: {reservation_id: r-1}", False),
    ("fault: reset", False),
    ("trailers: {x-k: v}\n    reply: {reservation_id: r-1}", True),  # fixed metadata is part of the plan
    ("headers: {x-k: v}\n    reply: {reservation_id: r-1}", True),
    ("headers: {x-k: '{{ request.sku }}'}\n    reply: {reservation_id: r-1}", False),
    ("status: {code: NOT_FOUND, message: gone}", False),
    ("sequence:\n      - reply: {reservation_id: a}\n      - reply: {reservation_id: b}", False),
]


@pytest.mark.parametrize(("body", "plain"), _PLAIN_CASES)
def test_which_rules_have_a_fixed_plan(catalog: Catalog, body: str, plain: bool) -> None:
    from virtsvc.scenarios import compile_text

    text = f"scenario: p\nrules:\n  - method: shop.v1.Inventory/Reserve\n    {body}\n"
    (scenario,) = compile_text(text, catalog)
    rule = scenario.rules[0]
    assert (rule.plan is not None) is plain, rule.plan
    if plain:
        step = rule.steps[0]
        assert rule.plan.reply == (step.body.static if step.body is not None else b"")
        planned = rule.plan.headers + rule.plan.trailers
        assert [k for k, _ in planned] == [k for k, _ in step.headers + step.trailers]


def test_fixed_replies_remember_requests_that_parse_and_only_those(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtsvc.engine import pipeline as handlers

    monkeypatch.setattr(handlers, "_PARSED", {})
    monkeypatch.setattr(handlers, "_PARSED_MAX", 3)
    spec = catalog.method("shop.v1.Inventory/Reserve")
    good = [spec.input_class(sku=f"s{i}").SerializeToString() for i in range(4)]
    garbage = b"\x0a"  # a truncated length-delimited field: no parser accepts it
    assert handlers.parses(spec, good[0]) and handlers.parses(spec, good[0])
    assert not handlers.parses(spec, garbage) and not handlers.parses(spec, garbage)
    assert (spec.input_class, garbage) not in handlers._PARSED
    assert (spec.input_class, good[0]) in handlers._PARSED
    for raw in good[1:]:
        assert handlers.parses(spec, raw)
    assert len(handlers._PARSED) <= 3  # emptied when full, never past its bound
    big = spec.input_class(sku="x" * 1000).SerializeToString()
    assert handlers.parses(spec, big) and (spec.input_class, big) not in handlers._PARSED
    # Bytes valid for one method's type say nothing of another's: the key is the message class.
    other = catalog.method("shop.v1.Payments/Charge")
    assert (other.input_class, good[0]) not in handlers._PARSED


_FIXED_SCENARIOS = """\
scenario: fixed
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservation_id: r-fixed}
---
scenario: fixed-kid
extends: fixed
rules: []
"""


def _journaled(entry: Any) -> dict[str, Any]:
    seen = entry.to_dict()
    for varying in ("seq", "started_at", "duration_ms"):
        seen.pop(varying)
    return seen


@pytest.mark.parametrize(
    "metadata",
    [
        (("x-virtsvc-scenario", "fixed"),),
        (("x-virtsvc-scenario", "fixed"), ("x-virtsvc-session", "s-1"), ("x-other", "v")),
        (("x-virtsvc-scenario", "fixed-kid"), ("x-virtsvc-session", "s-2")),
        (("baggage", "virtsvc-scenario=fixed,virtsvc-session=s-3"),),
        (("x-virtsvc-scenario", "fixed"), ("x-blob-bin", b"\x00\x01")),
    ],
    ids=["header", "session", "inherited", "baggage", "binary-metadata"],
)
def test_fixed_replies_answer_and_journal_as_the_full_path_does(
    catalog: Catalog, pb: SimpleNamespace, metadata: tuple[tuple[str, Any], ...]
) -> None:
    """Fixed replies take a one-pass path unless a concurrency limit is set: both answer and journal alike."""
    import dataclasses

    from virtsvc.scenarios import compile_text

    request = pb.inv.ReserveRequest(sku="A-1", qty=2).SerializeToString()
    seen = []
    for limit in (None, 1_000):  # a limit sends every call down the full path
        scenarios = [
            dataclasses.replace(s, version=f"v-{s.name}")
            for s in compile_text(_FIXED_SCENARIOS, catalog, "fixed.yaml")
        ]
        with (
            VirtualServer(catalog, scenarios, max_concurrency=limit) as srv,
            grpc.insecure_channel(srv.address) as ch,
        ):
            reply = ch.unary_unary("/shop.v1.Inventory/Reserve")(request, metadata=metadata)
            assert pb.inv.ReserveResponse.FromString(reply).reservation_id == "r-fixed"
            (entry,) = srv.journal.entries()
            assert entry.rule == "fixed.yaml:3" and entry.duration > 0
            seen.append(_journaled(entry))
    assert seen[0] == seen[1]
    assert seen[0]["scenario_version"] == f"v-{seen[0]['scenario']}"


def test_session_rules_and_garbage_are_not_answered_by_the_scenarios_fixed_reply(
    catalog: Catalog, pb: SimpleNamespace
) -> None:
    from virtsvc.scenarios import compile_text

    (own,) = compile_text(
        "scenario: own\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservation_id: r-own}\n",
        catalog,
        "own.yaml",
    )
    scenarios = compile_text(_FIXED_SCENARIOS, catalog, "fixed.yaml")
    with VirtualServer(catalog, scenarios) as srv, grpc.insecure_channel(srv.address) as ch:
        reserve = ch.unary_unary("/shop.v1.Inventory/Reserve")
        srv.store.put_rules("fixed", "mine", RuleSet(own.rules))
        request = pb.inv.ReserveRequest(sku="A-1").SerializeToString()
        mine = reserve(request, metadata=md("fixed", "mine"))
        theirs = reserve(request, metadata=md("fixed", "theirs"))
        assert pb.inv.ReserveResponse.FromString(mine).reservation_id == "r-own"
        assert pb.inv.ReserveResponse.FromString(theirs).reservation_id == "r-fixed"
        with pytest.raises(grpc.RpcError) as refused:
            reserve(b"\x0a", metadata=md("fixed", "theirs"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
