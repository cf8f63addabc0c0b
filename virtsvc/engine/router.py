"""The router: scenario header and session id -> scenario -> the rule that answers a call.

Rules are indexed by (scenario, method) when scenarios are loaded, so a call's cost does not grow with the
number of scenarios or sessions. The index is an immutable snapshot swapped in one assignment: a reload or an
admin change never disturbs calls in flight, and the next call sees it.
"""

from __future__ import annotations

import functools
import threading
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from virtsvc import _text
from virtsvc.engine.store import DEFAULT_SESSION, PutRule, RuleChange, RuleSet, SessionState, Store
from virtsvc.errors import Refusal, RuleFailure, VirtsvcError
from virtsvc.scenarios.answers import Answer, Plan
from virtsvc.scenarios.data import EMPTY_DATA, DataSets
from virtsvc.scenarios.model import (
    Call,
    CompiledScenario,
    Effect,
    Location,
    MatchResult,
    Rule,
    Status,
    Step,
)

__all__ = [
    "BAGGAGE_SCENARIO",
    "BAGGAGE_SESSION",
    "NO_SCENARIO",
    "SCENARIO_HEADER",
    "SESSION_HEADER",
    "Choice",
    "Registry",
    "Router",
    "parse_baggage",
    "unknown_scenario_message",
]

SCENARIO_HEADER = "x-virtsvc-scenario"
SESSION_HEADER = "x-virtsvc-session"
BAGGAGE_SCENARIO = "virtsvc-scenario"
BAGGAGE_SESSION = "virtsvc-session"
NO_SCENARIO = ""  # sessions that hold only session-scoped rules live under the empty scenario name


@dataclass(frozen=True)
class _Snapshot:
    scenarios: Mapping[str, CompiledScenario]
    index: Mapping[str, Mapping[str, tuple[Rule, ...]]]  # scenario -> method -> rules, best first
    data: Mapping[str, DataSets]  # scenario -> its data collections, an extended scenario's included


def _snapshot(scenarios: Mapping[str, CompiledScenario]) -> _Snapshot:
    return _Snapshot(scenarios, _build_index(scenarios), _build_data(scenarios))


def _build_data(scenarios: Mapping[str, CompiledScenario]) -> dict[str, DataSets]:
    """Each scenario's collections over those of the scenarios it extends (its own win by name)."""
    out: dict[str, DataSets] = {}

    def resolve(name: str, trail: tuple[str, ...]) -> DataSets:
        if name in out:
            return out[name]
        scenario = scenarios[name]
        own = scenario.data or EMPTY_DATA
        parent = scenario.extends
        if parent and parent in scenarios and parent not in trail:
            own = own.merged(resolve(parent, (*trail, name)))
        out[name] = own
        return own

    for name in scenarios:
        resolve(name, ())
    return {k: v for k, v in out.items() if v}


def _build_index(scenarios: Mapping[str, CompiledScenario]) -> dict[str, dict[str, tuple[Rule, ...]]]:
    index: dict[str, dict[str, tuple[Rule, ...]]] = {}

    def resolve(name: str, trail: tuple[str, ...]) -> dict[str, tuple[Rule, ...]]:
        if name in index:
            return index[name]
        scenario = scenarios[name]
        for rule in scenario.rules:
            _ = rule.plan  # decided once per rule, at load, not on its first call
        # The one grouping by method, best first, shared with session rules.
        methods = dict(RuleSet(scenario.rules))
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
        self._snapshot = _Snapshot({}, {}, {})
        self.replace_all(scenarios)

    def replace_all(self, scenarios: Iterable[CompiledScenario]) -> None:
        by_name = {s.name: s for s in scenarios}
        with self._lock:
            self._snapshot = _snapshot(by_name)

    def put(self, scenario: CompiledScenario) -> None:
        with self._lock:
            by_name = {**self._snapshot.scenarios, scenario.name: scenario}
            self._snapshot = _snapshot(by_name)

    def delete(self, name: str) -> bool:
        with self._lock:
            if name not in self._snapshot.scenarios:
                return False
            by_name = {k: v for k, v in self._snapshot.scenarios.items() if k != name}
            self._snapshot = _snapshot(by_name)
            return True

    def get(self, name: str) -> CompiledScenario | None:
        return self._snapshot.scenarios.get(name)

    def names(self) -> list[str]:
        return sorted(self._snapshot.scenarios)

    def scenarios(self) -> list[CompiledScenario]:
        return [self._snapshot.scenarios[n] for n in self.names()]

    def rules_for(self, scenario: str, method: str) -> tuple[Rule, ...]:
        return self._snapshot.index.get(scenario, {}).get(method, ())

    def data_of(self, scenario: str) -> DataSets | None:
        """The scenario's data collections (an extended scenario's included); None when it has none."""
        return self._snapshot.data.get(scenario)

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


