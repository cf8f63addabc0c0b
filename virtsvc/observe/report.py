"""Run reports: what a run's calls to the virtual services came to, per scenario and method, and per test.

A report is built from journal entries in the form ``GetJournal`` sends and ``virtsvc journal export``
writes (proto3 JSON of ``virtsvc.admin.v1.JournalEntry``: ``nearMiss``, ``scenarioVersion``, durations as
``"0.012s"``) and from the rules known to exist, which the journal alone cannot give: a rule no call used
leaves no entry. Those come from the server (``ListScenarios`` with ``include_rules``: every rule's
``file:line`` and how often it answered since the server started) or from loading the scenario files
(:func:`rules_of`).

Per scenario and method: calls, errors (any status but OK), error rate, latency p50/p90/p99 (the call's whole
duration, simulated delay included, nearest-rank percentiles), unmatched calls with their near-miss text;
the rules no call used (dead stubs) with their ``file:line``; per test (a session's label: the pytest plugin
labels each test's session with its node id) the same figures and a digest of what the test was answered.
Gates (:mod:`virtsvc.observe.gates`) judge a report; :mod:`virtsvc.observe.formats` renders it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtsvc.errors import ConfigError

if TYPE_CHECKING:
    import grpc

    from virtsvc.scenarios.model import CompiledScenario

__all__ = [
    "Call",
    "MethodFigures",
    "Report",
    "RuleInfo",
    "TestFigures",
    "Unmatched",
    "build_report",
    "fetch_journal",
    "fetch_rules",
    "journal_json",
    "percentile",
    "read_journal",
    "rules_of",
    "write_journal",
]

PERCENTILES = (50, 90, 99)


def _seconds(value: Any) -> float:
    """A proto3 JSON Duration (``"0.012s"``) or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            pass
    raise ValueError(f"not a duration: {value!r}")


@dataclass(frozen=True)
class Call:
    """One journal entry, as a report reads it."""

    seq: int
    scenario: str
    session: str
    method: str
    code: str
    duration: float  # seconds, the simulated delay included
    delay: float = 0.0
    version: Any = None  # the scenario's version as written (1, "v2"); None when it has none
    label: str = ""  # the session's label (the pytest plugin: the test's node id)
    message: str = ""
    rule: str = ""  # file:line of the rule that answered
    near_miss: str = ""
    requests: tuple[Any, ...] = ()
    replies: int = 0
    started_at: str = ""

    @property
    def matched(self) -> bool:
        return not self.near_miss

    @property
    def error(self) -> bool:
        return self.code != "OK"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Call:
        """From an entry in proto3 JSON; KeyError/ValueError/TypeError when it is not one."""
        requests = data.get("requests")
        if requests is None:
            requests = [data["request"]] if data.get("request") is not None else []
        return cls(
            seq=int(data.get("seq", 0)),
            scenario=str(data.get("scenario", "")),
            session=str(data.get("session", "")),
            method=str(data["method"]),
            code=str(data.get("code") or "OK"),
            duration=_seconds(data.get("duration", 0)),
            delay=_seconds(data.get("delay", 0)),
            version=data.get("scenarioVersion"),
            label=str(data.get("label") or ""),
            message=str(data.get("message") or ""),
            rule=str(data.get("rule") or ""),
            near_miss=str(data.get("nearMiss") or ""),
            requests=tuple(requests),
            replies=len(data.get("replies") or ()),
            started_at=str(data.get("startedAt") or ""),
        )


@dataclass(frozen=True)
class RuleInfo:
    """A rule that exists: its scenario, method and ``file:line``; ``uses`` as the server counted them
    (every session since it started), or None when the rules come from files."""

    scenario: str
    method: str
    rule: str
    uses: int | None = None


@dataclass(frozen=True)
class Unmatched:
    """A call no rule answered, with the near-miss text the caller was sent."""

    scenario: str
    session: str
    method: str
    near_miss: str
    label: str = ""
    seq: int = 0


