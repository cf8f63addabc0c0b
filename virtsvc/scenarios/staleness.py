"""Rules that a change of the contracts leaves behind.

A rule written by ``virtsvc record`` carries ``contract:``, the fingerprint of its method's contract when
it was recorded (:mod:`virtsvc.contracts.fingerprint`). Against today's descriptors, a rule whose
fingerprint differs holds answers of a contract that no longer exists: ``virtsvc check`` reports it at
its ``file:line`` and ``virtsvc record --mode refresh`` re-records exactly those rules.

For ``virtsvc diff --scenarios``, :func:`rules_broken_by` maps each change between two proto trees
(:mod:`virtsvc.contracts.diff`) to the rules it breaks: those of a method that changed or went, and those
whose data (``when.request``, ``examples``, replies and streamed replies) names a field or enum value that
changed. Template expressions are not followed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from virtsvc.contracts.catalog import Catalog
from virtsvc.contracts.diff import Change, Key
from virtsvc.contracts.fingerprint import spec_fingerprint
from virtsvc.errors import Problem
from virtsvc.scenarios.fields import message_info
from virtsvc.scenarios.model import CompiledScenario, Rule

__all__ = ["StaleRule", "rule_references", "rules_broken_by", "stale_rules"]


@dataclass(frozen=True)
class StaleRule:
    """A rule recorded against a contract that has since changed: what it was recorded against, and now."""

    rule: Rule
    recorded: str
    current: str

    @property
    def problem(self) -> Problem:
        """The ``file:line: message`` that ``virtsvc check`` prints."""
        return Problem(
            self.rule.location.file,
            self.rule.location.line,
            f"rule recorded against a contract that has since changed: {self.rule.method} "
            f"(recorded {self.recorded}, now {self.current}); "
            "re-record it with `virtsvc record --mode refresh`",
        )


def stale_rules(scenarios: Iterable[CompiledScenario], catalog: Catalog) -> list[StaleRule]:
    """The rules of ``scenarios`` with a ``contract:`` that differs from their method's fingerprint now,
    in file and line order. Rules without ``contract:`` (written by hand) are never stale."""
    found: list[StaleRule] = []
    current: dict[str, str] = {}
    for scenario in scenarios:
        for rule in scenario.rules:
            if rule.contract is None:
                continue
            spec = catalog.methods.get(rule.method)
            if spec is None:  # compiled against another catalog: the loader reports unknown methods
                continue
            now = current.get(rule.method)
            if now is None:
                now = current[rule.method] = spec_fingerprint(spec)
            if rule.contract != now:
                found.append(StaleRule(rule, rule.contract, now))
    found.sort(key=lambda s: (s.rule.location.file, s.rule.location.line))
    return found


def rules_broken_by(
    changes: Iterable[Change], scenarios: Iterable[CompiledScenario], catalog: Catalog
) -> dict[Change, list[Rule]]:
    """Each breaking change -> the rules (compiled against the OLD ``catalog``) it breaks, in file order."""
    refs = [(rule, rule_references(rule, catalog)) for s in scenarios for rule in s.rules]
    refs.sort(key=lambda r: (r[0].location.file, r[0].location.line))
    out: dict[Change, list[Rule]] = {}
    for change in changes:
        if change.breaking:
            out[change] = [rule for rule, keys in refs if keys & change.keys]
    return out


def rule_references(rule: Rule, catalog: Catalog) -> frozenset[Key]:
    """What a rule depends on: its method, and the messages, fields and enum values its data names."""
    keys: set[Key] = {("method", rule.method)}
    spec = catalog.methods.get(rule.method)
    node = rule.source
    if spec is None or not isinstance(node, Mapping):
        return frozenset(keys)
    when = node.get("when")
    if isinstance(when, Mapping):
        _walk(spec.input, when.get("request"), keys)
    examples = node.get("examples")
    for example in examples if isinstance(examples, list) else ():
        for message in example if isinstance(example, list) else [example]:
            _walk(spec.input, message, keys)
    steps = [node]
    sequence = node.get("sequence")
    if isinstance(sequence, list):
        steps += [item for item in sequence if isinstance(item, Mapping)]
    while steps:
        step = steps.pop()
        _walk(spec.output, step.get("reply"), keys)
        items = step.get("stream")
        if isinstance(items, list):
            steps += [item for item in items if isinstance(item, Mapping)]
        each = step.get("each_request")
        if isinstance(each, Mapping):
            steps.append(each)
    return frozenset(keys)


def _walk(message: Descriptor, value: Any, keys: set[Key]) -> None:
    """Adds the message, fields and enum values that ``value`` (proto3 JSON, maybe with operators) names."""
    if not isinstance(value, Mapping):
        return
    keys.add(("message", message.full_name))
    names = message_info(message).fields
    for key, item in value.items():
        if not isinstance(key, str):
            continue
        if key.startswith("$"):  # an operator on the message itself ($eq: {...})
            for operand in item if isinstance(item, list) else [item]:
                _walk(message, operand, keys)
            continue
        field = names.get(key)
        if field is not None:
            keys.add(("field", message.full_name, field.name))
            _value(field, item, keys)


def _value(field: FieldDescriptor, value: Any, keys: set[Key]) -> None:
    if isinstance(value, list):
        for item in value:
            _value(field, item, keys)
        return
    if isinstance(value, Mapping) and any(isinstance(k, str) and k.startswith("$") for k in value):
        for op, operand in value.items():
            if op != "$exists":
                _value(field, operand, keys)
        return
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        field = entry.fields_by_name["value"]
        if isinstance(value, Mapping):
            for item in value.values():
                _value(field, item, keys)
        return
    if entry is not None:
        _walk(entry, value, keys)
    elif field.enum_type is not None and isinstance(value, (str, int)) and not isinstance(value, bool):
        enum = field.enum_type
        found = enum.values_by_name.get(value) if isinstance(value, str) else enum.values_by_number.get(value)
        if found is not None:
            keys.add(("enum_value", enum.full_name, found.name))
