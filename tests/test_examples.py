"""The documented examples in ``scenarios/``: ``virtsvc check`` passes on them, the README links each one, and
each answers, through a real grpc client, what its comments (and the README) say it does."""

from __future__ import annotations

import datetime as dt
import os
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

from virtsvc import VirtualServer, cli
from virtsvc.contracts import Catalog
from virtsvc.scenarios import check_paths, load_scenarios

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
EXAMPLES = sorted(p.name for p in SCENARIOS.iterdir() if p.suffix in (".yaml", ".py"))
TIMEOUT = 5.0


def rule_lines(name: str, method: str) -> list[str]:
    """``scenarios/NAME:LINE`` of each rule for ``method`` in an example, in file order."""
    text = (SCENARIOS / name).read_text().splitlines()
    return [
        f"scenarios/{name}:{n}" for n, line in enumerate(text, 1) if line.strip() == f"- method: {method}"
    ]


def md(scenario: str, session: str, **extra: str) -> list[tuple[str, str]]:
    return [
        ("x-virtsvc-scenario", scenario),
        ("x-virtsvc-session", session),
        *((k.replace("_", "-"), v) for k, v in extra.items()),
    ]


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    """Every example served at once, loaded as ``virtsvc serve`` run from the repository root loads them (so
    locations read ``scenarios/FILE:LINE``)."""
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        scenarios = load_scenarios([Path("scenarios")], catalog)
    finally:
        os.chdir(here)
    with VirtualServer(catalog, scenarios) as srv:
        yield srv


# -- the examples as a set --------------------------------------------------------------------------------


