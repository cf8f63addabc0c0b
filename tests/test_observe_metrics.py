"""Prometheus metrics (``virtsvc.observe.metrics``): ``/metrics`` scraped over HTTP and parsed with
prometheus-client's own parser after known traffic from real grpc clients: exact counts, histogram buckets,
the in-flight gauge during a delayed call, sessions, the journal's drops, and bounded labels."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from virtsvc.contracts import Catalog
from virtsvc.errors import ConfigError
from virtsvc.observe import metrics as metrics_module
from virtsvc.scenarios import compile_text
from virtsvc.server import ServeOptions, VirtualServer

RESERVE = "shop.v1.Inventory/Reserve"
GET_ITEM = "shop.v1.Inventory/GetItem"

RULES = """\
scenario: shop
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: SLOW}}
    delay: 300ms
    reply: {reservationId: slow}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: GONE}}
    status: {code: NOT_FOUND, message: no such sku}
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: r-1}
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: KNOWN}}
    reply: {sku: KNOWN}
"""
OTHER = "scenario: other\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: o}\n"


Scrape = Callable[[], dict[str, Any]]


def _scrape(server: VirtualServer) -> dict[str, Any]:
    """The families of ``/metrics`` by name, as prometheus-client's parser reads them."""
    assert server.metrics_endpoint is not None
    with urllib.request.urlopen(server.metrics_endpoint.url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """A family's samples named ``family.name + suffix``, by their sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix
    }


@pytest.fixture
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    scenarios = [*compile_text(RULES, catalog, origin="shop.yaml"), *compile_text(OTHER, catalog)]
    srv = VirtualServer(catalog, scenarios, port=0, metrics_port=0).start()
    yield srv
    srv.stop(0)


def _md(scenario: str, session: str = "s1") -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session))


def test_calls_are_counted_by_method_scenario_and_code(
    server: VirtualServer, channel_to: Any, pb: SimpleNamespace
) -> None:
    """Known traffic, exact counts: OK, a scripted NOT_FOUND, a near miss, an unknown scenario."""
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    for _ in range(5):
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("shop"))
    inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("other"))
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            inv.Reserve(pb.inv.ReserveRequest(sku="GONE"), metadata=_md("shop"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        inv.GetItem(pb.inv.GetItemRequest(sku="NOPE"), metadata=_md("shop"))
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED  # no rule matched: a near miss
    with pytest.raises(grpc.RpcError):
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("no-such-scenario"))

    families = _scrape(server)
    assert _samples(families["virtsvc_calls"], "_total") == {
        (("code", "OK"), ("method", RESERVE), ("scenario", "shop")): 5.0,
        (("code", "OK"), ("method", RESERVE), ("scenario", "other")): 1.0,
        (("code", "NOT_FOUND"), ("method", RESERVE), ("scenario", "shop")): 2.0,
        (("code", "UNIMPLEMENTED"), ("method", GET_ITEM), ("scenario", "shop")): 1.0,
        # a name no scenario has is never a label of its own
        (("code", "NOT_FOUND"), ("method", RESERVE), ("scenario", "(unknown)")): 1.0,
    }
    assert _samples(families["virtsvc_unmatched_calls"], "_total") == {
        (("method", GET_ITEM), ("scenario", "shop")): 1.0,
        (("method", RESERVE), ("scenario", "(unknown)")): 1.0,
    }
    assert families["virtsvc_calls"].type == "counter"
    assert _samples(families["virtsvc_calls_in_flight"]) == {(): 0.0}
    assert _samples(families["virtsvc_journal_dropped_entries"], "_total") == {(): 0.0}


def test_histograms_bucket_total_time_and_virtsvcs_own(
    server: VirtualServer, channel_to: Any, pb: SimpleNamespace
) -> None:
    """A 300 ms delayed call lands past the 0.25 s bucket of total time, and in virtsvc's own time below
    0.1 s: the overhead histogram is the total less the simulated delay."""
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    assert inv.Reserve(pb.inv.ReserveRequest(sku="SLOW"), metadata=_md("shop")).reservation_id == "slow"
    for _ in range(3):
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("shop"))

    families = _scrape(server)
    labels = (("method", RESERVE), ("scenario", "shop"))
    total = _samples(families["virtsvc_call_duration_seconds"], "_bucket")
    own = _samples(families["virtsvc_overhead_seconds"], "_bucket")
    assert families["virtsvc_call_duration_seconds"].type == "histogram"
    assert total[(("le", "0.25"), *labels)] == 3.0  # the three fast ones
    assert total[(("le", "0.5"), *labels)] == 4.0
    assert total[(("le", "+Inf"), *labels)] == 4.0
    assert [b for b, _ in sorted((float(k[0][1]), v) for k, v in total.items())] == [
        *metrics_module.DURATION_BUCKETS,
        float("inf"),
    ]
    assert own[(("le", "0.1"), *labels)] == 4.0  # the delay is not virtsvc's own time
    counts = _samples(families["virtsvc_call_duration_seconds"], "_count")
    sums = _samples(families["virtsvc_call_duration_seconds"], "_sum")
    own_sums = _samples(families["virtsvc_overhead_seconds"], "_sum")
    assert counts[labels] == 4.0
    assert 0.3 <= sums[labels] < 0.3 + 0.4
    entries = server.journal.entries("shop", "s1")
    assert sums[labels] == pytest.approx(sum(e.duration for e in entries))
    assert own_sums[labels] == pytest.approx(sum(e.duration - e.delay for e in entries))


def test_the_in_flight_gauge_counts_a_delayed_call_while_it_waits(
    server: VirtualServer, channel_to: Any, pb: SimpleNamespace
) -> None:
    """During a slow call the gauge reads 1; once it is answered, 0."""
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    future = inv.Reserve.future(pb.inv.ReserveRequest(sku="SLOW"), metadata=_md("shop"))
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not future.done():
        seen.append(_samples(_scrape(server)["virtsvc_calls_in_flight"])[()])
        if seen[-1] == 1.0:
            break
        time.sleep(0.01)
    assert seen and seen[-1] == 1.0, seen
    assert future.result(timeout=5).reservation_id == "slow"
    assert _samples(_scrape(server)["virtsvc_calls_in_flight"]) == {(): 0.0}


def test_sessions_and_journal_drops_are_read_at_scrape_time(
    catalog: Catalog, channel_to: Any, pb: SimpleNamespace
) -> None:
    """Live sessions from the store; entries dropped by the journal's total bound from the journal."""
    options = ServeOptions(port=0, metrics_port=0, journal_total=2)
    server = VirtualServer(catalog, compile_text(RULES, catalog, origin="shop.yaml"), options).start()
    try:
        inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
        for session in ("a", "b", "c"):
            inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("shop", session))
        families = _scrape(server)
        assert _samples(families["virtsvc_sessions"]) == {(): 3.0}
        assert server.journal.dropped == 1  # session a's journal went when c's entry came
        assert _samples(families["virtsvc_journal_dropped_entries"], "_total") == {(): 1.0}
    finally:
        server.stop(0)