@dataclass(frozen=True)
class MethodFigures:
    """The calls of one method in one scenario (or of one test: ``TestFigures.methods``)."""

    scenario: str
    method: str
    calls: int
    errors: int
    unmatched: int
    p50: float  # seconds
    p90: float
    p99: float
    codes: dict[str, int] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class TestFigures:
    """One test's calls: figures per method, and ``digest``, which changes when what the test asked or was
    answered changes (see :func:`answers_digest`); ``versions``: the scenario versions it ran against."""

    label: str
    calls: int
    errors: int
    unmatched: int
    p99: float
    methods: tuple[MethodFigures, ...]
    versions: tuple[str, ...]
    digest: str
    answers: tuple[str, ...]  # "method CODE rule" per call, sorted: what a change is shown with

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class Report:
    """A run's figures. ``unused`` is None when the rules are not known (no server nor scenario files)."""

    source: str
    calls: int
    errors: int
    p50: float
    p90: float
    p99: float
    methods: tuple[MethodFigures, ...]
    unmatched: tuple[Unmatched, ...]
    unused: tuple[RuleInfo, ...] | None
    tests: tuple[TestFigures, ...]
    filters: dict[str, str] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``--format json``): durations in milliseconds, rates as fractions."""

        def figures(m: MethodFigures) -> dict[str, Any]:
            return {
                "scenario": m.scenario,
                "method": m.method,
                "calls": m.calls,
                "errors": m.errors,
                "error_rate": round(m.error_rate, 6),
                "unmatched": m.unmatched,
                "p50_ms": _ms(m.p50),
                "p90_ms": _ms(m.p90),
                "p99_ms": _ms(m.p99),
                "codes": m.codes,
            }

        return {
            "source": self.source,
            "filters": self.filters,
            "calls": self.calls,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p50_ms": _ms(self.p50),
            "p90_ms": _ms(self.p90),
            "p99_ms": _ms(self.p99),
            "methods": [figures(m) for m in self.methods],
            "unmatched": [asdict(u) for u in self.unmatched],
            "unused_rules": None if self.unused is None else [asdict(r) for r in self.unused],
            "tests": [
                {
                    "test": t.label,
                    "calls": t.calls,
                    "errors": t.errors,
                    "error_rate": round(t.error_rate, 6),
                    "unmatched": t.unmatched,
                    "p99_ms": _ms(t.p99),
                    "versions": list(t.versions),
                    "digest": t.digest,
                    "methods": [figures(m) for m in t.methods],
                }
                for t in self.tests
            ],
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of ``values`` (sorted or not); 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _figures(scenario: str, method: str, calls: Sequence[Call]) -> MethodFigures:
    durations = [c.duration for c in calls]
    codes: dict[str, int] = {}
    for c in calls:
        codes[c.code] = codes.get(c.code, 0) + 1
    return MethodFigures(
        scenario=scenario,
        method=method,
        calls=len(calls),
        errors=sum(c.error for c in calls),
        unmatched=sum(not c.matched for c in calls),
        p50=percentile(durations, 50),
        p90=percentile(durations, 90),
        p99=percentile(durations, 99),
        codes=dict(sorted(codes.items())),
    )


def _by_method(calls: Iterable[Call]) -> tuple[MethodFigures, ...]:
    groups: dict[tuple[str, str], list[Call]] = {}
    for c in calls:
        groups.setdefault((c.scenario, c.method), []).append(c)
    return tuple(_figures(s, m, cs) for (s, m), cs in sorted(groups.items()))


def _version_text(call: Call) -> str:
    version = call.version
    if isinstance(version, float) and version.is_integer():
        version = int(version)  # proto3 JSON numbers are doubles: 1.0 was written 1
    return f"{call.scenario}@{'' if version is None else version}"


def answers_digest(calls: Iterable[Call]) -> tuple[str, tuple[str, ...]]:
    """What a test asked and was answered, as a digest, and its calls as ``method CODE rule`` lines.

    Each call counts as (method, requests, status code and message, the rule that answered or the near miss),
    in no particular order, since a test's concurrent calls finish in any order. Reply bodies are left out:
    ``uuid()``, ``now()`` and ``randint()`` in templates differ from one session to the next by design.
    """
    items = sorted(
        json.dumps(
            [c.method, list(c.requests), c.code, c.message, c.rule or c.near_miss, c.replies],
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        for c in calls
    )
    digest = hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
    return digest, tuple(sorted(f"{c.method} {c.code} {c.rule or 'unmatched'}" for c in calls))


def _tests(calls: Sequence[Call]) -> tuple[TestFigures, ...]:
    # A session's label is on every entry once its test ended; a session's entries all go to its test.
    label_of: dict[tuple[str, str], str] = {}
    for c in calls:
        if c.label:
            label_of.setdefault((c.scenario, c.session), c.label)
    session_labels: dict[str, str] = {}
    for (_, session), label in label_of.items():
        session_labels.setdefault(session, label)  # one test's session spans every scenario it used
    groups: dict[str, list[Call]] = {}
    for c in calls:
        test = c.label or session_labels.get(c.session)
        if test:
            groups.setdefault(test, []).append(c)
    out = []
    for label, group in sorted(groups.items()):
        digest, answers = answers_digest(group)
        out.append(
            TestFigures(
                label=label,
                calls=len(group),
                errors=sum(c.error for c in group),
                unmatched=sum(not c.matched for c in group),
                p99=percentile([c.duration for c in group], 99),
                methods=_by_method(group),
                versions=tuple(sorted({_version_text(c) for c in group})),
                digest=digest,
                answers=answers,
            )
        )
    return tuple(out)


def build_report(
    entries: Iterable[Mapping[str, Any] | Call],
    rules: Iterable[RuleInfo] | None = None,
    *,
    scenario: str | None = None,
    session: str | None = None,
    source: str = "",
) -> Report:
    """The report of ``entries`` (proto3 JSON dicts or :class:`Call`), narrowed to ``scenario``/``session``.

    With ``rules``, the unused ones are listed: a rule no call in the report used, and, when the server
    counted its uses and the report is not narrowed to a session, one it never used (calls that the
    journal's bound dropped still count then).
    """
    calls = [e if isinstance(e, Call) else Call.from_json(e) for e in entries]
    calls = [
        c for c in calls if (not scenario or c.scenario == scenario) and (not session or c.session == session)
    ]
    calls.sort(key=lambda c: c.seq)
    durations = [c.duration for c in calls]
    unused: tuple[RuleInfo, ...] | None = None
    if rules is not None:
        used = {c.rule for c in calls if c.rule}
        unused = tuple(
            r
            for r in rules
            if (not scenario or r.scenario == scenario)
            and r.rule not in used
            and (r.uses is None or session or not r.uses)
        )
    filters = {k: v for k, v in (("scenario", scenario), ("session", session)) if v}
    return Report(
        source=source,
        calls=len(calls),
        errors=sum(c.error for c in calls),
        p50=percentile(durations, 50),
        p90=percentile(durations, 90),
        p99=percentile(durations, 99),
        methods=_by_method(calls),
        unmatched=tuple(
            Unmatched(c.scenario, c.session, c.method, c.near_miss, c.label, c.seq)
            for c in calls
            if not c.matched
        ),
        unused=unused,
        tests=_tests(calls),
        filters=filters,
    )


# -- where entries and rules come from ------------------------------------------------------------------


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a JSON-lines journal file (``virtsvc journal export``); a bad line is a ConfigError
    naming ``file:line``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the journal: {exc.strerror or exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}")
            Call.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ConfigError(
                f"{path}:{number}: not a journal entry ({reason}); expected one JSON object per line, "
                "as `virtsvc journal export` writes"
            ) from None
        entries.append(data)
    return entries


def journal_json(entry: Any) -> dict[str, Any]:
    """A ``JournalEntry`` message as proto3 JSON, integral numbers as ints (Struct numbers are doubles, but
    proto3 JSON writes an int32 field ``3``, not ``3.0``)."""
    from google.protobuf import json_format

    return _plain(json_format.MessageToDict(entry))


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def write_journal(entries: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Writes ``entries`` as JSON lines (one entry per line); returns how many."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as out:
        for entry in entries:
            out.write(json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n")
            count += 1
    return count


def fetch_journal(
    channel: grpc.Channel,
    token: str | None = None,
    *,
    scenario: str = "",
    session: str = "",
    method: str = "",
) -> list[dict[str, Any]]:
    """The entries of a running server's journal (``GetJournal``), in proto3 JSON, oldest first."""
    from virtsvc.admin.api import AdminClient

    reply = AdminClient(channel, token, timeout=60).call(
        "GetJournal", scenario=scenario, session=session, method=method
    )
    return [journal_json(e) for e in reply.entries]


def fetch_rules(channel: grpc.Channel, token: str | None = None) -> list[RuleInfo]:
    """Every rule of a running server's scenarios with its use count (``ListScenarios`` with rules)."""
    from virtsvc.admin.api import AdminClient

    reply = AdminClient(channel, token, timeout=60).call("ListScenarios", include_rules=True)
    return [
        RuleInfo(info.name, rule.method, rule.rule, int(rule.uses))
        for info in reply.scenarios
        for rule in info.rules
    ]


def rules_of(scenarios: Iterable[CompiledScenario]) -> Iterator[RuleInfo]:
    """The rules of loaded scenarios (each scenario's own), uses unknown."""
    for compiled in scenarios:
        for rule in compiled.rules:
            yield RuleInfo(compiled.name, rule.method, rule.where)