class Choice:
    """The rule chosen for a call, its answer, the step's position (0 but in a sequence) and the call's
    attempt: its 1-based number among the rule's calls in the session (0 when the rule does not count)."""

    __slots__ = ("answer", "attempt", "index", "refusal", "rule")

    def __init__(
        self,
        rule: Rule,
        answer: Answer | None,
        index: int,
        refusal: Refusal | None = None,
        attempt: int = 0,
    ) -> None:
        self.rule = rule
        self.answer = answer
        self.index = index
        self.refusal = refusal  # the rule answers this call by refusing it (an exhausted sequence)
        self.attempt = attempt


def mode_rule(mode: str, upstream: str) -> Rule:
    """The rule that forwards what the server-wide ``--mode`` sends to the real service (journaled as
    answered by ``--mode spy`` or ``--mode passthrough``)."""
    at = Location(f"--mode {mode}", 0)
    return Rule("", f"mode:{mode}", "*", at, (Step(at, passthrough=upstream),))


class Router:
    """Turns a call's metadata into (scenario, session), and owns the choice of the rule that answers it:
    candidates (the session's rules, then the scenario's, best first), conditions, ``times`` and sequence
    positions; then the scenario's ``passthrough`` and, in ``spy`` mode, the real service.

    ``mode`` is ``simulate`` (scenarios only), ``spy`` (scenarios first, then ``upstream`` for what no rule
    answers, and for calls that name no scenario) or ``passthrough`` (``upstream`` answers everything).
    """

    def __init__(
        self,
        registry: Registry,
        store: Store,
        default_scenario: str | None = None,
        *,
        mode: str = "simulate",
        upstream: str | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.default_scenario = default_scenario
        self.mode = mode
        self.forward_all = mode == "passthrough"
        self._mode_rule = mode_rule(mode, upstream) if mode != "simulate" and upstream is not None else None
        # A shared store's check for admin changes made by other processes (None: this process alone).
        self._check_changes = getattr(store, "check_changes", None)

    def route(
        self, metadata: Mapping[str, str], *, calling: bool = False, method: str | None = None
    ) -> tuple[CompiledScenario | None, SessionState]:
        """The scenario and session named by the call's metadata (explicit headers win over baggage); no
        scenario (None) for a session that holds only session-scoped rules. Refusal when there is none.
        ``calling``: for the call itself, which touches the session next (see ``Store.session``).
        ``method``: the call's, when nothing may stop it between here and its choice, so the step its rule
        surely moves may be moved in the look-up (see :meth:`sure_step`)."""
        scenario = metadata.get(SCENARIO_HEADER)
        session_id = metadata.get(SESSION_HEADER)
        if (scenario is None or session_id is None) and "baggage" in metadata:
            baggage = parse_baggage(metadata["baggage"])
            scenario = scenario if scenario is not None else baggage.get(BAGGAGE_SCENARIO)
            session_id = session_id if session_id is not None else baggage.get(BAGGAGE_SESSION)
        session_id = session_id or DEFAULT_SESSION
        if self.forward_all:
            # Everything is real: the scenario named (if any) only files the call in the journal.
            return None, self.store.session(scenario or NO_SCENARIO, session_id, calling=calling)
        if not scenario:
            if self._mode_rule is not None and not self.default_scenario:
                # spy: nothing to match, everything real
                return None, self.store.session(NO_SCENARIO, session_id, calling=calling)
            if self.default_scenario:
                scenario = self.default_scenario
            else:
                # A session that holds only session-scoped rules (pytest inline rules) needs no scenario.
                bare = self.store.find(NO_SCENARIO, session_id)
                if bare is not None and bare.rules:
                    return None, bare
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION, self._no_scenario_message(), near_miss=True
                )
        registry = self.registry
        if scenario not in registry and self._check_changes is not None:
            self._check_changes()  # put through another replica's admin API a moment ago?
        if scenario not in registry:
            raise self._unknown(scenario)
        step = None if method is None else functools.partial(self.sure_step, scenario, method)
        session = self.store.session(scenario, session_id, calling=calling, step=step)
        # Looked up after the store answered: a shared store applies other replicas' admin changes then.
        compiled = registry.get(scenario)
        if compiled is None:
            raise self._unknown(scenario)
        return compiled, session

    def sure_step(self, scenario: str, method: str) -> str | None:
        """The counter a call of ``method`` moves whatever it sends, when the session has no rules of its
        own: that of the scenario's first rule for it, if it has no ``when`` nor ``times`` (it answers every
        call) and moves one (a sequence, or delays growing with the attempt). None otherwise."""
        rules = self.registry.rules_for(scenario, method)
        if not rules:
            return None
        rule = rules[0]
        if rule.when is not None or rule.times is not None or rule.per_message:
            return None
        if rule.is_sequence:
            return rule.sequence_key
        return rule.attempt_key if rule.counts_attempts else None

    def _unknown(self, scenario: str) -> Refusal:
        return Refusal(
            grpc.StatusCode.NOT_FOUND,
            unknown_scenario_message(scenario, self.registry.names()),
            near_miss=True,
        )

    def candidates(self, session: SessionState, scenario: str, method: str) -> tuple[Rule, ...]:
        """Every rule that may answer, in the order they are tried: the session's own, then the scenario's."""
        own_rules = session.rules
        own = own_rules.get(method, ())
        rules = self.registry.rules_for(scenario, method)
        if own_rules.hidden:  # effects removed or replaced some of the scenario's rules in this session
            rules = tuple(r for r in rules if r.ref not in own_rules.hidden)
        return own + rules if own else rules

    def plan(self, session: SessionState, scenario: str, method: str) -> tuple[Rule, Plan] | None:
        """The first candidate's fixed plan, when it answers every call alike (no session rules before it)."""
        if session.rules or session.rules.hidden or self.forward_all:
            return None
        rules = self.registry.rules_for(scenario, method)
        if not rules:
            return None
        plan = rules[0].plan
        return None if plan is None else (rules[0], plan)

    def choose(self, call: Call) -> Choice:
        """The first candidate whose ``when`` holds and that is not used up, with the step it answers with
        (a sequence moves on); Refusal with the near-miss report when none does, or when a sequence with
        ``after: fail`` is exhausted.

        A call for one message of a bidi stream (``call.position`` set) is answered by the per-message rules
        alone, and only by one that has a reply for that position; the whole call by the others."""
        session = call.session
        per_message = call.position is not None
        if self.forward_all:
            assert self._mode_rule is not None
            return self._step(self._mode_rule, session)
        method = call.method.full_name
        misses: list[tuple[Rule, MatchResult]] = []
        used_up: list[Rule] = []
        candidates = self.candidates(session, call.scenario, method)
        for rule in candidates:
            if rule.per_message is not per_message:
                continue
            if per_message and not _answers_position(rule, call.position):
                misses.append((rule, _past_replies(rule, call.position)))
                continue
            if rule.when is not None:
                try:
                    result = rule.when.check(call)
                except Refusal:
                    raise
                except Exception as exc:  # a matcher's bug: name the rule it belongs to
                    raise RuleFailure(rule, exc) from exc
                if not result.ok:
                    misses.append((rule, result))
                    continue
            attempt = 0
            if rule.times is not None:
                attempt = session.take(rule.times_key, rule.times)
                if not attempt:
                    used_up.append(rule)
                    continue
            choice = self._step(rule, session, attempt)
            if rule.effects and choice.refusal is None:
                self._apply_effects(rule, call, choice.index)
            return choice
        fallback = None if per_message else self._fallback(call.scenario)
        if fallback is not None:
            return self._step(fallback, session)
        near_miss = self._near_miss(call, candidates, misses, used_up)
        unmatched = self._unmatched(call.scenario)
        if unmatched is None:
            raise Refusal(grpc.StatusCode.UNIMPLEMENTED, near_miss, near_miss=True)
        raise self._unmatched_refusal(unmatched, call, near_miss)

    def _apply_effects(self, rule: Rule, call: Call, index: int) -> None:
        """Changes the session's rules as the rule's effects say, before it answers (the next call sees
        the change)."""
        changes: list[RuleChange] = []
        for effect in rule.effects:
            if effect.kind == "remove":
                changes.extend(("remove", ref) for ref in effect.ids)
                continue
            try:
                put = _put_rule(rule, effect, call, index)
            except Refusal:
                raise
            except Exception as exc:  # a template or the rule it renders: say which effect and why
                raise Refusal(
                    grpc.StatusCode.INTERNAL,
                    f"the effect at {effect.location} (of the rule at {rule.location}) failed: "
                    + (str(exc) if isinstance(exc, VirtsvcError) else _text.describe(exc)),
                ) from None
            changes.append(("put", put))
        session = call.session
        self.store.change_rules(session.scenario, session.id, changes)

    def _inherited(self, scenario: str, attribute: str) -> Any:
        """``attribute`` of the scenario or of the nearest one it extends that sets it; None if none does."""
        seen: set[str] = set()
        name: str | None = scenario
        while name and name not in seen:
            seen.add(name)
            compiled = self.registry.get(name)
            if compiled is None:
                break
            value = getattr(compiled, attribute)
            if value is not None:
                return value
            name = compiled.extends
        return None

    def _unmatched(self, scenario: str) -> Status | None:
        """The ``unmatched:`` status of the scenario, or of the nearest one it extends."""
        status: Status | None = self._inherited(scenario, "unmatched")
        return status

    @staticmethod
    def _unmatched_refusal(status: Status, call: Call, near_miss: str) -> Refusal:
        """The scenario's own status for a call no rule answers: its message, else the near-miss text; with
        a message of its own, the near-miss text travels as a ``google.rpc.DebugInfo`` detail."""
        details = status.details
        if status.message is None:
            return Refusal(status.code, near_miss, near_miss=True, details=details)
        try:
            message = status.message.render(call, 0)
        except Exception as exc:  # a template failing at run time: say which and why
            message = f"the unmatched message template failed: {_text.describe(exc)}"
        debug = any_pb2.Any()
        debug.Pack(error_details_pb2.DebugInfo(detail=near_miss))
        return Refusal(
            status.code,
            message,
            near_miss=True,
            details=(*details, debug.SerializeToString()),
            report=near_miss,
        )

    def _fallback(self, scenario: str) -> Rule | None:
        """What answers a call no rule matched: the scenario's ``passthrough`` (or the nearest one it
        extends), else the real service in spy mode."""
        rule: Rule | None = self._inherited(scenario, "fallback")
        return rule if rule is not None else self._mode_rule

    @staticmethod
    def _step(rule: Rule, session: SessionState, attempt: int = 0) -> Choice:
        """The rule's step for this call. The attempt of a rule whose delays grow with it comes from a
        counter the call moves anyway (``times``, the sequence) or, failing one, from its own: one atomic
        increment that also reads, so a shared store pays one round trip for it, never two."""
        answers = rule.answers
        if not rule.is_sequence:
            if not attempt and rule.counts_attempts:
                attempt = session.advance(rule.attempt_key) + 1
            # no answer: a Python handler answers
            return Choice(rule, answers[0] if answers else None, 0, attempt=attempt)
        pos = session.advance(rule.sequence_key)
        attempt = pos + 1
        n = len(answers)
        if pos < n:
            return Choice(rule, answers[pos], pos, attempt=attempt)
        if rule.after == "cycle":
            return Choice(rule, answers[pos % n], pos % n, attempt=attempt)
        if rule.after == "fail":
            refusal = Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the sequence of the rule at {rule.location} is exhausted: it had {n} steps and this is "
                f"call {pos + 1} (after: fail)",
            )
            return Choice(rule, answers[-1], n - 1, refusal, attempt)
        return Choice(rule, answers[-1], n - 1, attempt=attempt)

    # -- messages: part of the API, asserted by tests ---------------------------------------------

    def _no_scenario_message(self) -> str:
        names = self.registry.names()
        loaded = ", ".join(names) if names else "none"
        return (
            f'no scenario selected: send the metadata header "{SCENARIO_HEADER}: NAME" '
            f'(or baggage "{BAGGAGE_SCENARIO}=NAME"), or start the server with a default scenario; '
            f"loaded scenarios: {loaded}"
        )

    def _near_miss(
        self,
        call: Call,
        candidates: Sequence[Rule],
        misses: list[tuple[Rule, MatchResult]],
        used_up: list[Rule],
    ) -> str:
        method = call.method.full_name
        if call.position is not None:
            method += f" (message {call.position})"
        where = (
            f'scenario "{call.scenario}", session "{call.session.id}"'
            if call.scenario
            else (f'session "{call.session.id}"')
        )
        if not candidates:
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


