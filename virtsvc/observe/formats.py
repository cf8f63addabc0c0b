"""A report as text for people, JSON for tools, JUnit XML for CI systems, or one self-contained HTML page.

JUnit: a ``virtsvc.methods`` suite with one test case per scenario and method (its figures in ``system-out``;
a failure when a gate failed on that method) and a ``virtsvc.gates`` suite with one test case per gate set (a
failure naming the figure that failed it), so a CI system lists both the traffic and the verdicts.
"""

from __future__ import annotations

import html
import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from virtsvc.errors import ConfigError
from virtsvc.observe.gates import GateResult, format_duration
from virtsvc.observe.report import MethodFigures, Report

__all__ = ["FORMATS", "format_from_suffix", "render"]

FORMATS = ("text", "json", "junit", "html")
_SUFFIXES = {".txt": "text", ".json": "json", ".xml": "junit", ".html": "html", ".htm": "html"}


def format_from_suffix(path: str | Path) -> str:
    """The format a file name asks for: .txt text, .json json, .xml junit, .html html."""
    suffix = Path(path).suffix.lower()
    try:
        return _SUFFIXES[suffix]
    except KeyError:
        raise ConfigError(
            f"{path}: cannot tell the report format from the suffix {suffix or '(none)'}; "
            "use .txt, .json, .xml (JUnit) or .html"
        ) from None


def render(
    report: Report,
    fmt: str,
    gates: Sequence[GateResult] = (),
    history: Mapping[str, Any] | None = None,
) -> str:
    """``report`` (with the gates' verdicts and a history view, see ``History.view``) in ``fmt``."""
    if fmt == "text":
        return _text(report, gates, history)
    if fmt == "json":
        data = report.to_dict()
        data["gates"] = [{"gate": g.name, "ok": g.ok, "figure": g.figure} for g in gates]
        if history is not None:
            data["history"] = history
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt == "junit":
        return _junit(report, gates)
    if fmt == "html":
        return _html(report, gates, history)
    raise ConfigError(f"unknown report format {fmt!r}; one of {', '.join(FORMATS)}")


def _d(seconds: float) -> str:
    return format_duration(seconds) if seconds else "0"


def _pct(rate: float) -> str:
    return f"{rate:.1%}"


def _method_rows(methods: Sequence[MethodFigures]) -> list[list[str]]:
    return [
        [m.scenario or "(none)", m.method, str(m.calls), str(m.errors), _pct(m.error_rate),
         _d(m.p50), _d(m.p90), _d(m.p99), str(m.unmatched)]
        for m in methods
    ]  # fmt: skip


_METHOD_HEAD = ["scenario", "method", "calls", "errors", "error rate", "p50", "p90", "p99", "unmatched"]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)).rstrip()]
    lines += [
        indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        for row in rows
    ]
    return lines


def _series(values: Sequence[Any], fmt: Any) -> str:
    return " -> ".join("-" if v is None else fmt(v) for v in values)


def _text(report: Report, gates: Sequence[GateResult], history: Mapping[str, Any] | None) -> str:
    where = f" from {report.source}" if report.source else ""
    narrowed = "".join(f", {k} {v}" for k, v in report.filters.items())
    lines = [
        f"virtsvc report{where}{narrowed}: {report.calls} call{'' if report.calls == 1 else 's'}, "
        f"{report.errors} error{'' if report.errors == 1 else 's'} ({_pct(report.error_rate)}), "
        f"p50 {_d(report.p50)}, p90 {_d(report.p90)}, p99 {_d(report.p99)}",
        "",
        "Per scenario and method:",
    ]
    lines += _table(_METHOD_HEAD, _method_rows(report.methods)) if report.methods else ["  no calls"]
    lines += ["", f"Unmatched calls: {len(report.unmatched)}"]
    for u in report.unmatched:
        test = f" in {u.label}" if u.label else ""
        lines.append(f"  {u.scenario or '(no scenario)'} {u.method} (session {u.session}{test}):")
        lines += [f"    {line}" for line in u.near_miss.splitlines()]
    if report.unused is None:
        lines += [
            "",
            "Unused rules: not known (report from a server with --address, or give --scenarios PATH)",
        ]
    else:
        lines += ["", f"Unused rules: {len(report.unused)}"]
        lines += [f"  {r.rule}  {r.scenario} {r.method}" for r in report.unused]
    if report.tests:
        lines += ["", f"Per test: {len(report.tests)}"]
        rows = [
            [t.label, str(t.calls), str(t.errors), _pct(t.error_rate), _d(t.p99), str(t.unmatched)]
            for t in report.tests
        ]
        lines += _table(["test", "calls", "errors", "error rate", "p99", "unmatched"], rows)
    if history is not None:
        lines += ["", *_text_history(history)]
    if gates:
        lines += ["", "Gates:"]
        lines += [f"  {g}" for g in gates]
    return "\n".join(lines) + "\n"


def _text_history(history: Mapping[str, Any]) -> list[str]:
    runs = history["runs"]
    lines = [f"History: {len(runs)} run{'' if len(runs) == 1 else 's'} (oldest first) in {history['path']}"]
    flaky = history["flaky"]
    lines.append(f"  Flaky tests (answers changed on the same scenario versions): {len(flaky)}")
    for f in flaky:
        lines.append(f"    {f['test']}: run {f['before']} -> run {f['after']} on {', '.join(f['versions'])}")
        lines += [f"      {change}" for change in f["changes"]]
    lines.append("  Per method (error rate | p99):")
    for m in history["methods"]:
        lines.append(
            f"    {m['scenario'] or '(none)'} {m['method']}: {_series(m['error_rate'], _pct)} | "
            f"{_series(m['p99_ms'], lambda v: _d(v / 1000))}"
        )
    lines.append("  Per test (error rate | p99):")
    for t in history["tests"]:
        lines.append(
            f"    {t['test']}: {_series(t['error_rate'], _pct)} | "
            f"{_series(t['p99_ms'], lambda v: _d(v / 1000))}"
        )
    return lines


