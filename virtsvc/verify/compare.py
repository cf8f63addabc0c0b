"""Judging real answers against the rules: status first, then shape, then (``verify: exact``) values.

Shape is judged field by field on what the rule's reply sets: the field must exist on the target with the
same type (when the target offers reflection, its replies are decoded with its own schema, so a renamed or
retyped field shows), must be present in the real reply, and enum values must be known on both sides.
Fields the real reply has and the rule leaves out are fine, unless the scenario's contract lacks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from virtsvc.contracts.catalog import Catalog, MethodSpec
from virtsvc.scenarios.fields import is_map, show, type_name
from virtsvc.scenarios.model import CompiledScenario, Rule, Step, to_json
from virtsvc.verify.replay import Answer, Target, replay_of

__all__ = ["Outcome", "RuleResult", "verify_rule", "verify_rules"]

Outcome = Literal["ok", "drift", "skipped"]


@dataclass(frozen=True)
class RuleResult:
    """One rule's verdict: ``ok``, ``drift`` (with every drift found) or ``skipped`` (with the reason)."""

    rule: Rule
    scenario: str
    outcome: Outcome
    drift: tuple[str, ...] = ()
    reason: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def where(self) -> str:
        return self.rule.where

    def line(self) -> str:
        """The report line: ``file:line: outcome: method: what``."""
        text = f"{self.where}: {self.outcome}: {self.rule.method}"
        if self.drift:
            text += ": " + "; ".join(self.drift)
        elif self.reason:
            text += ": " + self.reason
        elif self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return text


def verify_rules(scenarios: Iterable[CompiledScenario], catalog: Catalog, target: Target) -> list[RuleResult]:
    """Verifies every rule of ``scenarios`` (each rule once, in file order) against ``target``."""
    results: list[RuleResult] = []
    seen: set[str] = set()
    for scenario in scenarios:
        for rule in scenario.rules:
            if rule.where in seen:
                continue
            seen.add(rule.where)
            results.append(verify_rule(rule, scenario.name, catalog, target))
    return results


def verify_rule(rule: Rule, scenario: str, catalog: Catalog, target: Target) -> RuleResult:
    """Replays ``rule``'s requests against ``target`` and compares the answers with the rule's."""
    spec = catalog.methods[rule.method]
    reason = _not_comparable(rule)
    replay = replay_of(rule, spec) if reason is None else reason
    if isinstance(replay, str):
        return RuleResult(rule, scenario, "skipped", reason=replay)
    step = rule.steps[0]
    drift: list[str] = []
    notes: list[str] = []
    if len(rule.steps) > 1:
        notes.append("a sequence: compared with its first answer")
    live = target.live_type(spec.output.full_name)
    if live is None and target.schema is not None:
        drift.append(f"the target knows no message {spec.output.full_name}")
    for i, requests in enumerate(replay.requests):
        answer = target.call(spec, requests, replay.metadata)
        found = _compare(spec, step, len(requests), answer, live, rule.verify == "exact", notes)
        prefix = f"examples[{i}]: " if len(replay.requests) > 1 else ""
        drift += [prefix + d for d in found]
    outcome: Outcome = "drift" if drift else "ok"
    return RuleResult(rule, scenario, outcome, tuple(drift), notes=tuple(dict.fromkeys(notes)))


def _not_comparable(rule: Rule) -> str | None:
    if rule.handler is not None:
        return "answered by a Python handler: nothing to compare with"
    if not rule.steps:
        return "the rule has no answer to compare with"
    step = rule.steps[0]
    if step.passthrough is not None:
        return f"forwarded to {step.passthrough}: the real service answers it already"
    if step.fault is not None:
        return f"answers with a fault ({step.fault.value}): nothing to compare with"
    return None


def _expected_bodies(spec: MethodSpec, step: Step, sent: int) -> list[bytes | None]:
    """The messages the rule answers with (None for a templated one), in order."""
    if step.each_request is not None:
        body = step.each_request.body
        return [body.static for _ in range(sent)] if body is not None else []
    if step.stream is not None:
        return [s.body.static for s in step.stream if s.body is not None]
    return [step.body.static] if step.body is not None else []


def _compare(
    spec: MethodSpec,
    step: Step,
    sent: int,
    answer: Answer,
    live: Descriptor | None,
    exact: bool,
    notes: list[str],
) -> list[str]:
    expected_code = step.status.code if step.status is not None else grpc.StatusCode.OK
    if answer.code != expected_code:
        said = f" ({answer.details})" if answer.details else ""
        return [f"status: expected {expected_code.name}, got {answer.code.name}{said}"]
    bodies = _expected_bodies(spec, step, sent)
    streamed = spec.server_streaming
    drift: list[str] = []
    if exact and len(answer.messages) != len(bodies) and (streamed or bodies):
        noun = "message" if len(bodies) == 1 else "messages"
        drift.append(
            f"{'stream' if streamed else 'reply'}: expected {len(bodies)} {noun}, got {len(answer.messages)}"
        )
    for i, (body, real) in enumerate(zip(bodies, answer.messages, strict=False)):
        path = f"stream[{i}]" if streamed else "reply"
        if body is None:
            notes.append("templated reply: not compared")
            continue
        expected = spec.output_class.FromString(body)
        drift += _shape(expected, real, spec, live, path)
        if exact:
            drift += _values(expected, real, spec, path)
    return drift


# -- shape ---------------------------------------------------------------------------------------------


