"""Quality gates for CI: a report's figures against the limits a team sets.

``--max-error-rate R``: the report's error rate (calls answered with any status but OK, over all its calls)
at most R. ``--max-p99 DURATION``: each scenario and method's p99 at most DURATION. ``--fail-on-unmatched``:
no call that no rule answered. ``--fail-on-unused``: no rule that no call used. Each gate that fails names
the figure that failed it; the CLI exits non-zero when any did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from virtsvc.errors import ConfigError
from virtsvc.observe.report import Report
from virtsvc.scenarios.loader import duration_seconds

__all__ = ["GateResult", "Gates", "format_duration", "parse_rate"]

_SHOWN = 5  # methods, calls or rules named in a failure before "and N more"


def format_duration(seconds: float) -> str:
    """``250ms``, ``1.5s``, ``800us``: as the scenario syntax writes durations."""
    if seconds >= 1:
        return f"{seconds:.3g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds * 1e6:.3g}us"


def parse_rate(text: str) -> float:
    """``0.05`` or ``5%`` -> 0.05; a ConfigError for anything else, or outside 0..1."""
    raw = text.strip()
    try:
        rate = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"--max-error-rate: not a rate: {text!r}; use e.g. 0.05 or 5%") from None
    if not 0 <= rate <= 1:
        raise ConfigError(f"--max-error-rate: a rate is between 0 and 1 (0% and 100%), not {text!r}")
    return rate


def parse_p99(text: str) -> float:
    seconds = duration_seconds(text)
    if seconds is None:
        raise ConfigError(f"--max-p99: bad duration {text!r}; use e.g. 250ms, 1.5s")
    return seconds


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: ``name`` as its flag reads (``max-p99 250ms``), ``figure`` what was measured."""

    name: str
    ok: bool
    figure: str
    # (scenario, method) rows the gate failed on, for per-method test cases in JUnit
    failed_methods: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{'passed' if self.ok else 'FAILED'}: {self.name}: {self.figure}"


def _more(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_SHOWN])
    return shown + (f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


@dataclass(frozen=True)
class Gates:
    """The limits set; None/False: that gate is not checked."""

    max_error_rate: float | None = None
    max_p99: float | None = None  # seconds
    fail_on_unmatched: bool = False
    fail_on_unused: bool = False

    @property
    def any(self) -> bool:
        return (
            self.max_error_rate is not None
            or self.max_p99 is not None
            or self.fail_on_unmatched
            or self.fail_on_unused
        )

    def check(self, report: Report) -> list[GateResult]:
        """The verdict of every gate set, in flag order."""
        results: list[GateResult] = []
        if self.max_error_rate is not None:
            limit = self.max_error_rate
            rate = report.error_rate
            worst = sorted((m for m in report.methods if m.errors), key=lambda m: -m.error_rate)
            figure = f"error rate {rate:.2%} ({report.errors} of {report.calls} calls)"
            if rate > limit and worst:
                figure += "; " + _more([f"{m.scenario} {m.method} {m.error_rate:.2%}" for m in worst])
            results.append(
                GateResult(
                    f"max-error-rate {limit:.2%}",
                    rate <= limit,
                    figure,
                    tuple((m.scenario, m.method) for m in worst if m.error_rate > limit)
                    if rate > limit
                    else (),
                )
            )
        if self.max_p99 is not None:
            limit = self.max_p99
            over = [m for m in report.methods if m.p99 > limit]
            if over:
                figure = _more([f"{m.scenario} {m.method} p99 {format_duration(m.p99)}" for m in over])
            else:
                slowest = max(report.methods, key=lambda m: m.p99, default=None)
                figure = (
                    f"slowest p99 {format_duration(slowest.p99)} ({slowest.scenario} {slowest.method})"
                    if slowest
                    else "no calls"
                )
            results.append(
                GateResult(
                    f"max-p99 {format_duration(limit)}",
                    not over,
                    figure,
                    tuple((m.scenario, m.method) for m in over),
                )
            )
        if self.fail_on_unmatched:
            unmatched = report.unmatched
            figure = f"{len(unmatched)} unmatched call{'' if len(unmatched) == 1 else 's'}"
            if unmatched:
                # The first near miss's head and its closest rule; the report holds every one in full.
                first = [line.strip() for line in unmatched[0].near_miss.splitlines()[:2]]
                figure += ": " + _more(
                    sorted({f"{u.scenario or '(no scenario)'} {u.method}" for u in unmatched})
                )
                if first:
                    figure += f"; the first: {' '.join(first)}"
            results.append(
                GateResult(
                    "fail-on-unmatched",
                    not unmatched,
                    figure,
                    tuple(sorted({(u.scenario, u.method) for u in unmatched})),
                )
            )
        if self.fail_on_unused:
            if report.unused is None:
                raise ConfigError(
                    "--fail-on-unused needs to know every rule: report from a server (--address), "
                    "or give the scenario files (--scenarios PATH)"
                )
            unused = report.unused
            figure = f"{len(unused)} unused rule{'' if len(unused) == 1 else 's'}"
            if unused:
                figure += ": " + _more([f"{r.rule} ({r.scenario} {r.method})" for r in unused])
            results.append(GateResult("fail-on-unused", not unused, figure))
        return results
