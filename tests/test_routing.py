"""Routing and sessions through real grpc clients: which scenario answers, whose state it is, and what a call
that cannot be routed is told (texts asserted word for word)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from helpers import fails

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.errors import ConfigError
from virtsvc.scenarios import load_scenarios

ROUTING = Path(__file__).resolve().parent / "scenarios" / "routing.yaml"
TIMEOUT = 5.0
LOADED = "near-miss, route-a, route-b"


def at(marker: str) -> str:
    for number, line in enumerate(ROUTING.read_text().splitlines(), 1):
        if line.rstrip().endswith(f"# rule: {marker}"):
            return f"{ROUTING}:{number}"
    raise AssertionError(f"no rule tagged {marker!r}")


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    with VirtualServer(catalog, load_scenarios([ROUTING], catalog)) as srv:
        yield srv


def reserve(inv: Any, pb: SimpleNamespace, metadata: Any, **fields: Any) -> str:
    return str(
        inv.Reserve(pb.inv.ReserveRequest(**fields), metadata=metadata, timeout=TIMEOUT).reservation_id
    )


def charge(pay: Any, pb: SimpleNamespace, metadata: Any) -> str:
    return str(pay.Charge(pb.pay.ChargeRequest(), metadata=metadata, timeout=TIMEOUT).charge_id)


# -- picking the scenario and the session -----------------------------------------------------------------


def test_scenario_header_picks_the_scenario(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """``x-virtsvc-scenario`` names the scenario that answers; ``x-virtsvc-session`` the session."""
    assert reserve(inv, pb, [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", sid)]) == f"a:{sid}"
    assert reserve(inv, pb, [("x-virtsvc-scenario", "route-b"), ("x-virtsvc-session", sid)]) == f"b:{sid}"


def test_sessions_isolate_sequences_times_and_journal(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, pay: Any, sid: str
) -> None:
    """Two sessions of one scenario each have their own sequence positions, ``times`` counters and journal."""
    one = [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", sid + "-1")]
    two = [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", sid + "-2")]
    assert [charge(pay, pb, one), charge(pay, pb, one)] == ["c-1", "c-2"]
    assert charge(pay, pb, two) == "c-1"
    assert charge(pay, pb, one) == "c-3"
    assert pay.Refund(pb.pay.RefundRequest(), metadata=one, timeout=TIMEOUT).refund_id == "once"
    assert fails(pay.Refund, pb.pay.RefundRequest(), metadata=one, timeout=TIMEOUT).code() is (
        grpc.StatusCode.UNIMPLEMENTED
    )
    assert pay.Refund(pb.pay.RefundRequest(), metadata=two, timeout=TIMEOUT).refund_id == "once"
    assert len(server.journal.entries("route-a", sid + "-1")) == 5
    assert len(server.journal.entries("route-a", sid + "-2")) == 2


def test_no_session_header_is_the_default_session(
    server: VirtualServer, pb: SimpleNamespace, pay: Any
) -> None:
    """Without ``x-virtsvc-session`` a call belongs to session "default", the same as naming it."""
    server.store.reset("route-a", "default")  # only this test uses route-a's default session
    assert charge(pay, pb, [("x-virtsvc-scenario", "route-a")]) == "c-1"
    assert charge(pay, pb, [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", "default")]) == "c-2"
    assert charge(pay, pb, [("x-virtsvc-scenario", "route-a")]) == "c-3"
    assert len(server.journal.entries("route-a", "default")) == 3


def test_baggage_routes_like_the_headers(pb: SimpleNamespace, inv: Any, pay: Any, sid: str) -> None:
    """W3C baggage (properties, percent-encoding, other members) routes exactly like the headers."""
    encoded = f"{sid}%20one%2F%C3%A4"  # "<sid> one/ä"
    baggage = f"user=42, virtsvc-scenario=route-a;ttl=3, virtsvc-session={encoded};prop;x=y,other=1"
    assert reserve(inv, pb, [("baggage", baggage)]) == f"a:{sid} one/ä"
    assert [charge(pay, pb, [("baggage", baggage)]) for _ in range(2)] == ["c-1", "c-2"]
    # the same session through baggage and through the headers: one sequence
    plain = [("baggage", f"virtsvc-scenario=route-a,virtsvc-session={sid}%2Dp")]
    headers = [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", f"{sid}-p")]
    assert [charge(pay, pb, plain), charge(pay, pb, headers), charge(pay, pb, plain)] == ["c-1", "c-2", "c-3"]


def test_explicit_headers_win_over_baggage(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """x-virtsvc-scenario and x-virtsvc-session each win over the baggage entry of the same name."""
    baggage = ("baggage", f"virtsvc-scenario=route-b,virtsvc-session={sid}-bag")
    assert (
        reserve(inv, pb, [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", sid), baggage])
        == f"a:{sid}"
    )
    assert reserve(inv, pb, [("x-virtsvc-scenario", "route-a"), baggage]) == f"a:{sid}-bag"
    assert reserve(inv, pb, [("x-virtsvc-session", sid), baggage]) == f"b:{sid}"


def test_several_baggage_headers_combine(pb: SimpleNamespace, inv: Any, sid: str) -> None:
    """Baggage entries spread over several ``baggage`` headers (as W3C allows) route like one header."""
    metadata = [("baggage", "virtsvc-scenario=route-a"), ("baggage", f"virtsvc-session={sid}")]
    assert reserve(inv, pb, metadata) == f"a:{sid}"


def test_unroutable_call_is_journaled_under_the_names_it_sent(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """A call naming an unknown scenario is journaled under that scenario and its session, with the reason."""
    metadata = [("x-virtsvc-scenario", "zzz"), ("x-virtsvc-session", sid)]
    err = fails(inv.Reserve, pb.inv.ReserveRequest(sku="Q"), metadata=metadata, timeout=TIMEOUT)
    (entry,) = server.journal.entries("zzz", sid)
    assert (entry.code, entry.message, entry.near_miss) == (
        grpc.StatusCode.NOT_FOUND,
        err.details(),
        err.details(),
    )
    assert entry.requests() == [{"sku": "Q"}]


def test_unroutable_baggage_call_is_journaled_like_a_header_call(
    server: VirtualServer, pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """A baggage-routed call naming an unknown scenario is journaled under that scenario and session too."""
    metadata = [("baggage", f"virtsvc-scenario=zzz-bag,virtsvc-session={sid}")]
    err = fails(inv.Reserve, pb.inv.ReserveRequest(), metadata=metadata, timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert [e.message for e in server.journal.entries("zzz-bag", sid)] == [err.details()]


def test_default_scenario_when_configured(catalog: Catalog, pb: SimpleNamespace) -> None:
    """With ``default_scenario`` a call naming no scenario goes to it; naming one still picks that one."""
    with (
        VirtualServer(catalog, load_scenarios([ROUTING], catalog), default_scenario="route-b") as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb.inv_grpc.InventoryStub(ch)
        assert reserve(stub, pb, []) == "b:default"
        assert reserve(stub, pb, [("x-virtsvc-session", "s9")]) == "b:s9"
        assert reserve(stub, pb, [("x-virtsvc-scenario", "route-a")]) == "a:default"
        err = fails(
            stub.Reserve, pb.inv.ReserveRequest(), metadata=[("x-virtsvc-scenario", "nope")], timeout=TIMEOUT
        )
        assert (err.code(), err.details()) == (
            grpc.StatusCode.NOT_FOUND,
            f'unknown scenario "nope"; loaded scenarios: {LOADED}',
        )


def test_default_scenario_must_be_loaded(catalog: Catalog) -> None:
    """A default scenario that is not loaded is refused at construction, listing the loaded ones."""
    with pytest.raises(ConfigError) as info:
        VirtualServer(catalog, load_scenarios([ROUTING], catalog), default_scenario="route-c")
    assert str(info.value) == f'default scenario "route-c" is not loaded; loaded scenarios: {LOADED}'


# -- calls that cannot be routed or answered --------------------------------------------------------------


def test_no_scenario_is_failed_precondition_naming_the_header(
    server: VirtualServer, pb: SimpleNamespace, inv: Any
) -> None:
    """No scenario and no default: FAILED_PRECONDITION naming the header and listing the loaded scenarios."""
    err = fails(inv.Reserve, pb.inv.ReserveRequest(), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (
        'no scenario selected: send the metadata header "x-virtsvc-scenario: NAME" '
        '(or baggage "virtsvc-scenario=NAME"), or start the server with a default scenario; '
        f"loaded scenarios: {LOADED}"
    )
    err = fails(
        inv.Reserve, pb.inv.ReserveRequest(), metadata=[("baggage", "virtsvc-session=x")], timeout=TIMEOUT
    )
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_scenario_is_not_found_with_the_closest_names(pb: SimpleNamespace, inv: Any) -> None:
    """An unknown scenario: NOT_FOUND naming it, the closest known names and the loaded scenarios."""
    err = fails(
        inv.Reserve, pb.inv.ReserveRequest(), metadata=[("x-virtsvc-scenario", "rout-a")], timeout=TIMEOUT
    )
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == (
        f'unknown scenario "rout-a"; did you mean "route-a" or "route-b"?; loaded scenarios: {LOADED}'
    )
    err = fails(
        inv.Reserve, pb.inv.ReserveRequest(), metadata=[("baggage", "virtsvc-scenario=zzz")], timeout=TIMEOUT
    )
    assert (err.code(), err.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f'unknown scenario "zzz"; loaded scenarios: {LOADED}',
    )


def test_no_rule_for_the_method(pb: SimpleNamespace, pay: Any, sid: str) -> None:
    """A method the scenario has no rule for: UNIMPLEMENTED listing the methods its rules cover."""
    err = fails(
        pay.Refund,
        pb.pay.RefundRequest(),
        metadata=[("x-virtsvc-scenario", "route-b"), ("x-virtsvc-session", sid)],
        timeout=TIMEOUT,
    )
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == (
        f'no rule for shop.v1.Payments/Refund in scenario "route-b", session "{sid}"; '
        "its rules cover: shop.v1.Inventory/Reserve"
    )


def test_no_rule_matched_names_the_closest_rule_and_condition(
    pb: SimpleNamespace, inv: Any, sid: str
) -> None:
    """No match: UNIMPLEMENTED naming the closest rule's file:line, the count and failed conditions."""
    err = fails(
        inv.Reserve,
        pb.inv.ReserveRequest(sku="ABC-1", qty=12),
        metadata=[("x-virtsvc-scenario", "near-miss"), ("x-virtsvc-session", sid)],
        timeout=TIMEOUT,
    )
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == (
        f'no rule matched shop.v1.Inventory/Reserve in scenario "near-miss", session "{sid}"\n'
        f"  closest: rule at {at('near-sku')} (1 of 2 conditions held): request.qty: expected <= 10, got 12\n"
        f"  also: rule at {at('near-meta')} (0 of 2 conditions held): "
        'request.region: expected "REGION_EU", got nothing; metadata.x-tenant: expected "vip", got nothing'
    )
    err = fails(
        inv.Reserve,
        pb.inv.ReserveRequest(sku="XYZ", qty=1),
        metadata=[("x-virtsvc-scenario", "near-miss"), ("x-virtsvc-session", sid)],
        timeout=TIMEOUT,
    )
    assert err.details().splitlines()[1] == (
        f"  closest: rule at {at('near-sku')} (1 of 2 conditions held): "
        'request.sku: expected "ABC-1", got "XYZ"'
    )


