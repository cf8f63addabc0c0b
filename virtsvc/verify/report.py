"""Verification reports: text (one line per rule), JSON, or JUnit XML for CI dashboards."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from xml.etree import ElementTree

from virtsvc.verify.compare import RuleResult

__all__ = ["REPORT_FORMATS", "render", "summary"]

REPORT_FORMATS = ("text", "json", "junit")


def summary(results: Sequence[RuleResult], target: str) -> str:
    """``verified 5 rules against 127.0.0.1:50051: 3 ok, 1 drifted, 1 skipped``."""
    counts = Counter(r.outcome for r in results)
    noun = "rule" if len(results) == 1 else "rules"
    return (
        f"verified {len(results)} {noun} against {target}: {counts['ok']} ok, {counts['drift']} drifted, "
        f"{counts['skipped']} skipped"
    )


def render(results: Sequence[RuleResult], target: str, fmt: str = "text") -> str:
    """The whole report in ``fmt`` (one of :data:`REPORT_FORMATS`), ending with a newline."""
    if fmt == "text":
        return "".join(r.line() + "\n" for r in results) + summary(results, target) + "\n"
    if fmt == "json":
        counts = Counter(r.outcome for r in results)
        data = {
            "target": target,
            "rules": [
                {
                    "rule": r.where,
                    "scenario": r.scenario,
                    "method": r.rule.method,
                    "outcome": r.outcome,
                    "drift": list(r.drift),
                    "reason": r.reason,
                    "notes": list(r.notes),
                }
                for r in results
            ],
            "summary": {"ok": counts["ok"], "drift": counts["drift"], "skipped": counts["skipped"]},
        }
        return json.dumps(data, indent=2) + "\n"
    if fmt == "junit":
        return _junit(results, target)
    raise ValueError(f"report format must be one of {', '.join(REPORT_FORMATS)}, not {fmt!r}")


def _junit(results: Sequence[RuleResult], target: str) -> str:
    counts = Counter(r.outcome for r in results)
    suite = ElementTree.Element(
        "testsuite",
        name=f"virtsvc verify {target}",
        tests=str(len(results)),
        failures=str(counts["drift"]),
        skipped=str(counts["skipped"]),
        errors="0",
    )
    for r in results:
        case = ElementTree.SubElement(
            suite, "testcase", classname=r.scenario, name=f"{r.where} {r.rule.method}"
        )
        if r.outcome == "drift":
            failure = ElementTree.SubElement(case, "failure", message=r.drift[0])
            failure.text = "\n".join(r.drift)
        elif r.outcome == "skipped":
            ElementTree.SubElement(case, "skipped", message=r.reason)
    suites = ElementTree.Element("testsuites")
    suites.append(suite)
    ElementTree.indent(suites)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(suites, encoding="unicode") + "\n"
    )
