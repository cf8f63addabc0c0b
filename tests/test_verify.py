"""`virtsvc verify`: scenarios replayed against a real grpcio service on loopback, its answers judged.

The real service (tests/upstream_servicer.py) runs from a proto tree compiled in the test: the original
shop.v1 contracts, or a changed copy (a field renamed, an enum value removed) to show drift.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from upstream_servicer import CatalogUpstream

from virtsvc import cli
from virtsvc.contracts.catalog import Catalog

ESTATE = Path(__file__).resolve().parents[1] / "protos"

SCENARIO = """\
scenario: shop-real
rules:
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: A-1}}
    reply: {sku: A-1, title: Widget, availability: IN_STOCK, tags: [a, b]}
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: {$eq: B-1}}}
    verify: exact
    reply: {sku: B-1, title: Widget, onHand: "5", availability: BACKORDER, tags: [a, b],
            stockByWarehouse: {w1: "3"}, dimensions: {widthCm: 1.5}}
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: MISSING}}
    status: {code: NOT_FOUND, message: no item MISSING}
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: {$regex: "^Z"}}}
    reply: {sku: Z}
  - method: shop.v1.Inventory/Watch
    when: {request: {skus: [A, B]}}
    verify: exact
    stream:
      - reply: {sku: A, onHand: "10", delta: "1"}
      - reply: {sku: B, onHand: "11", delta: "2"}
  - method: shop.v1.Inventory/BulkUpdate
    examples:
      - [{sku: A, count: 1}, {sku: B, count: -1}]
      - [{sku: C, count: 4}, {sku: B, count: -1}]
    verify: exact
    reply: {accepted: 1, rejected: 1, rejectedSkus: [B]}
  - method: shop.v1.Orders/Track
    examples:
      - [{orderId: o-1, text: hi}, {orderId: o-1, text: again}]
    each_request: {reply: {orderId: o-1, state: SHIPPED}}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: A-1, qty: 2}, metadata: {x-tenant: acme}}
    verify: exact
    reply: {reservationId: r-A-1-acme, qtyReserved: 2}
  - method: shop.v1.Inventory/Ping
    reply: {}
  - method: shop.v1.Inventory/Reserve
    fault: drop
"""
LINES = {"a1": 3, "b1": 6, "missing": 11, "regex": 14, "watch": 17, "bulk": 23, "track": 29, "reserve": 33,
         "ping": 37, "fault": 39}  # fmt: skip


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test compiles into a cache of its own: parallel workers never prune each other's entries."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _tree(tmp_path: Path, name: str, edits: list[tuple[str, str]] = ()) -> Path:  # type: ignore[assignment]
    root = tmp_path / name
    shutil.copytree(ESTATE, root)
    inventory = root / "shop" / "v1" / "inventory.proto"
    text = inventory.read_text()
    for before, after in edits:
        assert before in text, f"the edit must apply: {before!r}"
        text = text.replace(before, after)
    inventory.write_text(text)
    return root


@pytest.fixture
def run_upstream(tmp_path: Path) -> Iterator[Any]:
    """``run_upstream(tree, *variant)`` starts the real service of a proto tree; stopped at teardown."""
    started: list[CatalogUpstream] = []

    def start(tree: Path, *variant: str, with_reflection: bool = True) -> CatalogUpstream:
        catalog = Catalog.from_protos(tree, cache_dir=tmp_path / "cache")
        upstream = CatalogUpstream(catalog, frozenset(variant), with_reflection=with_reflection)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a directory without [tool.virtsvc] settings: only the flags say where the contracts are."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "shop-real.yaml"
    path.write_text(SCENARIO)
    return path


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = cli.main(["verify", *args])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err


def _line(results: list[str], scenario: Path, key: str) -> str:
    prefix = f"{scenario}:{LINES[key]}: "
    found = [line for line in results if line.startswith(prefix)]
    assert len(found) == 1, results
    return found[0].removeprefix(prefix)


def test_verify_passes_when_the_scenarios_match_the_real_service(
    tmp_path: Path, run_upstream: Any, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All four RPC kinds, metadata and exact values hold: exit 0, one line per rule, skips with reasons."""
    protos = _tree(tmp_path, "protos")
    upstream = run_upstream(protos)
    rc, out, err = _verify(capsys, "--target", upstream.address, "--protos", str(protos), str(scenario))
    assert (rc, err) == (0, ""), out
    assert out == [
        f"{scenario}:3: ok: shop.v1.Inventory/GetItem",
        f"{scenario}:6: ok: shop.v1.Inventory/GetItem",
        f"{scenario}:11: ok: shop.v1.Inventory/GetItem",
        f"{scenario}:14: skipped: shop.v1.Inventory/GetItem: when.request.sku uses $regex: not a concrete "
        "request; add examples: with the requests to send",
        f"{scenario}:17: ok: shop.v1.Inventory/Watch",
        f"{scenario}:23: ok: shop.v1.Inventory/BulkUpdate",
        f"{scenario}:29: ok: shop.v1.Orders/Track",
        f"{scenario}:33: ok: shop.v1.Inventory/Reserve",
        f"{scenario}:37: ok: shop.v1.Inventory/Ping",
        f"{scenario}:39: skipped: shop.v1.Inventory/Reserve: answers with a fault (drop): nothing to "
        "compare with",
        f"verified 10 rules against {upstream.address}: 8 ok, 0 drifted, 2 skipped",
    ]
    methods = [m for m, _md in upstream.seen]
    assert methods.count("shop.v1.Inventory/BulkUpdate") == 2  # both examples were sent
    assert ("shop.v1.Inventory/Reserve", "acme") in [(m, md.get("x-tenant")) for m, md in upstream.seen]