def _junit(report: Report, gates: Sequence[GateResult]) -> str:
    root = ET.Element("testsuites", name="virtsvc")
    failed_on: dict[tuple[str, str], list[GateResult]] = {}
    for g in gates:
        for key in g.failed_methods:
            failed_on.setdefault(key, []).append(g)
    methods = ET.SubElement(root, "testsuite", name="virtsvc.methods", tests=str(len(report.methods)))
    failures = 0
    for m in report.methods:
        case = ET.SubElement(
            methods,
            "testcase",
            classname=f"virtsvc.{m.scenario or 'none'}",
            name=m.method,
            time=f"{m.p99:.6f}",
        )
        ET.SubElement(case, "system-out").text = (
            f"calls {m.calls}, errors {m.errors} ({_pct(m.error_rate)}), unmatched {m.unmatched}, "
            f"p50 {_d(m.p50)}, p90 {_d(m.p90)}, p99 {_d(m.p99)}, codes "
            + ", ".join(f"{k} {v}" for k, v in m.codes.items())
        )
        bad = failed_on.get((m.scenario, m.method))
        if bad:
            failures += 1
            ET.SubElement(
                case, "failure", message="; ".join(g.name for g in bad), type="virtsvc.gate"
            ).text = "\n".join(str(g) for g in bad)
    methods.set("failures", str(failures))
    suite = ET.SubElement(root, "testsuite", name="virtsvc.gates", tests=str(len(gates)))
    suite.set("failures", str(sum(not g.ok for g in gates)))
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname="virtsvc.gates", name=g.name)
        if g.ok:
            ET.SubElement(case, "system-out").text = g.figure
        else:
            ET.SubElement(case, "failure", message=g.figure, type="virtsvc.gate").text = g.figure
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00020;font-weight:600} .ok{color:#0a7d32;font-weight:600}
pre{background:#f7f7f7;padding:.5em;margin:.2em 0;white-space:pre-wrap}
"""


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = "".join(
            f'<td class="n">{html.escape(c)}</td>' if i in numeric else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    return "".join(out) + "</table>"


def _html(report: Report, gates: Sequence[GateResult], history: Mapping[str, Any] | None) -> str:
    e = html.escape
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>virtsvc report</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>virtsvc report</h1><p>{e(report.source)} "
        + "".join(f"{e(k)} <code>{e(v)}</code> " for k, v in report.filters.items())
        + f"{report.calls} calls, {report.errors} errors ({_pct(report.error_rate)}), "
        f"p50 {_d(report.p50)}, p90 {_d(report.p90)}, p99 {_d(report.p99)}</p>",
    ]
    if gates:
        parts.append("<h2>Gates</h2><table><tr><th>gate</th><th>verdict</th><th>figure</th></tr>")
        for g in gates:
            verdict = '<span class="ok">passed</span>' if g.ok else '<span class="bad">FAILED</span>'
            parts.append(f"<tr><td>{e(g.name)}</td><td>{verdict}</td><td>{e(g.figure)}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Per scenario and method</h2>")
    parts.append(_html_table(_METHOD_HEAD, _method_rows(report.methods), {2, 3, 4, 5, 6, 7, 8}))
    parts.append(f"<h2>Unmatched calls ({len(report.unmatched)})</h2>")
    for u in report.unmatched:
        test = f" in {u.label}" if u.label else ""
        parts.append(
            f"<p>{e(u.scenario or '(no scenario)')} <code>{e(u.method)}</code> "
            f"(session {e(u.session)}{e(test)})</p>"
            f"<pre>{e(u.near_miss)}</pre>"
        )
    if report.unused is None:
        parts.append("<h2>Unused rules</h2><p>not known (no server nor scenario files given)</p>")
    else:
        parts.append(f"<h2>Unused rules ({len(report.unused)})</h2>")
        parts.append(
            _html_table(
                ["rule", "scenario", "method"], [[r.rule, r.scenario, r.method] for r in report.unused]
            )
        )
    if report.tests:
        parts.append(f"<h2>Per test ({len(report.tests)})</h2>")
        rows = [
            [t.label, str(t.calls), str(t.errors), _pct(t.error_rate), _d(t.p99), str(t.unmatched)]
            for t in report.tests
        ]
        parts.append(
            _html_table(["test", "calls", "errors", "error rate", "p99", "unmatched"], rows, {1, 2, 3, 4, 5})
        )
    if history is not None:
        parts.append(f"<h2>History ({len(history['runs'])} runs)</h2>")
        parts.append(f"<h3>Flaky tests ({len(history['flaky'])})</h3>")
        for f in history["flaky"]:
            parts.append(
                f'<p class="bad">{e(f["test"])}: run {f["before"]} &rarr; run {f["after"]}</p>'
                f"<pre>{e(chr(10).join(f['changes']))}</pre>"
            )
        parts.append("<h3>Per method</h3>")
        rows = [
            [
                m["scenario"],
                m["method"],
                _series(m["error_rate"], _pct),
                _series(m["p99_ms"], lambda v: _d(v / 1000)),
            ]
            for m in history["methods"]
        ]
        parts.append(_html_table(["scenario", "method", "error rate", "p99"], rows))
        parts.append("<h3>Per test</h3>")
        rows = [
            [t["test"], _series(t["error_rate"], _pct), _series(t["p99_ms"], lambda v: _d(v / 1000))]
            for t in history["tests"]
        ]
        parts.append(_html_table(["test", "error rate", "p99"], rows))
    parts.append("</body></html>\n")
    return "".join(parts)
