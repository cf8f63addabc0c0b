"""The plugin's ``--virtsvc-report PATH``: the run's report with a per-test breakdown, in-process, under
xdist and against a shared sidecar, through pytester."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_plugin import line_of, project, sidecar  # noqa: F401 - the fixture

from virtsvc.server import VirtualServer

TESTS = """
import grpc
import pytest

RESERVE = "shop.v1.Inventory/Reserve"


def test_reserve(virtual_service, rpc):
    virtual_service.use("happy")
    assert rpc(RESERVE, sku="A").reservation_id == "from-scenario"
    assert rpc(RESERVE, sku="B").reservation_id == "from-scenario"


def test_item(virtual_service, rpc):
    virtual_service.use("happy")
    assert rpc("shop.v1.Inventory/GetItem", sku="ABC-1").title == "Widget"


def test_inline_failure(virtual_service, rpc):
    virtual_service.on(RESERVE).fail("UNAVAILABLE", "down")
    with pytest.raises(grpc.RpcError):
        rpc(RESERVE)
"""
NODES = [f"test_inner.py::{name}" for name in ("test_inline_failure", "test_item", "test_reserve")]
# Inner runs start their own servers (and xdist workers): an inner -n 2 run took 60 s on a loaded machine.
INNER_TIMEOUT = 180


def check_json_report(path: Path, scenarios: Path) -> None:
    data = json.loads(path.read_text())
    assert (data["source"], data["calls"], data["errors"]) == ("pytest", 4, 1)
    tests = {t["test"]: t for t in data["tests"]}
    assert sorted(tests) == NODES
    assert [(tests[n]["calls"], tests[n]["errors"]) for n in NODES] == [(1, 1), (1, 0), (2, 0)]
    assert [m["method"] for m in tests[NODES[2]]["methods"]] == ["shop.v1.Inventory/Reserve"]
    assert tests[NODES[2]]["versions"] == ["happy@"]
    rows = {(m["scenario"], m["method"]): m["calls"] for m in data["methods"]}
    assert rows == {
        ("", "shop.v1.Inventory/Reserve"): 1,
        ("happy", "shop.v1.Inventory/GetItem"): 1,
        ("happy", "shop.v1.Inventory/Reserve"): 2,
    }
    # The "other" scenario's rule answered nothing in this run: the dead stub, at its file:line.
    other = line_of(scenarios, "reservation_id: from-other") - 2  # its "- method:" line
    assert [(r["scenario"], r["rule"].rsplit("/", 1)[-1]) for r in data["unused_rules"]] == [
        ("other", f"shop.yaml:{other}")
    ]


def test_report_of_an_in_process_run(pytester: pytest.Pytester) -> None:
    """A serial run writes the JSON report named by the suffix, each test's calls under its node id."""
    project(pytester)
    pytester.makepyfile(test_inner=TESTS)
    result = pytester.runpytest_subprocess("--virtsvc-report", "out/report.json", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["virtsvc: report of 4 calls in 3 tests written to out/report.json"])
    check_json_report(pytester.path / "out" / "report.json", pytester.path / "scenarios" / "shop.yaml")


def test_report_under_xdist_joins_every_worker(pytester: pytest.Pytester) -> None:
    """Under -n 2 each worker's in-process server hands its calls to the controller: one JUnit report."""
    project(pytester)
    pytester.makepyfile(test_inner=TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "--virtsvc-report", "report.xml", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=3)
    suites = ET.parse(pytester.path / "report.xml").getroot().findall("testsuite")
    methods = {(c.get("classname"), c.get("name")): c.findtext("system-out") for c in suites[0]}
    assert methods == {
        ("virtsvc.none", "shop.v1.Inventory/Reserve"): methods[("virtsvc.none", "shop.v1.Inventory/Reserve")],
        ("virtsvc.happy", "shop.v1.Inventory/GetItem"): methods[
            ("virtsvc.happy", "shop.v1.Inventory/GetItem")
        ],
        ("virtsvc.happy", "shop.v1.Inventory/Reserve"): methods[
            ("virtsvc.happy", "shop.v1.Inventory/Reserve")
        ],
    }
    assert (methods[("virtsvc.happy", "shop.v1.Inventory/Reserve")] or "").startswith("calls 2, errors 0 ")
    assert (methods[("virtsvc.none", "shop.v1.Inventory/Reserve")] or "").endswith("codes UNAVAILABLE 1")
    assert suites[1].get("tests") == "0"  # no gates in the plugin's report


def test_report_from_a_shared_sidecar(
    pytester: pytest.Pytester,
    sidecar: VirtualServer,  # noqa: F811
) -> None:
    """Against a sidecar under xdist: the report holds this run's tests only, and the sidecar keeps their
    labelled journals for `virtsvc report` after the run."""
    project(pytester)
    pytester.makepyfile(test_inner=TESTS)
    result = pytester.runpytest_subprocess(
        "-n",
        "2",
        "--virtsvc-address",
        sidecar.address,
        "--virtsvc-report",
        "report.json",
        timeout=INNER_TIMEOUT,
    )
    result.assert_outcomes(passed=3)
    data = json.loads((pytester.path / "report.json").read_text())
    assert sorted(t["test"] for t in data["tests"]) == NODES
    assert (data["calls"], data["errors"]) == (4, 1)
    # The shared server's use counts are not this run's: only this run's calls decide the unused rules.
    assert [r["scenario"] for r in data["unused_rules"]] == ["other"]
    assert [r["uses"] for r in data["unused_rules"]] == [None]
    assert sorted({e.label for e in sidecar.journal.entries()}) == NODES


def test_a_report_path_without_a_known_suffix_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """An unknown suffix stops the run before any test, naming the suffixes that work."""
    project(pytester)
    pytester.makepyfile(test_inner=TESTS)
    result = pytester.runpytest_subprocess("--virtsvc-report", "report.csv", timeout=INNER_TIMEOUT)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--virtsvc-report: report.csv: cannot tell the report format from the suffix .csv; use .txt, "
         ".json, .xml (JUnit) or .html"]
    )  # fmt: skip