def _decode(real: bytes, desc: Descriptor, path: str) -> tuple[dict[str, Any] | None, str | None]:
    cls = message_factory.GetMessageClass(desc)
    try:
        message = cls.FromString(real)
    except DecodeError as exc:
        return None, f"{path}: the real reply does not parse as {desc.full_name}: {exc}"
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, descriptor_pool=desc.file.pool
    ), None


def _shape(expected: Message, real: bytes, spec: MethodSpec, live: Descriptor | None, path: str) -> list[str]:
    decoded, error = _decode(real, live or spec.output, path)
    if decoded is None:
        return [error or path]
    drift: list[str] = []
    _walk(to_json(expected), spec.output, decoded, live or spec.output, live is not None, path, drift)
    return drift


def _walk(
    exp: Mapping[str, Any],
    exp_desc: Descriptor,
    real: Mapping[str, Any],
    real_desc: Descriptor,
    live: bool,
    path: str,
    drift: list[str],
) -> None:
    for key, ev in exp.items():
        ef = exp_desc.fields_by_name.get(key)
        if ef is None:  # pragma: no cover - to_json names the fields of exp_desc only
            continue
        kpath = f"{path}.{key}"
        rf = real_desc.fields_by_name.get(key)
        if rf is None:
            other = real_desc.fields_by_number.get(ef.number)
            hint = f" (field {ef.number} is {other.name} there)" if other is not None else ""
            drift.append(f"{kpath}: the target's {real_desc.full_name} has no field {key}{hint}")
            continue
        if type_name(ef) != type_name(rf):
            drift.append(
                f"{kpath}: {type_name(ef)} in the scenario's contract, {type_name(rf)} on the target"
            )
            continue
        if key not in real:
            drift.append(f"{kpath}: absent from the real reply")
            continue
        _field(ef, rf, ev, real[key], live, kpath, drift)
    if live:
        for key in real:
            if key in exp_desc.fields_by_name:
                continue
            rf = real_desc.fields_by_name[key]
            mine = exp_desc.fields_by_number.get(rf.number)
            if mine is not None and mine.name in exp:
                continue  # reported from the rule's side already
            hint = f" (field {rf.number} is {mine.name} there)" if mine is not None else ""
            drift.append(
                f"{path}.{key}: in the real reply, but {exp_desc.full_name} has no such field in the "
                f"scenario's contract{hint}"
            )


def _field(
    ef: FieldDescriptor, rf: FieldDescriptor, ev: Any, rv: Any, live: bool, path: str, drift: list[str]
) -> None:
    if is_map(ef):
        ev_f, rv_f = ef.message_type.fields_by_name["value"], rf.message_type.fields_by_name["value"]
        if isinstance(ev, Mapping) and isinstance(rv, Mapping):
            for k, item in ev.items():
                if k in rv:
                    _element(ev_f, rv_f, item, rv[k], live, f"{path}[{k}]", drift)
        return
    if ef.is_repeated:
        if isinstance(ev, list) and isinstance(rv, list):
            for i, (a, b) in enumerate(zip(ev, rv, strict=False)):
                _element(ef, rf, a, b, live, f"{path}[{i}]", drift)
        return
    _element(ef, rf, ev, rv, live, path, drift)


def _element(
    ef: FieldDescriptor, rf: FieldDescriptor, ev: Any, rv: Any, live: bool, path: str, drift: list[str]
) -> None:
    if ef.message_type is not None:
        if isinstance(ev, Mapping) and isinstance(rv, Mapping):
            _walk(ev, ef.message_type, rv, rf.message_type, live, path, drift)
        return
    if ef.enum_type is None:
        return
    mine, theirs = ef.enum_type, rf.enum_type
    if live and isinstance(ev, str) and ev not in theirs.values_by_name:
        drift.append(f"{path}: {ev} is not a value of {theirs.full_name} on the target")
    if isinstance(rv, int) or (isinstance(rv, str) and rv not in mine.values_by_name):
        drift.append(
            f"{path}: the real reply has {rv}, not a value of {mine.full_name} in the scenario's contract"
        )


# -- values (verify: exact) ------------------------------------------------------------------------


def _values(expected: Message, real: bytes, spec: MethodSpec, path: str) -> list[str]:
    try:
        message = spec.output_class.FromString(real)
    except DecodeError:
        return []  # the shape check has said so
    drift: list[str] = []
    _diff(to_json(expected), to_json(message), path, drift)
    return drift


def _diff(exp: Any, real: Any, path: str, drift: list[str]) -> None:
    if isinstance(exp, Mapping) and isinstance(real, Mapping):
        for key in [*exp, *(k for k in real if k not in exp)]:
            kpath = f"{path}.{key}"
            if key not in real:
                drift.append(f"{kpath}: expected {show(exp[key])}, got nothing")
            elif key not in exp:
                drift.append(f"{kpath}: expected nothing, got {show(real[key])}")
            else:
                _diff(exp[key], real[key], kpath, drift)
        return
    if isinstance(exp, list) and isinstance(real, list):
        if len(exp) != len(real):
            drift.append(f"{path}: expected {len(exp)} items, got {len(real)}: {show(real)}")
            return
        for i, (a, b) in enumerate(zip(exp, real, strict=True)):
            _diff(a, b, f"{path}[{i}]", drift)
        return
    if exp != real:
        drift.append(f"{path}: expected {show(exp)}, got {show(real)}")