def test_labels_stay_bounded_with_many_sessions_and_unknown_scenarios(
    server: VirtualServer, channel_to: Any, pb: SimpleNamespace
) -> None:
    """300 sessions and 50 made-up scenario names make two label sets: no session id is ever a label."""
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    for i in range(300):
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("shop", f"session-{i}"))
    for i in range(50):
        with pytest.raises(grpc.RpcError):
            inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md(f"made-up-{i}", f"x-{i}"))
    families = _scrape(server)
    assert _samples(families["virtsvc_calls"], "_total") == {
        (("code", "OK"), ("method", RESERVE), ("scenario", "shop")): 300.0,
        (("code", "NOT_FOUND"), ("method", RESERVE), ("scenario", "(unknown)")): 50.0,
    }
    assert _samples(families["virtsvc_sessions"]) == {(): float(len(server.store))}
    names = {k for family in families.values() for s in family.samples for k in s.labels}
    assert names <= {"method", "scenario", "code", "le"}


def test_scenario_labels_past_the_bound_are_other(
    catalog: Catalog, channel_to: Any, pb: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded scenarios are labels up to MAX_SCENARIO_LABELS distinct names; the rest share (other)."""
    monkeypatch.setattr(metrics_module, "MAX_SCENARIO_LABELS", 1)
    scenarios = [*compile_text(RULES, catalog, origin="shop.yaml"), *compile_text(OTHER, catalog)]
    server = VirtualServer(catalog, scenarios, port=0, metrics_port=0).start()
    try:
        inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("shop"))
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("other"))
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("shop"))
        assert _samples(_scrape(server)["virtsvc_calls"], "_total") == {
            (("code", "OK"), ("method", RESERVE), ("scenario", "shop")): 2.0,
            (("code", "OK"), ("method", RESERVE), ("scenario", "(other)")): 1.0,
        }
    finally:
        server.stop(0)


def test_the_endpoint_listens_on_the_servers_host_and_stops_with_it(catalog: Catalog) -> None:
    """/metrics is on --host (loopback by default), on its own port, and gone once the server stops."""
    server = VirtualServer(catalog, [], port=0, metrics_port=0).start()
    endpoint = server.metrics_endpoint
    assert endpoint is not None
    assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
    assert endpoint.port not in (0, server.port)
    assert "process_cpu_seconds" in _scrape(server)  # the process's own, as every target has
    server.stop(0)
    assert server.metrics_endpoint is None
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint.url, timeout=2)


def test_a_taken_metrics_port_is_a_clear_error(catalog: Catalog) -> None:
    """A port already in use: one ConfigError naming it and the flag, and no grpc server left running."""
    first = VirtualServer(catalog, [], port=0, metrics_port=0).start()
    try:
        assert first.metrics_endpoint is not None
        taken = first.metrics_endpoint.port
        second = VirtualServer(catalog, [], port=0, metrics_port=taken)
        with pytest.raises(
            ConfigError, match=rf"cannot serve metrics on 127.0.0.1:{taken}: .*\(--metrics-port\)"
        ):
            second.start()
        assert second._server is None
    finally:
        first.stop(0)


def test_metrics_without_prometheus_client_say_how_to_install_it(tmp_path: Path) -> None:
    """prometheus-client missing (blocked here): `serve --metrics-port` exits 1 with one line naming the
    extra."""
    script = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from virtsvc.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [sys.executable, "-c", script, "serve", "--protos", "protos", "--scenarios", "scenarios"]
    result = subprocess.run(
        [*args, "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        "virtsvc: error: metrics need prometheus-client: "
        "pip install 'virtsvc[metrics]' (or prometheus-client)"
    ]
