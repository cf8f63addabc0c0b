"""The router: scenario header and session id -> scenario -> the rule that answers a call.

Rules are indexed by (scenario, method) when scenarios are loaded, so a call's cost does not grow with the
number of scenarios or sessions. The index is an immutable snapshot swapped in one assignment: a reload or an
admin change never disturbs calls in flight, and the next call sees it.
"""

from __future__ import annotations

import difflib
import threading
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from virtsvc.engine.store import DEFAULT_SESSION, Session, Store
from virtsvc.scenarios.model import Call, CompiledScenario, MatchResult, Rule, Selection

__all__ = [
    "BAGGAGE_SCENARIO",
    "BAGGAGE_SESSION",
    "NO_SCENARIO",
    "SCENARIO_HEADER",
    "SESSION_HEADER",
    "Registry",
    "RouteError",
    "Router",
    "Selection",
    "parse_baggage",
]

SCENARIO_HEADER = "x-virtsvc-scenario"
SESSION_HEADER = "x-virtsvc-session"
BAGGAGE_SCENARIO = "virtsvc-scenario"
BAGGAGE_SESSION = "virtsvc-session"
NO_SCENARIO = ""  # sessions that hold only session-scoped rules live under the empty scenario name


class RouteError(Exception):
    """A call that cannot be routed: answered with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Snapshot:
    scenarios: Mapping[str, CompiledScenario]
    index: Mapping[str, Mapping[str, tuple[Rule, ...]]]  # scenario -> method -> rules, best first


def _ordered(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    # Higher priority first; ties keep file order (sorted is stable).
    return tuple(sorted(rules, key=lambda r: -r.priority))


def _build_index(scenarios: Mapping[str, CompiledScenario]) -> dict[str, dict[str, tuple[Rule, ...]]]:
    index: dict[str, dict[str, tuple[Rule, ...]]] = {}

    def resolve(name: str, trail: tuple[str, ...]) -> dict[str, tuple[Rule, ...]]:
        if name in index:
            return index[name]
        scenario = scenarios[name]
        own: dict[str, list[Rule]] = {}
        for rule in scenario.rules:
            own.setdefault(rule.method, []).append(rule)
        methods = {m: _ordered(rs) for m, rs in own.items()}
        parent = scenario.extends
        if parent and parent in scenarios and parent not in trail:
            # Own rules are tried first, then the parent's (already resolved with its own parents).
            for method, rules in resolve(parent, (*trail, name)).items():
                methods[method] = methods.get(method, ()) + rules
        index[name] = methods
        return methods

    for name in scenarios:
        resolve(name, ())
    return index


class Registry:
    """The loaded scenarios and their method index; changes swap in a new snapshot atomically."""

    def __init__(self, scenarios: Iterable[CompiledScenario] = ()) -> None:
        self._lock = threading.Lock()
        self._snapshot = _Snapshot({}, {})
        self.replace_all(scenarios)

    def replace_all(self, scenarios: Iterable[CompiledScenario]) -> None:
        by_name = {s.name: s for s in scenarios}
        with self._lock:
            self._snapshot = _Snapshot(by_name, _build_index(by_name))

    def put(self, scenario: CompiledScenario) -> None:
        with self._lock:
            by_name = {**self._snapshot.scenarios, scenario.name: scenario}
            self._snapshot = _Snapshot(by_name, _build_index(by_name))

    def delete(self, name: str) -> bool:
        with self._lock:
            if name not in self._snapshot.scenarios:
                return False
            by_name = {k: v for k, v in self._snapshot.scenarios.items() if k != name}
            self._snapshot = _Snapshot(by_name, _build_index(by_name))
            return True

    def get(self, name: str) -> CompiledScenario | None:
        return self._snapshot.scenarios.get(name)

    def names(self) -> list[str]:
        return sorted(self._snapshot.scenarios)

    def scenarios(self) -> list[CompiledScenario]:
        return [self._snapshot.scenarios[n] for n in self.names()]

    def rules_for(self, scenario: str, method: str) -> tuple[Rule, ...]:
        return self._snapshot.index.get(scenario, {}).get(method, ())

    def methods_of(self, scenario: str) -> list[str]:
        return sorted(self._snapshot.index.get(scenario, {}))

    def __contains__(self, name: object) -> bool:
        return name in self._snapshot.scenarios

    def __len__(self) -> int:
        return len(self._snapshot.scenarios)


def parse_baggage(value: str) -> dict[str, str]:
    """W3C baggage: ``k=v;prop, k2=v2`` with percent-encoded values; malformed members are skipped."""
    out: dict[str, str] = {}
    for member in value.split(","):
        pair = member.split(";", 1)[0]
        key, sep, val = pair.partition("=")
        if sep:
            out[key.strip()] = urllib.parse.unquote(val.strip())
    return out


class Router:
    """Turns a call's metadata into (scenario, session) and picks the rule that answers it."""

    def __init__(self, registry: Registry, store: Store, default_scenario: str | None = None) -> None:
        self.registry = registry
        self.store = store
        self.default_scenario = default_scenario

    def route(self, metadata: Mapping[str, str]) -> tuple[CompiledScenario | None, Session]:
        """Picks the scenario and session named by the call's metadata (explicit headers win over baggage);
        no scenario (None) for a session that holds only session-scoped rules."""
        scenario = metadata.get(SCENARIO_HEADER)
        session_id = metadata.get(SESSION_HEADER)
        if (scenario is None or session_id is None) and "baggage" in metadata:
            baggage = parse_baggage(metadata["baggage"])
            scenario = scenario if scenario is not None else baggage.get(BAGGAGE_SCENARIO)
            session_id = session_id if session_id is not None else baggage.get(BAGGAGE_SESSION)
        session_id = session_id or DEFAULT_SESSION
        if not scenario:
            if self.default_scenario:
                scenario = self.default_scenario
            else:
                # A session that holds only session-scoped rules (pytest inline rules) needs no scenario.
                bare = self.store.find(NO_SCENARIO, session_id)
                if bare is not None and bare.rules:
                    return None, bare
                raise RouteError(grpc.StatusCode.FAILED_PRECONDITION, self._no_scenario_message())
        compiled = self.registry.get(scenario)
        if compiled is None:
            raise RouteError(grpc.StatusCode.NOT_FOUND, self._unknown_scenario_message(scenario))
        return compiled, self.store.get(scenario, session_id)

    def select(self, call: Call) -> Selection:
        """The first rule (session rules, then the scenario's, best first) whose ``when`` holds and that
        is not used up; otherwise a near-miss explanation."""
        method = call.method.full_name
        session = call.session
        session_rules = session.rules.get(method, ())
        rules = self.registry.rules_for(call.scenario, method)
        misses: list[tuple[Rule, MatchResult]] = []
        used_up: list[Rule] = []
        for candidates in (session_rules, rules):
            for rule in candidates:
                if rule.when is not None:
                    result = rule.when.check(call)
                    if not result.ok:
                        misses.append((rule, result))
                        continue
                if rule.times is not None and not session.take(_counter_key(rule), rule.times):
                    used_up.append(rule)
                    continue
                return rule.selection
        return Selection(None, self._near_miss(call, session_rules, rules, misses, used_up), misses, used_up)

    # -- messages: part of the API, asserted by tests ---------------------------------------------

    def _no_scenario_message(self) -> str:
        names = self.registry.names()
        loaded = ", ".join(names) if names else "none"
        return (
            f'no scenario selected: send the metadata header "{SCENARIO_HEADER}: NAME" '
            f'(or baggage "{BAGGAGE_SCENARIO}=NAME"), or start the server with a default scenario; '
            f"loaded scenarios: {loaded}"
        )

    def _unknown_scenario_message(self, name: str) -> str:
        names = self.registry.names()
        text = f'unknown scenario "{name}"'
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        if close:
            text += "; did you mean " + " or ".join(f'"{c}"' for c in close) + "?"
        text += "; loaded scenarios: " + (", ".join(names) if names else "none")
        return text

    def _near_miss(
        self,
        call: Call,
        session_rules: Sequence[Rule],
        rules: Sequence[Rule],
        misses: list[tuple[Rule, MatchResult]],
        used_up: list[Rule],
    ) -> str:
        method = call.method.full_name
        where = (
            f'scenario "{call.scenario}", session "{call.session.id}"'
            if call.scenario
            else (f'session "{call.session.id}"')
        )
        if not session_rules and not rules:
            covered = self.registry.methods_of(call.scenario) if call.scenario else []
            text = f"no rule for {method} in {where}"
            if covered:
                text += "; its rules cover: " + ", ".join(covered)
            return text
        lines = [f"no rule matched {method} in {where}"]
        ranked = sorted(
            misses, key=lambda m: (-(m[1].passed / m[1].total if m[1].total else 0), -m[1].passed)
        )
        for i, (rule, result) in enumerate(ranked[:3]):
            label = "closest" if i == 0 else "also"
            lines.append(
                f"  {label}: rule at {rule.location} ({result.passed} of {result.total} conditions held): "
                + "; ".join(result.failures)
            )
        if len(ranked) > 3:
            lines.append(f"  ... and {len(ranked) - 3} more rules that did not match")
        for rule in used_up:
            lines.append(f"  used up: rule at {rule.location} matched but is used up (times={rule.times})")
        return "\n".join(lines)


def _counter_key(rule: Rule) -> str:
    return f"times:{rule.scenario}:{rule.key}"


def sequence_key(rule: Rule) -> str:
    return f"seq:{rule.scenario}:{rule.key}"