def test_used_up_rule_is_reported_as_used_up(pb: SimpleNamespace, pay: Any, sid: str) -> None:
    """A rule past its ``times`` is reported as "matched but used up", not as a rule that did not match."""
    metadata = [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", sid)]
    pay.Refund(pb.pay.RefundRequest(), metadata=metadata, timeout=TIMEOUT)
    err = fails(pay.Refund, pb.pay.RefundRequest(), metadata=metadata, timeout=TIMEOUT)
    line = next(n for n, text in enumerate(ROUTING.read_text().splitlines(), 1) if "times: 1" in text) - 1
    assert err.details() == (
        f'no rule matched shop.v1.Payments/Refund in scenario "route-a", session "{sid}"\n'
        f"  used up: rule at {ROUTING}:{line} matched but is used up (times=1)"
    )


# -- session lifetime -------------------------------------------------------------------------------------


def test_reset_restarts_the_session(server: VirtualServer, pb: SimpleNamespace, pay: Any, sid: str) -> None:
    """``store.reset`` drops a session: sequences and ``times`` start over and its journal is cleared."""
    metadata = [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", sid)]
    assert [charge(pay, pb, metadata), charge(pay, pb, metadata)] == ["c-1", "c-2"]
    pay.Refund(pb.pay.RefundRequest(), metadata=metadata, timeout=TIMEOUT)
    assert server.store.reset("route-a", sid) is True
    assert server.journal.entries("route-a", sid) == []
    assert charge(pay, pb, metadata) == "c-1"
    assert pay.Refund(pb.pay.RefundRequest(), metadata=metadata, timeout=TIMEOUT).refund_id == "once"


def test_idle_sessions_expire_after_the_ttl(catalog: Catalog, pb: SimpleNamespace) -> None:
    """Sessions idle for longer than ``session_ttl`` are dropped by ``store.expire``; busy ones are kept."""
    with (
        VirtualServer(catalog, load_scenarios([ROUTING], catalog), session_ttl=30) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb.pay_grpc.PaymentsStub(ch)
        metadata = [("x-virtsvc-scenario", "route-a"), ("x-virtsvc-session", "idle")]
        assert [charge(stub, pb, metadata), charge(stub, pb, metadata)] == ["c-1", "c-2"]
        assert srv.store.expire(now=time.monotonic() + 10) == 0
        assert charge(stub, pb, metadata) == "c-3"
        assert srv.store.expire(now=time.monotonic() + 31) == 1
        assert len(srv.store) == 0
        assert srv.journal.entries("route-a", "idle") == []
        assert charge(stub, pb, metadata) == "c-1"


def test_lookup_is_indexed_by_scenario_and_method(catalog: Catalog, pb: SimpleNamespace) -> None:
    """With 2,000 scenarios a call is answered right; the registry yields only its (scenario, method)."""
    docs = [
        f"scenario: bulk-{i:04d}\nrules:\n"
        f"  - method: shop.v1.Inventory/Reserve\n    reply: {{reservationId: r-{i}}}\n"
        f"  - method: shop.v1.Inventory/GetItem\n    reply: {{title: t-{i}}}\n"
        for i in range(2000)
    ]
    from virtsvc.scenarios import compile_text

    scenarios = compile_text("---\n".join(docs), catalog, origin="bulk.yaml")
    with VirtualServer(catalog, scenarios) as srv, grpc.insecure_channel(srv.address) as ch:
        assert len(srv.registry) == 2000
        stub = pb.inv_grpc.InventoryStub(ch)
        for i in (0, 1234, 1999):
            assert reserve(stub, pb, [("x-virtsvc-scenario", f"bulk-{i:04d}")]) == f"r-{i}"
            title = stub.GetItem(
                pb.inv.GetItemRequest(), metadata=[("x-virtsvc-scenario", f"bulk-{i:04d}")], timeout=TIMEOUT
            ).title
            assert title == f"t-{i}"
        rules = srv.registry.rules_for("bulk-1234", "shop.v1.Inventory/Reserve")
        assert [(r.scenario, r.method, str(r.location)) for r in rules] == [
            ("bulk-1234", "shop.v1.Inventory/Reserve", f"bulk.yaml:{1234 * 7 + 3}")
        ]
        assert srv.registry.rules_for("bulk-1234", "shop.v1.Payments/Charge") == ()
        assert srv.registry.methods_of("bulk-1234") == [
            "shop.v1.Inventory/GetItem",
            "shop.v1.Inventory/Reserve",
        ]