def test_a_renamed_field_is_drift_at_the_rules_that_set_it(
    tmp_path: Path, run_upstream: Any, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real service renamed Item.title to name (same number): the rules setting title drift, by name."""
    protos = _tree(tmp_path, "protos")
    upstream = run_upstream(
        _tree(tmp_path, "renamed", [("string title = 2;", "string name = 2;")]), "renamed"
    )
    rc, out, _err = _verify(capsys, "--target", upstream.address, "--protos", str(protos), str(scenario))
    assert rc == 1
    drift = "reply.title: the target's shop.v1.Item has no field title (field 2 is name there)"
    assert _line(out, scenario, "a1") == f"drift: shop.v1.Inventory/GetItem: {drift}"
    assert _line(out, scenario, "b1") == f"drift: shop.v1.Inventory/GetItem: {drift}"
    assert _line(out, scenario, "watch") == "ok: shop.v1.Inventory/Watch"
    assert out[-1] == f"verified 10 rules against {upstream.address}: 6 ok, 2 drifted, 2 skipped"


def test_a_changed_status_is_drift(
    tmp_path: Path, run_upstream: Any, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown item is INVALID_ARGUMENT now, not NOT_FOUND: that rule drifts, naming both codes."""
    protos = _tree(tmp_path, "protos")
    upstream = run_upstream(protos, "status")
    rc, out, _err = _verify(capsys, "--target", upstream.address, "--protos", str(protos), str(scenario))
    assert rc == 1
    assert _line(out, scenario, "missing") == (
        "drift: shop.v1.Inventory/GetItem: status: expected NOT_FOUND, got INVALID_ARGUMENT (bad sku MISSING)"
    )
    assert [line for line in out if ": drift: " in line] == [
        f"{scenario}:11: " + _line(out, scenario, "missing")
    ]


def test_a_removed_enum_value_is_drift(
    tmp_path: Path, run_upstream: Any, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real service dropped Availability.BACKORDER: the rule answering it drifts in shape and value."""
    protos = _tree(tmp_path, "protos")
    changed = _tree(tmp_path, "no-backorder", [("    BACKORDER = 2;\n", "")])
    upstream = run_upstream(changed, "no-backorder")
    rc, out, _err = _verify(capsys, "--target", upstream.address, "--protos", str(protos), str(scenario))
    assert rc == 1
    assert _line(out, scenario, "b1") == (
        "drift: shop.v1.Inventory/GetItem: reply.availability: BACKORDER is not a value of "
        'shop.v1.Item.Availability on the target; reply.availability: expected "BACKORDER", got "IN_STOCK"'
    )
    assert _line(out, scenario, "a1") == "ok: shop.v1.Inventory/GetItem"


def test_exact_values_and_stream_lengths(
    tmp_path: Path, run_upstream: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify: exact compares values and message counts; the default (shape) lets other values pass."""
    protos = _tree(tmp_path, "protos")
    upstream = run_upstream(protos)
    path = tmp_path / "values.yaml"
    path.write_text(
        "scenario: values\n"
        "rules:\n"
        "  - method: shop.v1.Inventory/Watch\n"
        "    when: {request: {skus: [A, B, C]}}\n"
        "    verify: exact\n"
        "    stream:\n"
        '      - reply: {sku: A, onHand: "10", delta: "1"}\n'
        '      - reply: {sku: X, onHand: "11", delta: "2"}\n'
        "  - method: shop.v1.Inventory/GetItem\n"
        "    when: {request: {sku: A-9}}\n"
        '    reply: {sku: A-9, title: Something else, onHand: "99"}\n'
    )
    rc, out, _err = _verify(capsys, "--target", upstream.address, "--protos", str(protos), str(path))
    assert rc == 1
    assert out[:2] == [
        f"{path}:3: drift: shop.v1.Inventory/Watch: stream: expected 2 messages, got 3; "
        'stream[1].sku: expected "X", got "B"',
        f"{path}:9: ok: shop.v1.Inventory/GetItem",
    ]


def test_json_and_junit_reports_and_output_file(
    tmp_path: Path, run_upstream: Any, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format json|junit carry every rule's verdict; --output writes the report and prints the summary."""
    protos = _tree(tmp_path, "protos")
    upstream = run_upstream(protos, "status")
    args = ["--target", upstream.address, "--protos", str(protos), str(scenario)]
    rc, out, _err = _verify(capsys, *args, "--format", "json")
    data = json.loads("\n".join(out))
    assert rc == 1 and data["summary"] == {"ok": 7, "drift": 1, "skipped": 2}
    missing = next(r for r in data["rules"] if r["rule"] == f"{scenario}:11")
    assert missing["outcome"] == "drift" and missing["scenario"] == "shop-real"
    assert missing["drift"] == ["status: expected NOT_FOUND, got INVALID_ARGUMENT (bad sku MISSING)"]

    report = tmp_path / "verify.xml"
    rc, out, _err = _verify(capsys, *args, "--format", "junit", "--output", str(report))
    assert rc == 1
    assert out == [f"verified 10 rules against {upstream.address}: 7 ok, 1 drifted, 2 skipped"]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("10", "1", "2")
    failures = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == [f"{scenario}:11 shop.v1.Inventory/GetItem"]


def test_contracts_from_the_targets_reflection(
    tmp_path: Path, run_upstream: Any, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --protos/--descriptors the scenarios load against the target's own schema (reflection)."""
    upstream = run_upstream(_tree(tmp_path, "protos"))
    rc, out, _err = _verify(capsys, "--target", upstream.address, str(scenario))
    assert rc == 0, out
    assert out[-1] == f"verified 10 rules against {upstream.address}: 8 ok, 0 drifted, 2 skipped"


def test_without_reflection_replies_are_judged_by_the_given_contract(
    tmp_path: Path, run_upstream: Any, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target without reflection: --protos is needed (one clear line otherwise); status drift shows."""
    protos = _tree(tmp_path, "protos")
    upstream = run_upstream(protos, "status", with_reflection=False)
    rc, out, err = _verify(capsys, "--target", upstream.address, str(scenario))
    assert (rc, out) == (1, [])
    assert err == (
        f"virtsvc: error: target {upstream.address}: offers no reflection; "
        "give --protos DIR or --descriptors FILE\n"
    )
    rc, out, _err = _verify(capsys, "--target", upstream.address, "--protos", str(protos), str(scenario))
    assert rc == 1
    assert out[-1] == f"verified 10 rules against {upstream.address}: 7 ok, 1 drifted, 2 skipped"


def test_an_unreachable_target_is_one_clear_line(
    tmp_path: Path, scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening at --target: exit 1 and one line naming it, within the timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out, err = _verify(
        capsys, "--target", f"127.0.0.1:{port}", "--protos", str(ESTATE), "--timeout", "0.5", str(scenario)
    )
    assert (rc, out) == (1, [])
    assert err == f"virtsvc: error: target 127.0.0.1:{port}: unreachable (nothing answered within 0.5 s)\n"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("examples: {sku: A}", "examples: expected a list of request messages, got a mapping"),
        ("examples: [{skew: A}]", 'examples[0].skew: unknown field "skew"'),
        ("verify: exactly", 'verify: unknown value "exactly"'),
        (
            "when: {request: {sku: A}}\n    examples: [{sku: A}, {sku: B}]",
            "examples[1]: the rule's when does not hold for this request: "
            'request.sku: expected "A", got "B"',
        ),
    ],
)
def test_bad_examples_and_verify_keys_are_located(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: str, message: str
) -> None:
    """examples: and verify: are checked at load: file:line, the key path and what was expected."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"scenario: bad\nrules:\n  - method: shop.v1.Inventory/GetItem\n    reply: {{}}\n    {rule}\n"
    )
    capsys.readouterr()
    rc = cli.main(["check", "--protos", str(ESTATE), str(path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"{path}:{6 if 'when' in rule else 5}: {message}"), err