def test_virtsvc_check_passes_on_the_examples(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``virtsvc check --protos protos scenarios`` from the repository root exits 0 and says so."""
    monkeypatch.chdir(ROOT)
    assert cli.main(["check", "--protos", "protos", "scenarios"]) == 0
    scenarios = load_scenarios([SCENARIOS], catalog)
    rules = sum(len(s.rules) for s in scenarios)
    assert capsys.readouterr().out == f"checked {len(scenarios)} scenarios, {rules} rules: ok\n"
    assert check_paths([SCENARIOS], catalog) == []


def test_every_example_is_documented_and_in_the_readme() -> None:
    """Each example opens with a comment (scripts: a docstring) and the README table links it."""
    readme = (ROOT / "README.md").read_text()
    assert len(EXAMPLES) >= 11
    for name in EXAMPLES:
        first = (SCENARIOS / name).read_text().splitlines()[0]
        assert first.startswith("# " if name.endswith(".yaml") else '"""'), name
        assert f"(scenarios/{name})" in readme, name


def test_each_feature_has_its_example(server: VirtualServer) -> None:
    """Every scenario the tests below call is loaded from ``scenarios/``, one per README feature."""
    assert set(server.registry.names()) >= {
        "bulk-update",
        "checkout-happy",
        "faults",
        "held-streams",
        "interop",
        "inventory-watch",
        "latency",
        "limits",
        "matching",
        "orders-track",
        "payments-retry",
        "stock-base",
        "stock-discontinued",
    }


# -- one test per example ---------------------------------------------------------------------------------


def test_checkout_happy_reserve(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """checkout-happy: Reserve ABC-1 x3 answers r-ABC-1-3 (README), its header and a uuid trailer."""
    reply, call = inv.Reserve.with_call(
        pb.inv.ReserveRequest(sku="ABC-1", qty=3), metadata=md("checkout-happy", sid), timeout=TIMEOUT
    )
    assert reply.reservation_id == "r-ABC-1-3"
    assert reply.qty_reserved == 3
    assert reply.expires_at.ToJsonString() == "2030-01-01T00:00:00Z"
    assert dict(call.initial_metadata())["x-served-by"] == "virtsvc"
    assert uuid.UUID(dict(call.trailing_metadata())["x-trace-id"]).version == 4


def test_checkout_happy_get_item(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """checkout-happy: GetItem fills every field kind: int64 from text, enum, nested message, list, map."""
    item = inv.GetItem(
        pb.inv.GetItemRequest(sku="CUP-1"), metadata=md("checkout-happy", sid), timeout=TIMEOUT
    )
    assert item == pb.inv.Item(
        sku="CUP-1",
        title="Espresso cup",
        on_hand=12,
        availability=pb.inv.Item.IN_STOCK,
        dimensions=pb.inv.Item.Dimensions(width_cm=8.5, height_cm=6.0, depth_cm=8.5),
        tags=["kitchen", "ceramic"],
        stock_by_warehouse={"ams": 7, "ber": 5},
    )


def test_checkout_happy_charge_and_order(
    pb: SimpleNamespace, pay: Any, orders: Any, inv: Any, sid: str
) -> None:
    """checkout-happy: Charge echoes the key or a uuid at now(); PlaceOrder echoes, totals lines."""
    session = md("checkout-happy", sid)
    charged = pay.Charge(pb.pay.ChargeRequest(idempotency_key="k-1"), metadata=session, timeout=TIMEOUT)
    assert (charged.charge_id, charged.outcome) == ("c-k-1", pb.pay.ChargeResponse.APPROVED)
    age = dt.datetime.now(dt.timezone.utc) - charged.charged_at.ToDatetime(tzinfo=dt.timezone.utc)
    assert abs(age.total_seconds()) < 60
    anonymous = pay.Charge(pb.pay.ChargeRequest(), metadata=session, timeout=TIMEOUT).charge_id
    assert uuid.UUID(anonymous.removeprefix("c-")).version == 4
    lines = [pb.orders.OrderLine(sku="A", qty=2), pb.orders.OrderLine(sku="B", qty=3)]
    order = orders.PlaceOrder(
        pb.orders.PlaceOrderRequest(customer_id="cu-9", lines=lines), metadata=session, timeout=TIMEOUT
    )
    assert order == pb.orders.Order(
        order_id="o-3",
        customer_id="cu-9",
        state=pb.orders.Order.CONFIRMED,
        lines=lines,
        total=pb.money.Money(currency_code="EUR", units=1250),
    )
    assert inv.Ping(empty_pb2.Empty(), metadata=session, timeout=TIMEOUT) == empty_pb2.Empty()


def test_payments_retry(pb: SimpleNamespace, pay: Any, sid: str) -> None:
    """payments-retry: UNAVAILABLE with RetryInfo 0.5s and ErrorInfo (grpcio-status), then c-1."""
    session = md("payments-retry", sid)
    err = fails(pay.Charge, pb.pay.ChargeRequest(), metadata=session, timeout=TIMEOUT)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "payment provider is warming up")
    status = rpc_status.from_call(err)
    assert status is not None and status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(retry) and status.details[1].Unpack(info)
    assert retry.retry_delay.ToJsonString() == "0.500s"
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "PROVIDER_WARMUP",
        "payments.example.com",
        {"provider": "acme-pay"},
    )
    for _ in range(2):
        charged = pay.Charge(pb.pay.ChargeRequest(), metadata=session, timeout=TIMEOUT)
        assert (charged.charge_id, charged.outcome) == ("c-1", pb.pay.ChargeResponse.APPROVED)


def test_payments_retry_refund_sequence_fails_when_exhausted(pb: SimpleNamespace, pay: Any, sid: str) -> None:
    """payments-retry: refunds answer rf-1 then rf-2; the third is FAILED_PRECONDITION (after: fail)."""
    session = md("payments-retry", sid)
    refunds = [pay.Refund(pb.pay.RefundRequest(), metadata=session, timeout=TIMEOUT) for _ in range(2)]
    assert [(r.refund_id, r.ledger_sequence) for r in refunds] == [("rf-1", 1), ("rf-2", 2)]
    err = fails(pay.Refund, pb.pay.RefundRequest(), metadata=session, timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    (rule,) = rule_lines("payments-retry.yaml", "shop.v1.Payments/Refund")
    assert err.details() == (
        f"the sequence of the rule at {rule} is exhausted: it had 2 steps and this is call 3 (after: fail)"
    )


def test_inventory_watch(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """inventory-watch: three stock events in order, each after its delay, then OK."""
    t0 = time.perf_counter()
    events = list(
        inv.Watch(pb.inv.WatchRequest(skus=["ABC-1"]), metadata=md("inventory-watch", sid), timeout=TIMEOUT)
    )
    assert time.perf_counter() - t0 >= 0.01
    assert [(e.sku, e.on_hand, e.WhichOneof("change")) for e in events] == [
        ("ABC-1", 10, "delta"),
        ("ABC-1", 9, "delta"),
        ("ABC-1", 0, "discontinued"),
    ]
    assert [events[0].delta, events[1].delta, events[2].discontinued] == [-1, -1, True]


def test_held_streams(server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """held-streams: Watch sends its item, then is held open, sending what the test pushes until it ends."""
    events = inv.Watch(pb.inv.WatchRequest(skus=["ABC-1"]), metadata=md("held-streams", sid), timeout=TIMEOUT)
    assert next(events).on_hand == 10
    [stream] = server.dispatcher.streams.wait("held-streams", sid, "shop.v1.Inventory/Watch", 1, TIMEOUT)
    assert stream.rule == rule_lines("held-streams.yaml", "shop.v1.Inventory/Watch")[0]
    stream.send({"sku": "ABC-1", "onHand": "9"})
    assert next(events).on_hand == 9
    stream.close()
    assert list(events) == []


def test_bulk_update(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """bulk-update: a quarantine first message rejects the whole stream by SKU; others are counted."""
    counts = [pb.inv.StockCount(sku="A", warehouse="quarantine"), pb.inv.StockCount(sku="B", warehouse="ams")]
    summary = inv.BulkUpdate(iter(counts), metadata=md("bulk-update", sid), timeout=TIMEOUT)
    assert summary == pb.inv.BulkUpdateSummary(accepted=0, rejected=2, rejected_skus=["A", "B"])
    summary = inv.BulkUpdate(iter(counts[::-1] * 2), metadata=md("bulk-update", sid), timeout=TIMEOUT)
    assert summary == pb.inv.BulkUpdateSummary(accepted=4)


def test_orders_track(pb: SimpleNamespace, orders: Any, sid: str) -> None:
    """orders-track: each incoming message is answered with its order id, SHIPPED and its numbered text."""
    requests = [
        pb.orders.TrackRequest(order_id="o-1", text="where is it?"),
        pb.orders.TrackRequest(order_id="o-1", text="thanks"),
    ]
    updates = list(orders.Track(iter(requests), metadata=md("orders-track", sid), timeout=TIMEOUT))
    assert [(u.order_id, u.state, u.text) for u in updates] == [
        ("o-1", pb.orders.Order.SHIPPED, "message 0: WHERE IS IT?"),
        ("o-1", pb.orders.Order.SHIPPED, "message 1: THANKS"),
    ]


def test_matching_rules(pb: SimpleNamespace, inv: Any, pay: Any, sid: str) -> None:
    """matching: metadata with priority, the operators on Reserve, $ne, $contains/$exists and int64 ranges."""
    small = pb.inv.ReserveRequest(sku="ABC-1", qty=5, region=pb.types.REGION_EU, labels={"channel": "web"})
    session = md("matching", sid)
    assert (
        inv.Reserve(small, metadata=md("matching", sid, x_tenant="vip"), timeout=TIMEOUT).reservation_id
        == "vip"
    )
    assert inv.Reserve(small, metadata=session, timeout=TIMEOUT).reservation_id == "small-ABC-1"
    err = fails(inv.Reserve, pb.inv.ReserveRequest(sku="ABC-1", qty=11), metadata=session, timeout=TIMEOUT)
    assert (err.code(), err.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "only 10 left of ABC-1")
    assert inv.GetItem(pb.inv.GetItemRequest(sku="S"), metadata=session, timeout=TIMEOUT).title == "found"
    listed = inv.ListItems(
        pb.inv.ListItemsRequest(tags=["new", "sale"], page={"page_size": 10}),
        metadata=session,
        timeout=TIMEOUT,
    )
    assert [i.sku for i in listed.items] == ["S-1"] and listed.page.total_size == 1

    def refund(units: int) -> Any:
        return pay.Refund(pb.pay.RefundRequest(amount={"units": units}), metadata=session, timeout=TIMEOUT)

    err = fails(refund, 1000)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "refunds of 10.00 or more need approval",
    )
    assert refund(999).refund_id == "rf-auto"
    assert refund(200).refund_id == "rf-auto"  # "200" >= "1000" as text, not as a number


def test_matching_near_miss(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """matching: an unanswered call gets UNIMPLEMENTED naming the closest rule and failed condition."""
    request = pb.inv.ReserveRequest(sku="XYZ", qty=5, region=pb.types.REGION_EU, labels={"channel": "web"})
    err = fails(inv.Reserve, request, metadata=md("matching", sid), timeout=TIMEOUT)
    vip, small, big = rule_lines("matching.yaml", "shop.v1.Inventory/Reserve")
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == (
        f'no rule matched shop.v1.Inventory/Reserve in scenario "matching", session "{sid}"\n'
        f"  closest: rule at {small} (4 of 5 conditions held): "
        'request.sku: expected to match /^ABC-/, got "XYZ"\n'
        f'  also: rule at {vip} (0 of 1 conditions held): metadata.x-tenant: expected "vip", got nothing\n'
        f"  also: rule at {big} (0 of 1 conditions held): request.qty: expected > 10, got 5"
    )
    err = fails(inv.GetItem, pb.inv.GetItemRequest(), metadata=md("matching", sid), timeout=TIMEOUT)
    (get_item,) = rule_lines("matching.yaml", "shop.v1.Inventory/GetItem")
    assert err.details().splitlines()[1] == (
        f'  closest: rule at {get_item} (0 of 1 conditions held): request.sku: expected not "", got nothing'
    )


def test_limits(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """limits: two early-bird reservations per session, then RESOURCE_EXHAUSTED "sold out"."""
    session = md("limits", sid)
    assert [
        inv.Reserve(pb.inv.ReserveRequest(), metadata=session, timeout=TIMEOUT).reservation_id
        for _ in range(2)
    ] == ["early-bird", "early-bird"]
    for _ in range(2):
        err = fails(inv.Reserve, pb.inv.ReserveRequest(), metadata=session, timeout=TIMEOUT)
        assert (err.code(), err.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "sold out")
    assert (
        inv.Reserve(
            pb.inv.ReserveRequest(), metadata=md("limits", sid + "-new"), timeout=TIMEOUT
        ).reservation_id
        == "early-bird"
    )


def test_latency(server: VirtualServer, pb: SimpleNamespace, inv: Any, pay: Any, sid: str) -> None:
    """latency: GetItem waits 25ms, Reserve between 10 and 50ms, Charge a log-normal draw."""
    session = md("latency", sid)
    t0 = time.perf_counter()
    assert inv.GetItem(pb.inv.GetItemRequest(), metadata=session, timeout=TIMEOUT).sku == "fixed"
    assert time.perf_counter() - t0 >= 0.025
    for _ in range(3):
        assert (
            inv.Reserve(pb.inv.ReserveRequest(), metadata=session, timeout=TIMEOUT).reservation_id
            == "uniform"
        )
    assert pay.Charge(pb.pay.ChargeRequest(), metadata=session, timeout=TIMEOUT).charge_id == "lognormal"
    entries = server.journal.entries("latency", sid)
    durations = {e.method.rsplit("/", 1)[1]: [] for e in entries}
    for e in entries:
        durations[e.method.rsplit("/", 1)[1]].append(e.duration)
    assert durations["GetItem"][0] >= 0.025
    assert all(0.01 <= d <= 0.05 + 0.1 for d in durations["Reserve"]), durations
    assert durations["Charge"][0] > 0


def test_faults(server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """faults: drop: DEADLINE_EXCEEDED, garbage: INTERNAL, reset: CANCELLED; other calls answered."""
    session = md("faults", sid)

    def reserve(sku: str, timeout: float = TIMEOUT) -> Any:
        return inv.Reserve(pb.inv.ReserveRequest(sku=sku), metadata=session, timeout=timeout)

    err = fails(reserve, "DROP", timeout=0.5)
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    err = fails(reserve, "GARBAGE")
    assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "Exception deserializing response!")
    err = fails(reserve, "RESET")
    assert err.code() is grpc.StatusCode.CANCELLED
    assert reserve("ANY").reservation_id == "fine"


def test_extends(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """extends: stock-discontinued answers GetItem itself and inherits Reserve from stock-base."""

    def get(scenario: str) -> Any:
        return inv.GetItem(pb.inv.GetItemRequest(sku="OLD-1"), metadata=md(scenario, sid), timeout=TIMEOUT)

    assert get("stock-discontinued") == pb.inv.Item(sku="OLD-1", availability=pb.inv.Item.DISCONTINUED)
    assert get("stock-base") == pb.inv.Item(sku="OLD-1", availability=pb.inv.Item.IN_STOCK, on_hand=5)
    reply = inv.Reserve(pb.inv.ReserveRequest(), metadata=md("stock-discontinued", sid), timeout=TIMEOUT)
    assert reply.reservation_id == "base"


def test_interop_script(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """interop.py: Ping, a per-session running total refusing past 10 units, a Watch stream per SKU."""
    session = md("interop", sid)
    assert inv.Ping(empty_pb2.Empty(), metadata=session, timeout=TIMEOUT) == empty_pb2.Empty()

    def reserve(qty: int) -> Any:
        return inv.Reserve(pb.inv.ReserveRequest(qty=qty), metadata=session, timeout=TIMEOUT)

    assert [reserve(6).reservation_id, reserve(4).reservation_id] == ["r-6", "r-10"]
    err = fails(reserve, 1)
    assert (err.code(), err.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "only 10 units, 11 asked")
    events = list(inv.Watch(pb.inv.WatchRequest(skus=["A", "B"]), metadata=session, timeout=TIMEOUT))
    assert [(e.sku, e.on_hand) for e in events] == [("A", 10), ("B", 9)]
