"""Run reports and gates from known traffic: real grpc calls to an in-process VirtualServer, read back through
its admin API as ``virtsvc report`` reads a sidecar."""

from __future__ import annotations

import html.parser
import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog
from virtsvc.engine.journal import Journal
from virtsvc.errors import ConfigError
from virtsvc.observe.formats import format_from_suffix, render
from virtsvc.observe.gates import Gates, format_duration, parse_p99, parse_rate
from virtsvc.observe.report import (
    Report,
    build_report,
    fetch_journal,
    fetch_rules,
    percentile,
    read_journal,
    write_journal,
)
from virtsvc.scenarios import load_scenarios
from virtsvc.server import VirtualServer
from virtsvc.testing import VirtualService

SCENARIO = """\
scenario: shop
version: 1
rules:
  - method: shop.v1.Inventory/GetItem
    reply: {sku: A, title: Widget}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: SLOW}}
    delay: 40ms
    reply: {reservationId: r-slow}
  - method: shop.v1.Payments/Charge
    status: {code: UNAVAILABLE, message: down}
  - method: shop.v1.Orders/PlaceOrder
    reply: {orderId: o-1}
"""
SLOW_RULE_LINE = 6
UNUSED_LINE = 12
TEST_A = "tests/test_shop.py::test_a"
TEST_B = "tests/test_shop.py::test_b"


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "shop.yaml"
    path.write_text(SCENARIO)
    return path


@pytest.fixture
def server(catalog: Catalog, scenario_file: Path) -> Iterator[VirtualServer]:
    server = VirtualServer(catalog, load_scenarios([scenario_file], catalog), port=0).start()
    try:
        yield server
    finally:
        server.stop(0)


