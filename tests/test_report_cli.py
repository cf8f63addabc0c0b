"""`virtsvc journal export` and `virtsvc report` against a `virtsvc serve` subprocess: exit codes, every
format, every gate, and the history's trends and flaky tests over two runs."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from test_report import SCENARIO, TEST_A, TEST_B, UNUSED_LINE, send_known_traffic
from test_serve import _command, start_sidecar  # noqa: F401 - the fixture

from virtsvc.observe.formats import render
from virtsvc.observe.history import History
from virtsvc.observe.report import build_report
from virtsvc.testing import VirtualService
from virtsvc.testing.service import RemoteServer

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def virtsvc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def served(start_sidecar: Any, tmp_path: Path, pb: SimpleNamespace) -> Any:  # noqa: F811
    """A sidecar serving shop.yaml (given relative to its cwd), after the known traffic of test_report."""
    (tmp_path / "shop.yaml").write_text(SCENARIO)
    sidecar = start_sidecar("--protos", str(PROTOS), "--scenarios", "shop.yaml", cwd=tmp_path)
    send_known_traffic(RemoteServer(sidecar.address), pb)  # type: ignore[arg-type]
    return sidecar


def test_export_then_report_from_the_file(served: Any, tmp_path: Path) -> None:
    """The export has one entry per line; a report from it with --scenarios equals the one from the server."""
    out = tmp_path / "run.jsonl"
    done = virtsvc("journal", "export", "--address", served.address, "--out", str(out), cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, f"wrote 12 journal entries to {out}\n"), done.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 12
    assert {json.loads(line)["label"] for line in lines} == {TEST_A, TEST_B}

    live = virtsvc("report", "--address", served.address, "--format", "json", cwd=tmp_path)
    offline = virtsvc(
        "report", "--journal", str(out), "--scenarios", "shop.yaml", "--protos", str(PROTOS),
        "--format", "json", cwd=tmp_path,
    )  # fmt: skip
    assert live.returncode == 0 and offline.returncode == 0, live.stderr + offline.stderr
    live_data, offline_data = json.loads(live.stdout), json.loads(offline.stdout)
    assert live_data["source"] == served.address and offline_data["source"] == str(out)
    for key in ("calls", "errors", "methods", "unmatched", "tests"):
        assert live_data[key] == offline_data[key], key
    assert [r["rule"] for r in live_data["unused_rules"]] == [f"shop.yaml:{UNUSED_LINE}"]
    assert [(r["rule"], r["uses"]) for r in offline_data["unused_rules"]] == [
        (f"shop.yaml:{UNUSED_LINE}", None)
    ]


def test_export_filters_by_scenario_and_session(served: Any, tmp_path: Path) -> None:
    """--session keeps that session's entries only."""
    out = tmp_path / "b.jsonl"
    done = virtsvc(
        "journal",
        "export",
        "--address",
        served.address,
        "--session",
        "sess-b",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert done.stdout == f"wrote 1 journal entry to {out}\n"
    assert json.loads(out.read_text())["method"] == "shop.v1.Payments/Charge"


def test_every_gate_fails_by_name_with_its_figure(served: Any, tmp_path: Path) -> None:
    """Exit 1, one stderr line per failed gate naming it and its figure; the report is still written."""
    out = tmp_path / "report.xml"
    done = virtsvc(
        "report", "--address", served.address, "--output", str(out), "--max-error-rate", "10%",
        "--max-p99", "30ms", "--fail-on-unmatched", "--fail-on-unused", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    failed = done.stderr.splitlines()
    assert [line.split(":")[2].strip() for line in failed] == [
        "max-error-rate 10.00%",
        "max-p99 30ms",
        "fail-on-unmatched",
        "fail-on-unused",
    ]
    assert failed[0] == "virtsvc: gate failed: max-error-rate 10.00%: error rate 16.67% (2 of 12 calls); " + (
        "shop shop.v1.Payments/Charge 100.00%; shop shop.v1.Inventory/Reserve 33.33%"
    )
    assert failed[3] == (
        "virtsvc: gate failed: fail-on-unused: 1 unused rule: "
        f"shop.yaml:{UNUSED_LINE} (shop shop.v1.Orders/PlaceOrder)"
    )
    suites = ET.parse(out).getroot().findall("testsuite")
    assert [(s.get("name"), s.get("failures")) for s in suites] == [
        ("virtsvc.methods", "2"),
        ("virtsvc.gates", "4"),
    ]


def test_gates_that_hold_exit_0(served: Any, tmp_path: Path) -> None:
    """All gates within their limits: exit 0, nothing on stderr, the text report on stdout."""
    done = virtsvc(
        "report", "--address", served.address, "--max-error-rate", "0.2", "--max-p99", "5s", cwd=tmp_path
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"virtsvc report from {served.address}: 12 calls, 2 errors (16.7%)")
    assert "  passed: max-error-rate 20.00%: error rate 16.67% (2 of 12 calls)" in done.stdout.splitlines()


@pytest.mark.parametrize(
    ("suffix", "marker"), [(".html", "<!DOCTYPE html>"), (".txt", "virtsvc report from")]
)
def test_output_format_from_the_suffix(served: Any, tmp_path: Path, suffix: str, marker: str) -> None:
    """--output picks the format from its suffix."""
    out = tmp_path / f"report{suffix}"
    assert virtsvc("report", "--address", served.address, "-o", str(out), cwd=tmp_path).returncode == 0
    assert out.read_text().startswith(marker)


def test_the_admin_token_from_the_environment(start_sidecar: Any, tmp_path: Path) -> None:  # noqa: F811
    """A server with an admin token: report and export send VIRTSVC_ADMIN_TOKEN, or say they were refused."""
    sidecar = start_sidecar("--protos", str(PROTOS), "--admin-token", "s3cret", cwd=tmp_path)
    refused = virtsvc("report", "--address", sidecar.address, cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        f"virtsvc: error: cannot read the journal of the server at {sidecar.address}: "
    )
    assert "UNAUTHENTICATED" in refused.stderr and len(refused.stderr.splitlines()) == 1
    ok = virtsvc("report", "--address", sidecar.address, cwd=tmp_path, env={"VIRTSVC_ADMIN_TOKEN": "s3cret"})
    assert ok.returncode == 0 and "0 calls" in ok.stdout
    out = tmp_path / "j.jsonl"
    flag = virtsvc(
        "journal", "export", "--address", sidecar.address, "--admin-token", "s3cret", "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert flag.returncode == 0 and out.read_text() == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-p99", "soon"], "virtsvc: error: --max-p99: bad duration 'soon'; use e.g. 250ms, 1.5s\n"),
        (["--max-error-rate", "2"],
         "virtsvc: error: --max-error-rate: a rate is between 0 and 1 (0% and 100%), not '2'\n"),
        (["--output", "r.csv"],
         "virtsvc: error: r.csv: cannot tell the report format from the suffix .csv; use .txt, .json, .xml "
         "(JUnit) or .html\n"),
        (["--journal", "missing.jsonl"],
         "virtsvc: error: missing.jsonl: cannot read the journal: No such file or directory\n"),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    """Bad flags and files: one clear line, exit 1, no traceback."""
    (tmp_path / "none.jsonl").write_text("")
    source = [] if "--journal" in args else ["--journal", "none.jsonl"]
    done = virtsvc("report", *source, *args, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, message)


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    """No server at the address: exit 1 with the address and gRPC's reason."""
    done = virtsvc("journal", "export", "--address", "127.0.0.1:1", "--out", "x.jsonl", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(
        "virtsvc: error: cannot read the journal of the server at 127.0.0.1:1: UNAVAILABLE"
    )
    assert not (tmp_path / "x.jsonl").exists()


# -- history ----------------------------------------------------------------------------------------------

FLAKY_SCENARIO = """\
scenario: stock
version: 7
rules:
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: A}}
    reply: {sku: A, title: Widget}
  - method: shop.v1.Inventory/GetItem
    status: {code: NOT_FOUND, message: no such item}
"""


def _run_suite(address: str, pb: SimpleNamespace, flaky_sku: str) -> None:
    """Two tests: a steady one, and one whose request (hence its answer) depends on the run, as a race in
    the code under test would make it."""
    for label, sku in (
        ("tests/test_stock.py::test_steady", "A"),
        ("tests/test_stock.py::test_racy", flaky_sku),
    ):
        service = VirtualService(RemoteServer(address)).use("stock")
        stub = pb.inv_grpc.InventoryStub(service.channel())
        try:
            stub.GetItem(pb.inv.GetItemRequest(sku=sku), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.NOT_FOUND
        service.close(keep_journal=True, label=label)


def test_history_shows_trends_and_the_flaky_test_first(
    start_sidecar: Any,  # noqa: F811
    tmp_path: Path,
    pb: SimpleNamespace,
) -> None:
    """Two runs on the same scenario version, one test answered differently: it is listed as flaky, first,
    with what changed; the trends hold one value per run."""
    (tmp_path / "stock.yaml").write_text(FLAKY_SCENARIO)
    history = tmp_path / "history.sqlite"
    outputs = []
    for sku in ("A", "B"):  # one sidecar per CI run
        sidecar = start_sidecar("--protos", str(PROTOS), "--scenarios", "stock.yaml", cwd=tmp_path)
        _run_suite(sidecar.address, pb, sku)
        done = virtsvc(
            "report",
            "--address",
            sidecar.address,
            "--history",
            str(history),
            "--format",
            "json",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout)["history"])
        sidecar.process.terminate()
        sidecar.process.wait(timeout=20)
    first, second = outputs
    assert [r["id"] for r in first["runs"]] == [1] and first["flaky"] == []
    assert [r["id"] for r in second["runs"]] == [1, 2]
    assert second["flaky"] == [
        {
            "test": "tests/test_stock.py::test_racy",
            "times": 1,
            "before": 1,
            "after": 2,
            "versions": ["stock@7"],
            "changes": [
                "- shop.v1.Inventory/GetItem OK stock.yaml:4",
                "+ shop.v1.Inventory/GetItem NOT_FOUND stock.yaml:7",
            ],
        }
    ]
    assert [(t["test"], t["flaky"], t["error_rate"]) for t in second["tests"]] == [
        ("tests/test_stock.py::test_racy", True, [0.0, 1.0]),
        ("tests/test_stock.py::test_steady", False, [0.0, 0.0]),
    ]
    [method] = second["methods"]
    assert (method["scenario"], method["method"], method["error_rate"]) == (
        "stock",
        "shop.v1.Inventory/GetItem",
        [0.0, 0.5],
    )
    assert len(method["p99_ms"]) == 2 and all(v > 0 for v in method["p99_ms"])
    with sqlite3.connect(history) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
        assert db.execute("SELECT count(*) FROM test_runs").fetchone() == (4,)


def test_history_text_lists_flaky_tests_before_the_trends(tmp_path: Path) -> None:
    """The text report's history section: flaky tests first, then per method and per test, oldest first."""
    journal = tmp_path / "j.jsonl"
    history = tmp_path / "h.sqlite"
    for code in ("OK", "UNAVAILABLE"):
        journal.write_text(
            json.dumps({"seq": "1", "scenario": "s", "scenarioVersion": 1, "session": "x", "method": "a.B/C",
                        "code": code, "duration": "0.002s", "rule": "s.yaml:4", "label": "t::one"}) + "\n"
        )  # fmt: skip
        done = virtsvc("report", "--journal", str(journal), "--history", str(history), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = lines.index(f"History: 2 runs (oldest first) in {history}")
    assert lines[start + 1 : start + 9] == [
        "  Flaky tests (answers changed on the same scenario versions): 1",
        "    t::one: run 1 -> run 2 on s@1",
        "      - a.B/C OK s.yaml:4",
        "      + a.B/C UNAVAILABLE s.yaml:4",
        "  Per method (error rate | p99):",
        "    s a.B/C: 0.0% -> 100.0% | 2ms -> 2ms",
        "  Per test (error rate | p99):",
        "    t::one: 0.0% -> 100.0% | 2ms -> 2ms",
    ]
    # The same view in the HTML page, read back from the file as the dashboard would read it.
    page = render(build_report([]), "html", history=History(history).view())
    assert "<h3>Flaky tests (1)</h3>" in page and "t::one: run 1 &rarr; run 2" in page
    assert "<td>0.0% -&gt; 100.0%</td>" in page


def test_a_file_that_is_no_history_is_refused(tmp_path: Path) -> None:
    """A history path holding something else, or a newer schema, is one line; the file is left alone."""
    journal = tmp_path / "j.jsonl"
    journal.write_text("")
    not_db = tmp_path / "notes.txt"
    not_db.write_text("x" * 200)
    done = virtsvc("report", "--journal", str(journal), "--history", str(not_db), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"virtsvc: error: {not_db}: not a virtsvc history (SQLite: ")
    assert not_db.read_text() == "x" * 200
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '9')")
    done = virtsvc("report", "--journal", str(journal), "--history", str(newer), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        f"virtsvc: error: {newer}: history schema version 9 is newer than this virtsvc reads (1); upgrade "
        "virtsvc, or start a new history file\n"
    )