def _put_rule(rule: Rule, effect: Effect, call: Call, index: int) -> PutRule:
    """The rule a ``put`` effect puts: compiled at load, or rendered from the triggering call and compiled."""
    if effect.rule is not None:
        assert effect.rule.id is not None
        return PutRule(effect.rule.id, rule.scenario, effect.data, effect.rule)
    assert effect.template is not None and effect.compile is not None
    data = effect.template.render(call, call.position if call.position is not None else index)
    put = effect.compile(data)
    assert put.id is not None
    return PutRule(put.id, rule.scenario, data, put)


def _answers_position(rule: Rule, position: int | None) -> bool:
    """Whether a per-message rule has a reply for the message at ``position`` (``replies`` are by index)."""
    replies = rule.steps[0].replies if rule.steps else None
    return replies is None or (position is not None and position < len(replies))


def _past_replies(rule: Rule, position: int | None) -> MatchResult:
    replies = rule.steps[0].replies or ()
    return MatchResult(False, 0, 1, (f"replies: message {position} is past its {len(replies)} replies",))


def unknown_scenario_message(name: str, names: Sequence[str]) -> str:
    """The one wording of "no such scenario", for calls, the admin API and the testing helpers alike."""
    text = f'unknown scenario "{name}"' + _text.did_you_mean(name, names, n=3, quote='"')
    return text + "; loaded scenarios: " + _text.quoted_list(names)