def send_known_traffic(server: VirtualServer, pb: SimpleNamespace) -> None:
    """Test A: 8 GetItem (OK), 2 slow Reserve (40 ms), 1 Reserve no rule matches; test B: 1 Charge
    (UNAVAILABLE). Each test's session is ended as the pytest plugin ends it: journal kept, labelled."""
    a = VirtualService(server, session="sess-a").use("shop")
    inventory = pb.inv_grpc.InventoryStub(a.channel())
    for _ in range(8):
        assert inventory.GetItem(pb.inv.GetItemRequest(sku="A"), timeout=10).title == "Widget"
    for _ in range(2):
        assert inventory.Reserve(pb.inv.ReserveRequest(sku="SLOW"), timeout=10).reservation_id == "r-slow"
    with pytest.raises(grpc.RpcError) as info:
        inventory.Reserve(pb.inv.ReserveRequest(sku="OTHER"), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    a.close(keep_journal=True, label=TEST_A)

    b = VirtualService(server, session="sess-b").use("shop")
    with pytest.raises(grpc.RpcError) as info:
        pb.pay_grpc.PaymentsStub(b.channel()).Charge(pb.pay.ChargeRequest(account="x"), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    b.close(keep_journal=True, label=TEST_B)


@pytest.fixture
def report(server: VirtualServer, pb: SimpleNamespace, scenario_file: Path) -> Report:
    send_known_traffic(server, pb)
    with grpc.insecure_channel(server.address) as channel:
        entries = fetch_journal(channel)
        rules = fetch_rules(channel)
    return build_report(entries, rules, source=server.address)


def test_figures_per_scenario_and_method(report: Report, scenario_file: Path) -> None:
    """Calls, errors, error rate and percentiles per scenario and method are those of the traffic sent."""
    rows = {m.method: m for m in report.methods}
    assert (report.calls, report.errors) == (12, 2)
    assert report.error_rate == pytest.approx(2 / 12)
    get, reserve, charge = (
        rows["shop.v1.Inventory/GetItem"],
        rows["shop.v1.Inventory/Reserve"],
        rows["shop.v1.Payments/Charge"],
    )
    assert (get.calls, get.errors, get.unmatched, get.codes) == (8, 0, 0, {"OK": 8})
    assert (reserve.calls, reserve.errors, reserve.unmatched) == (3, 1, 1)
    assert reserve.codes == {"OK": 2, "UNIMPLEMENTED": 1}
    assert (charge.calls, charge.errors, charge.error_rate) == (1, 1, 1.0)
    assert {m.scenario for m in report.methods} == {"shop"}
    # Two of Reserve's three calls waited 40 ms: p90 and p99 are theirs, p50 too (nearest rank 2 of 3).
    assert reserve.p99 >= 0.040 and reserve.p90 >= 0.040 and reserve.p50 >= 0.040
    assert get.p99 < 0.040


def test_unmatched_calls_carry_their_near_miss(report: Report, scenario_file: Path) -> None:
    """The unmatched call is listed with the near-miss text its caller was sent."""
    [unmatched] = report.unmatched
    assert (unmatched.scenario, unmatched.session, unmatched.method, unmatched.label) == (
        "shop",
        "sess-a",
        "shop.v1.Inventory/Reserve",
        TEST_A,
    )
    assert f"closest: rule at {scenario_file}:{SLOW_RULE_LINE}" in unmatched.near_miss
    assert 'request.sku: expected "SLOW", got "OTHER"' in unmatched.near_miss


def test_unused_rules_with_their_file_and_line(report: Report, scenario_file: Path) -> None:
    """The one rule no call used is the dead stub, named by file:line, with the server's use count 0."""
    assert [(r.scenario, r.method, r.rule, r.uses) for r in report.unused or ()] == [
        ("shop", "shop.v1.Orders/PlaceOrder", f"{scenario_file}:{UNUSED_LINE}", 0)
    ]


def test_per_test_breakdown_from_the_session_labels(report: Report) -> None:
    """Each ended session's entries carry its test's label: the report gives each test its own figures."""
    tests = {t.label: t for t in report.tests}
    assert set(tests) == {TEST_A, TEST_B}
    a, b = tests[TEST_A], tests[TEST_B]
    assert (a.calls, a.errors, a.unmatched) == (11, 1, 1)
    assert (b.calls, b.errors, b.error_rate) == (1, 1, 1.0)
    assert [m.method for m in a.methods] == ["shop.v1.Inventory/GetItem", "shop.v1.Inventory/Reserve"]
    assert a.versions == ("shop@1",) and b.versions == ("shop@1",)
    assert a.digest != b.digest and len(a.digest) == 16


def test_filters_narrow_the_report(server: VirtualServer, pb: SimpleNamespace) -> None:
    """--session and --scenario keep only those calls; unused rules are judged on the calls kept."""
    send_known_traffic(server, pb)
    with grpc.insecure_channel(server.address) as channel:
        entries, rules = fetch_journal(channel), fetch_rules(channel)
    only_b = build_report(entries, rules, session="sess-b")
    assert (only_b.calls, only_b.errors) == (1, 1)
    # Narrowed to a session, the server's use counts (of every session) no longer decide.
    assert {r.method for r in only_b.unused or ()} == {
        "shop.v1.Inventory/GetItem",
        "shop.v1.Inventory/Reserve",
        "shop.v1.Orders/PlaceOrder",
    }
    assert build_report(entries, rules, scenario="other").calls == 0
    assert build_report(entries, rules, scenario="shop").calls == 12


def test_a_kept_journal_outlives_the_session_until_its_ttl(catalog: Catalog, scenario_file: Path) -> None:
    """ResetSession with keep_journal drops the state but keeps the journal, labelled; it expires with the
    session's TTL; a plain ResetSession still drops everything."""
    server = VirtualServer(catalog, load_scenarios([scenario_file], catalog), port=0, session_ttl=0.2).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = AdminClient(channel)
            get = channel.unary_unary("/shop.v1.Inventory/GetItem")
            for session in ("kept", "dropped"):
                get(
                    b"", metadata=(("x-virtsvc-scenario", "shop"), ("x-virtsvc-session", session)), timeout=10
                )
            admin.call("ResetSession", scenario="shop", session="kept", keep_journal=True, label="t::kept")
            admin.call("ResetSession", scenario="shop", session="dropped")
            assert server.store.find("shop", "kept") is None
            [entry] = admin.call("GetJournal", scenario="shop").entries
            assert (entry.session, entry.label) == ("kept", "t::kept")
            time.sleep(1.3)  # past the TTL and the journal's once-a-second sweep
            assert list(admin.call("GetJournal", scenario="shop").entries) == []
    finally:
        server.stop(0)


def test_a_kept_journal_still_obeys_the_bound(catalog: Catalog) -> None:
    """Kept journals count toward the journal's total bound: the least recently active go first."""
    spec = catalog.method("shop.v1.Inventory/GetItem")
    from virtsvc.engine.journal import Entry

    journal = Journal(size=10, max_entries=3)
    for session in ("a", "b"):
        for _ in range(2):
            journal.record(Entry("s", session, spec, {}, time.time()))
        journal.keep("s", session, f"t::{session}", ttl=3600)
    assert {(e.session, e.label) for e in journal.entries()} == {("b", "t::b")}
    assert journal.dropped == 2


def test_rule_uses_count_every_call(server: VirtualServer, pb: SimpleNamespace, scenario_file: Path) -> None:
    """ListScenarios with include_rules gives every rule's file:line and how often it answered."""
    send_known_traffic(server, pb)
    with grpc.insecure_channel(server.address) as channel:
        uses = {r.rule: r.uses for r in fetch_rules(channel)}
        plain = AdminClient(channel).call("ListScenarios").scenarios[0]
    assert uses == {
        f"{scenario_file}:4": 8,
        f"{scenario_file}:{SLOW_RULE_LINE}": 2,
        f"{scenario_file}:10": 1,
        f"{scenario_file}:{UNUSED_LINE}": 0,
    }
    assert list(plain.rules) == []  # only when asked for


# -- gates ------------------------------------------------------------------------------------------------


def test_gates_that_hold(report: Report) -> None:
    """Limits the traffic stays within pass, each naming its figure."""
    results = Gates(max_error_rate=0.2, max_p99=5.0).check(report)
    assert [(g.name, g.ok) for g in results] == [("max-error-rate 20.00%", True), ("max-p99 5s", True)]
    assert results[0].figure == "error rate 16.67% (2 of 12 calls)"
    assert (
        results[1].figure.startswith("slowest p99 ") and "shop shop.v1.Inventory/Reserve" in results[1].figure
    )


def test_each_gate_that_fails_names_its_figure(report: Report, scenario_file: Path) -> None:
    """Every gate fails on the known traffic with the figure that failed it."""
    results = Gates(max_error_rate=0.1, max_p99=0.030, fail_on_unmatched=True, fail_on_unused=True).check(
        report
    )
    assert [(g.name, g.ok) for g in results] == [
        ("max-error-rate 10.00%", False),
        ("max-p99 30ms", False),
        ("fail-on-unmatched", False),
        ("fail-on-unused", False),
    ]
    error_rate, p99, unmatched, unused = (g.figure for g in results)
    assert error_rate == (
        "error rate 16.67% (2 of 12 calls); shop shop.v1.Payments/Charge 100.00%; "
        "shop shop.v1.Inventory/Reserve 33.33%"
    )
    # 40 ms of simulated delay and what the machine adds to it.
    assert (
        re.fullmatch(r"shop shop\.v1\.Inventory/Reserve p99 [\d.]+ms", p99)
        and float(p99.split()[-1][:-2]) >= 40
    )
    assert unmatched.startswith(
        "1 unmatched call: shop shop.v1.Inventory/Reserve; the first: no rule matched "
        'shop.v1.Inventory/Reserve in scenario "shop", session "sess-a"'
    )
    assert unused == f"1 unused rule: {scenario_file}:{UNUSED_LINE} (shop shop.v1.Orders/PlaceOrder)"
    assert results[1].failed_methods == (("shop", "shop.v1.Inventory/Reserve"),)


def test_fail_on_unused_needs_the_rules(report: Report) -> None:
    """Without a server or scenario files the unused rules are unknown: the gate says what to give."""
    blind = build_report([], None)
    assert blind.unused is None
    with pytest.raises(ConfigError, match=r"--fail-on-unused needs to know every rule.*--scenarios PATH"):
        Gates(fail_on_unused=True).check(blind)


@pytest.mark.parametrize(
    ("text", "rate"), [("0.05", 0.05), ("5%", 0.05), ("0", 0.0), ("100%", 1.0)]
)  # fmt: skip
def test_rates(text: str, rate: float) -> None:
    """--max-error-rate takes a fraction or a percentage."""
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("text", "message"),
    [("fast", "not a rate: 'fast'"), ("1.5", "between 0 and 1"), ("-1%", "between 0 and 1")],
)
def test_bad_rates(text: str, message: str) -> None:
    """A bad rate is one clear line."""
    with pytest.raises(ConfigError, match=message):
        parse_rate(text)


def test_durations_as_scenarios_write_them() -> None:
    """--max-p99 reads durations as scenario files do, and reports them the same way."""
    assert parse_p99("250ms") == pytest.approx(0.25)
    assert parse_p99("1.5s") == pytest.approx(1.5)
    assert parse_p99("800us") == pytest.approx(0.0008)
    with pytest.raises(ConfigError, match=r"--max-p99: bad duration 'soon'; use e.g. 250ms, 1.5s"):
        parse_p99("soon")
    assert [format_duration(s) for s in (0.25, 1.5, 0.0008)] == ["250ms", "1.5s", "800us"]


def test_percentiles_are_nearest_rank() -> None:
    """p50/p90/p99 are nearest-rank percentiles: always a duration some call took."""
    values = [float(n) for n in range(1, 101)]
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([], 99) == 0.0


# -- formats ----------------------------------------------------------------------------------------------


def test_text_for_people(report: Report, scenario_file: Path) -> None:
    """The text report has the totals, a row per scenario and method, the near miss, the dead stub, the
    tests and the gates' verdicts."""
    gates = Gates(max_p99=0.030).check(report)
    text = render(report, "text", gates)
    lines = text.splitlines()
    assert lines[0].startswith(f"virtsvc report from {report.source}: 12 calls, 2 errors (16.7%), p50 ")
    [get_row] = [line for line in lines if "shop.v1.Inventory/GetItem" in line and line.startswith("  shop")]
    assert get_row.split()[:6] == ["shop", "shop.v1.Inventory/GetItem", "8", "0", "0.0%", get_row.split()[5]]
    assert "Unmatched calls: 1" in lines
    assert f"  {scenario_file}:{UNUSED_LINE}  shop shop.v1.Orders/PlaceOrder" in lines
    assert any(line.startswith(f"  {TEST_A}") and line.split()[1:4] == ["11", "1", "9.1%"] for line in lines)
    assert lines[-1].startswith("  FAILED: max-p99 30ms: shop shop.v1.Inventory/Reserve p99 ")


def test_json_for_tools(report: Report) -> None:
    """The JSON report is the report's dict plus the gates; durations in ms."""
    data = json.loads(render(report, "json", Gates(fail_on_unmatched=True).check(report)))
    assert data["calls"] == 12 and data["errors"] == 2
    reserve = next(m for m in data["methods"] if m["method"] == "shop.v1.Inventory/Reserve")
    assert reserve["codes"] == {"OK": 2, "UNIMPLEMENTED": 1} and reserve["p99_ms"] >= 40
    assert [r["method"] for r in data["unused_rules"]] == ["shop.v1.Orders/PlaceOrder"]
    assert [t["test"] for t in data["tests"]] == [TEST_A, TEST_B]
    assert data["gates"] == [{"gate": "fail-on-unmatched", "ok": False, "figure": data["gates"][0]["figure"]}]


def test_junit_xml_that_ci_reads(report: Report) -> None:
    """JUnit XML parses; one test case per scenario/method and one per gate, failures where gates failed."""
    gates = Gates(max_error_rate=0.5, max_p99=0.030, fail_on_unmatched=True).check(report)
    root = ET.fromstring(render(report, "junit", gates))
    assert root.tag == "testsuites"
    methods, verdicts = root.findall("testsuite")
    assert (methods.get("name"), methods.get("tests"), methods.get("failures")) == (
        "virtsvc.methods",
        "3",
        "1",
    )
    cases = {(c.get("classname"), c.get("name")): c for c in methods.findall("testcase")}
    assert set(cases) == {
        ("virtsvc.shop", "shop.v1.Inventory/GetItem"),
        ("virtsvc.shop", "shop.v1.Inventory/Reserve"),
        ("virtsvc.shop", "shop.v1.Payments/Charge"),
    }
    failure = cases[("virtsvc.shop", "shop.v1.Inventory/Reserve")].find("failure")
    assert failure is not None and failure.get("message") == "max-p99 30ms; fail-on-unmatched"
    system_out = cases[("virtsvc.shop", "shop.v1.Inventory/GetItem")].findtext("system-out") or ""
    assert system_out.startswith("calls 8, errors 0 (0.0%), unmatched 0, p50 ")
    assert (verdicts.get("name"), verdicts.get("tests"), verdicts.get("failures")) == (
        "virtsvc.gates",
        "3",
        "2",
    )
    gate_cases = {c.get("name"): c for c in verdicts.findall("testcase")}
    assert gate_cases["max-error-rate 50.00%"].find("failure") is None
    assert gate_cases["max-p99 30ms"].find("failure") is not None
    unmatched = gate_cases["fail-on-unmatched"].find("failure")
    assert unmatched is not None and (unmatched.get("message") or "").startswith("1 unmatched call: ")


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.external += [v or "" for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_one_self_contained_page(report: Report, scenario_file: Path) -> None:
    """The HTML page loads nothing from elsewhere, escapes what it shows, and holds every section."""
    page = _Page()
    page.feed(render(report, "html", Gates(fail_on_unused=True).check(report)))
    assert page.external == [] and "script" not in page.tags
    text = "".join(page.text)
    assert page.tags.count("table") == 4  # gates, methods, unused rules, tests
    assert 'request.sku: expected "SLOW", got "OTHER"' in text  # unescaped back from &quot;
    assert f"{scenario_file}:{UNUSED_LINE}" in text and TEST_B in text and "FAILED" in text


@pytest.mark.parametrize(
    ("name", "fmt"), [("r.txt", "text"), ("r.json", "json"), ("out/r.xml", "junit"), ("r.HTML", "html")]
)  # fmt: skip
def test_format_from_the_suffix(name: str, fmt: str) -> None:
    """--output and --virtsvc-report take the format from the file's suffix."""
    assert format_from_suffix(name) == fmt


def test_an_unknown_suffix_says_which_to_use() -> None:
    """A suffix that names no format is one line listing those that do."""
    with pytest.raises(
        ConfigError, match=r"r\.csv: cannot tell the report format from the suffix \.csv; use"
    ):
        format_from_suffix("r.csv")


# -- journal files ----------------------------------------------------------------------------------------


def test_journal_files_round_trip(server: VirtualServer, pb: SimpleNamespace, tmp_path: Path) -> None:
    """A journal written as JSON lines reads back into the same report."""
    send_known_traffic(server, pb)
    with grpc.insecure_channel(server.address) as channel:
        entries = fetch_journal(channel)
    path = tmp_path / "journal.jsonl"
    assert write_journal(entries, path) == 12
    assert len(path.read_text().splitlines()) == 12
    again = read_journal(path)
    assert again == entries
    assert build_report(again).to_dict()["methods"] == build_report(entries).to_dict()["methods"]
    first = json.loads(path.read_text().splitlines()[0])
    assert first["request"] == {"sku": "A"} and first["label"] == TEST_A and first["scenarioVersion"] == 1


def test_a_bad_journal_line_is_located(tmp_path: Path) -> None:
    """A line that is not a journal entry is reported at its file:line."""
    path = tmp_path / "journal.jsonl"
    path.write_text('{"method": "a/b", "duration": "0.1s"}\n\n[1, 2]\n')
    with pytest.raises(ConfigError, match=rf"{path}:3: not a journal entry \(a JSON list\)"):
        read_journal(path)
    path.write_text('{"duration": "0.1s"}\n')
    with pytest.raises(ConfigError, match=rf"{path}:1: not a journal entry \(no 'method'\)"):
        read_journal(path)
