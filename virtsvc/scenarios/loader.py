"""Compiling scenario files and scripts (read by :mod:`virtsvc.scenarios.sources`) into the run-time model.

Every entry point collects ALL problems (of every file) before raising one ``ScenarioError``, each problem
located at the line of the offending key. YAML files, JSON files, admin text and Python ``Scenario``
objects all go through the same compiler: Python data has no line per key, so its problems are located at
the builder call that wrote the rule (carried as ``"$location": "file:line"``).

Beyond the documented format, the compiler accepts a few conveniences: ``status: UNAVAILABLE`` for
``status: {code: UNAVAILABLE}``; an ``@type`` without its ``type.googleapis.com/`` prefix; YAML merge keys
(``<<: *defaults``); stream items with a ``fault`` (after the messages before it); ``each_request`` with a
``status`` and a ``delay``; and ``"$location"`` on any rule or scenario, which moves its problems there.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from google.protobuf import any_pb2, descriptor_pb2, json_format
from google.protobuf.descriptor_pool import DescriptorPool

from virtsvc import _text
from virtsvc.contracts.catalog import Catalog, MethodSpec
from virtsvc.errors import ConfigError, ConversionError, Problem, ScenarioError
from virtsvc.scenarios import datasets as _datasets
from virtsvc.scenarios import fields, latency, synthetic, templates
from virtsvc.scenarios import yamltree as _yaml
from virtsvc.scenarios.located import LocatedDict, LocatedList, Problems, Site
from virtsvc.scenarios.matching import compile_when
from virtsvc.scenarios.model import (
    Call,
    CompiledScenario,
    Delay,
    Effect,
    Fault,
    Location,
    Matcher,
    Rule,
    Status,
    Step,
    TextTemplate,
)
from virtsvc.scenarios.sources import Source, load_sources
from virtsvc.scenarios.vocabulary import (
    AFTER_VALUES,
    CLOCKS,
    EACH_REQUEST_KEYS,
    EFFECT_KEYS,
    ITEM_ANSWERS,
    PER_MESSAGE_KEYS,
    RULE_KEYS,
    SCENARIO_KEYS,
    STATUS_KEYS,
    STEP_ANSWERS,
    STEP_KEYS,
    STREAM_ITEM_KEYS,
    VERIFY_VALUES,
)

__all__ = [
    "Source",
    "check_paths",
    "compile_put",
    "compile_rules",
    "compile_sources",
    "compile_text",
    "duration_seconds",
    "load_scenarios",
    "load_sources",
]

NAME_PATTERN = "[a-z0-9][a-z0-9._-]*"
_NAME = re.compile(NAME_PATTERN)
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)?")
_UNITS = {None: 1.0, "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

_CONTRACT = re.compile(r"sha256:[0-9a-f]{8,64}")
_CONTRACT_EXAMPLE = '"sha256:3f2a9c0d1e4b5a6f7c8d9e0f"'
_LOCATION_KEY = "$location"  # set by the Python builder: "file:line" of the rule's call
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
RULE_ID_PATTERN = "[A-Za-z0-9][A-Za-z0-9._:-]*"


# -- entry points -------------------------------------------------------------------------------------


def compile_sources(
    sources: Sequence[Source], catalog: Catalog, upstreams: Collection[str] = ()
) -> list[CompiledScenario]:
    """Validates and compiles every scenario of ``sources``; raises ScenarioError with every problem.

    ``upstreams`` names the real services a ``passthrough:`` may forward to (``--upstream NAME=...``).
    """
    problems = Problems()
    compiler = _Compiler(catalog, problems, upstreams)
    entries: list[_Entry] = []
    for source in sources:
        problems.items.extend(source.problems)
        for doc in source.documents:
            entry = compiler.scenario(doc, Site(source.file, problems))
            if entry is not None:
                entries.append(entry)
        for scenario in source.scenarios:
            site = Site(source.file, problems, scenario.location.line)
            data = scenario.to_data(locations=True)
            reason = _yaml.check_plain(data)
            if reason is not None:
                problems.add(str(scenario.location.file), scenario.location.line, f"scenario data: {reason}")
                continue
            entry = compiler.scenario(data, site, from_script=True)
            if entry is not None:
                entries.append(entry)
        if source.kind == "yaml" and not source.documents and not source.problems:
            problems.add(
                source.file, 0, "no scenario in this file (expected a mapping with scenario: and rules:)"
            )
    _cross_check(entries, {}, problems)
    problems.raise_if_any()
    return [e.compiled for e in entries if e.compiled is not None]


def compile_text(
    text: str,
    catalog: Catalog,
    origin: str = "<admin>",
    known: Collection[str] | Mapping[str, str | None] = (),
    upstreams: Collection[str] = (),
) -> list[CompiledScenario]:
    """Compiles YAML or JSON text (the admin API's PutScenario); never Python.

    ``known`` names the scenarios already loaded, which ``extends`` may refer to; a mapping of name to
    its ``extends`` also lets cycles through them be found.
    """
    problems = Problems()
    compiler = _Compiler(catalog, problems, upstreams)
    entries = []
    docs = _yaml.load_text(text, origin, problems)
    for doc in docs:
        entry = compiler.scenario(doc, Site(origin, problems))
        if entry is not None:
            entries.append(entry)
    if not docs and not problems:
        problems.add(origin, 0, "no scenario in the text (expected a mapping with scenario: and rules:)")
    parents = dict(known) if isinstance(known, Mapping) else dict.fromkeys(known)
    _cross_check(entries, parents, problems)
    problems.raise_if_any()
    return [e.compiled for e in entries if e.compiled is not None]


def compile_rules(
    data: str | Sequence[Mapping[str, Any]],
    catalog: Catalog,
    scenario: str,
    origin: str,
    key_prefix: str,
    upstreams: Collection[str] = (),
) -> tuple[Rule, ...]:
    """Compiles session-scoped rules: YAML/JSON text (a list of rules, or a mapping with ``rules:``) or
    plain rule dicts from Python (which may carry a ``handler`` and a ``"$location"``).

    Rule keys are ``key_prefix + index``, so they never collide with the scenario's own rules.
    """
    problems = Problems()
    site = Site(origin, problems)
    nodes: Any
    if isinstance(data, str):
        docs = _yaml.load_text(data, origin, problems)
        if len(docs) > 1:
            problems.add(origin, 0, f"expected one YAML document of rules, found {len(docs)}")
        nodes = docs[0] if docs else []
        if isinstance(nodes, Mapping):
            for key in nodes:
                if key != "rules":
                    site.error(nodes, key, _unknown(key, ("rules",), "key", "session rules take only rules:"))
            nodes = nodes.get("rules", [])
    else:
        nodes = data
        reason = _yaml.check_plain(list(data))
        if reason is not None:
            problems.add(origin, 0, f"rules: {reason}")
            problems.raise_if_any()
    if not isinstance(nodes, Sequence) or isinstance(nodes, (str, bytes)):
        site.error(nodes, None, f"expected a list of rules, got {_kind(nodes)}")
        problems.raise_if_any()
    rules = _Compiler(catalog, problems, upstreams).rules(nodes, site, scenario, key_prefix)
    problems.raise_if_any()
    return rules


def compile_put(
    data: Mapping[str, Any], catalog: Catalog, scenario: str, upstreams: Collection[str] = ()
) -> Rule:
    """Compiles a rule an effect puts (plain data, located by its ``"$location"``); ScenarioError when it
    is not one. Its key derives from its id, so every process compiles the same rule under the same key."""
    problems = Problems()
    rule = _Compiler(catalog, problems, upstreams).put_rule(data, Site("<effect>", problems), scenario, "put")
    problems.raise_if_any()
    assert rule is not None
    return rule


def check_paths(paths: Sequence[Path], catalog: Catalog, upstreams: Collection[str] = ()) -> list[Problem]:
    """Every problem of the scenario files and scripts under ``paths`` (``virtsvc check``); [] when valid."""
    return check_scenarios(paths, catalog, upstreams)[0]


def check_scenarios(
    paths: Sequence[Path], catalog: Catalog, upstreams: Collection[str] = ()
) -> tuple[list[Problem], list[CompiledScenario]]:
    """:func:`check_paths`, with the scenarios compiled when there was no problem ([] otherwise)."""
    found: list[Problem] = []
    compiled: list[CompiledScenario] = []
    present = []
    for path in paths:
        if Path(path).exists():
            present.append(Path(path))
        else:
            found.append(Problem(str(path), 0, "no such file or directory"))
    try:
        compiled = compile_sources(load_sources(present), catalog, upstreams)
    except ScenarioError as exc:
        found.extend(exc.problems)
    except ConfigError as exc:
        found.append(Problem("", 0, str(exc)))
    if found:
        return sorted(set(found), key=lambda p: (p.file, p.line, p.message)), []
    return [], compiled


# -- cross-scenario checks ----------------------------------------------------------------------------


@dataclass
class _Entry:
    """A scenario document as far as it could be read: enough for cross-file checks even when invalid."""

    name: str | None
    location: Location
    extends: str | None
    extends_at: Location
    compiled: CompiledScenario | None
    ids: frozenset[str] = frozenset()  # its rules' ids (and the literal ids its effects put)
    removes: tuple[tuple[str, Location], ...] = ()  # the ids its effects remove, where
    open_ids: bool = False  # an effect puts an id made by a template: removes cannot be checked


def _cross_check(entries: Sequence[_Entry], known: Mapping[str, str | None], problems: Problems) -> None:
    by_name: dict[str, list[_Entry]] = {}
    for entry in entries:
        if entry.name is not None:
            by_name.setdefault(entry.name, []).append(entry)
    for name, same in by_name.items():
        if len(same) > 1:
            for entry in same:
                others = ", ".join(str(e.location) for e in same if e is not entry)
                problems.add(
                    entry.location.file,
                    entry.location.line,
                    f'duplicate scenario name "{name}": also defined at {others}',
                )
    parents: dict[str, str | None] = dict(known)
    parents.update({e.name: e.extends for e in entries if e.name is not None})
    _check_removes(entries, parents, problems)
    for entry in entries:
        if entry.extends is None:
            continue
        where = entry.extends_at
        if entry.extends not in parents:
            problems.add(where.file, where.line, _unknown_scenario(entry.extends, parents))
            continue
        if entry.name is None:
            continue
        trail = [entry.name]
        current: str | None = entry.extends
        while current is not None and current in parents and current not in trail:
            trail.append(current)
            current = parents[current]
        if current == entry.name:
            problems.add(
                where.file,
                where.line,
                "extends: the scenarios extend each other in a cycle: " + " -> ".join([*trail, entry.name]),
            )


def _check_removes(entries: Sequence[_Entry], parents: Mapping[str, str | None], problems: Problems) -> None:
    """An effect's ``remove`` names a rule id of its scenario, of a scenario it extends, or one an effect
    puts; unchecked where a scenario of the chain is not at hand or puts ids made by templates."""
    by_name = {e.name: e for e in entries if e.name is not None}
    for entry in entries:
        if not entry.removes:
            continue
        known: set[str] = set(entry.ids)
        checkable = not entry.open_ids
        seen = {entry.name}
        parent = entry.extends
        while parent is not None and parent not in seen:
            seen.add(parent)
            other = by_name.get(parent)
            if other is None:
                checkable = False
                break
            known |= other.ids
            checkable = checkable and not other.open_ids
            parent = other.extends
        if not checkable:
            continue
        for name, at in entry.removes:
            if name not in known:
                text = f'effects: remove: no rule has the id "{name}"'
                close = _text.closest(name, sorted(known), n=3)
                if close:
                    text += "; " + _text.alternatives(close)
                elif known:
                    text += "; the ids are " + _text.quoted_list(sorted(known))
                else:
                    text += "; no rule of the scenario has an id (give the rule to remove id: NAME)"
                problems.add(at.file, at.line, text)


def _unknown_scenario(name: str, parents: Mapping[str, Any]) -> str:
    text = f'extends: unknown scenario "{name}"'
    close = _text.closest(name, list(parents), n=3)
    if close:
        return text + "; " + _text.alternatives(close)
    if not parents:
        return text + "; no scenario is loaded"
    names = sorted(parents)
    listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return text + f"; the scenarios are {listed}"


# -- the compiler --------------------------------------------------------------------------------------


@dataclass
class _Defaults:
    """Rule-level delay, headers and trailers that every item of a sequence inherits."""

    delay: Delay | None = None
    headers: tuple[tuple[str, TextTemplate], ...] = ()
    trailers: tuple[tuple[str, TextTemplate], ...] = ()


class _Compiler:
    """Validates scenario data (located YAML nodes or plain Python data) into model objects."""

    def __init__(self, catalog: Catalog, problems: Problems, upstreams: Collection[str] = ()) -> None:
        self.catalog = catalog
        self.problems = problems
        self.upstreams = sorted(upstreams)
        _ensure_rich_error_types(catalog.pool)
        # what the rules compiled since the last ``rules()`` call named, for the cross-rule id checks
        self.ids: dict[str, Location] = {}
        self.removes: list[tuple[str, Location]] = []
        self.open_ids = False
        self._rule_ids: dict[str, Location] = {}  # the ids of one list of rules, for duplicates

    # -- scenario -------------------------------------------------------------------------------

    def scenario(self, doc: Any, site: Site, *, from_script: bool = False) -> _Entry | None:
        before = len(self.problems.items)
        if not isinstance(doc, Mapping):
            site.error(
                doc,
                None,
                f"expected a scenario (a mapping with scenario: and rules:), got {_kind(doc)}",
            )
            return None
        site = self._relocate(doc, site)
        site = site.at(doc)
        for key in doc:
            if key not in SCENARIO_KEYS and key != _LOCATION_KEY:
                site.error(doc, key, _unknown(key, SCENARIO_KEYS, "scenario key"))
        name: str | None = None
        if "scenario" not in doc:
            site.error(doc, None, 'missing "scenario:" (the scenario\'s name, e.g. scenario: checkout-happy)')
        else:
            name = self._name(doc, "scenario", site)
        version = doc.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
            site.error(doc, "version", f"version: expected an integer or text, got {_show(version)}")
            version = None
        description = doc.get("description")
        if description is None:
            description = ""
        elif not isinstance(description, str):
            site.error(doc, "description", f"description: expected text, got {_show(description)}")
            description = ""
        extends = self._name(doc, "extends", site) if doc.get("extends") is not None else None
        passthrough = (
            self._upstream(doc, "passthrough", site, "passthrough") if "passthrough" in doc else None
        )
        unmatched = self._unmatched(doc, site) if doc.get("unmatched") is not None else None
        clock = doc.get("clock", "wall")
        if clock not in CLOCKS:
            site.error(
                doc, "clock", _unknown_value("clock", clock, CLOCKS, "wall (the default)", noun="clock")
            )
            clock = "wall"
        datasets = None
        if doc.get("data") is not None:
            datasets = _datasets.compile_data(doc, site, self.catalog, name or "")
        rules: tuple[Rule, ...] = ()
        nodes = doc.get("rules")
        with templates.data_uses() as uses:
            if "rules" not in doc:
                if extends is None and passthrough is None:
                    site.error(doc, None, 'missing "rules:" (the list of rules)')
            elif nodes is None:
                pass  # `rules:` with nothing under it: no rules of its own
            elif not isinstance(nodes, list):
                site.error(doc, "rules", f"rules: expected a list of rules, got {_kind(nodes)}")
            else:
                rules = self.rules(nodes, site, name or "", "")
        if datasets is not None or doc.get("data") is None:
            _datasets.check_uses(datasets, uses, site, inherits=extends is not None)
        ids, removes, open_ids = frozenset(self.ids), tuple(self.removes), self.open_ids
        location = Location(site.file, site.line_of(doc, "scenario"))
        extends_at = Location(site.file, site.line_of(doc, "extends"))
        compiled = None
        if len(self.problems.items) == before and name is not None:
            compiled = CompiledScenario(
                name=name,
                location=location,
                rules=rules,
                version=version,
                description=description,
                extends=extends,
                from_script=from_script,
                passthrough=passthrough,
                passthrough_at=Location(site.file, site.line_of(doc, "passthrough")) if passthrough else None,
                unmatched=unmatched,
                clock=clock,
                data=datasets or None,
            )
        if "rules" not in doc or not isinstance(nodes, list):
            ids, removes, open_ids = frozenset(), (), False
        return _Entry(name, location, extends, extends_at, compiled, ids, removes, open_ids)

    def _unmatched(self, doc: Mapping[Any, Any], site: Site) -> Status | None:
        """``unmatched: {code: NOT_FOUND, message: ...}``: the status of calls no rule answers."""
        status = self._status(doc, "unmatched", site, "unmatched")
        if status is not None and status.ok:
            site.error(
                doc,
                "unmatched",
                "unmatched: a call no rule answers fails; give an error code (e.g. NOT_FOUND), not OK",
            )
            return None
        return status

    def _name(self, doc: Mapping[Any, Any], key: str, site: Site) -> str | None:
        value = doc.get(key)
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            hint = ""
            if isinstance(value, str):
                slug = re.sub(r"[^a-z0-9._-]+", "-", value.strip().lower()).strip("-._")
                if slug and _NAME.fullmatch(slug):
                    hint = f' (e.g. "{slug}")'
            site.error(
                doc,
                key,
                f"{key}: bad scenario name {_show(value)}; a name matches {NAME_PATTERN}{hint}",
            )
            return None
        return value

    def _upstream(self, node: Mapping[Any, Any], key: str, site: Site, path: str) -> str | None:
        """A ``passthrough:`` value: the name of a declared upstream."""
        value = node[key]
        if not isinstance(value, str) or not value:
            site.error(
                node,
                key,
                f"{path}: expected the name of an upstream (declared with --upstream NAME=HOST:PORT), "
                f"got {_show(value)}",
            )
            return None
        if value not in self.upstreams:
            site.error(node, key, f"{path}: {unknown_upstream_message(value, self.upstreams)}")
            return None
        return value

    def _relocate(self, node: Any, site: Site) -> Site:
        """Plain data from the Python builder carries ``"$location": "file:line"``: report there."""
        if not isinstance(node, Mapping) or _LOCATION_KEY not in node:
            return site
        value = node[_LOCATION_KEY]
        if isinstance(value, str):
            file, _, line = value.rpartition(":")
            if file and line.isdigit():
                return Site(file, site.problems, int(line))
        site.error(node, _LOCATION_KEY, f'{_LOCATION_KEY}: expected "file:line", got {_show(value)}')
        return site

    # -- rules ----------------------------------------------------------------------------------

    def rules(self, nodes: Sequence[Any], site: Site, scenario: str, key_prefix: str) -> tuple[Rule, ...]:
        compiled: list[Rule] = []
        reach: list[tuple[int, int, str, bool, Location]] = []  # (priority, index, method, catch-all, at)
        self.ids, self.removes, self.open_ids = {}, [], False
        self._rule_ids = {}
        for index, node in enumerate(nodes):
            rule_site = Site(site.file, site.problems, site.line_of(nodes, index))
            rule = self.rule(
                node, rule_site, scenario, f"{key_prefix}{index}", f"rules[{index}]", reach, index
            )
            if rule is not None:
                compiled.append(rule)
        self._unreachable(reach)
        self._per_message_only(compiled)
        return tuple(compiled)

    def _per_message_only(self, rules: Sequence[Rule]) -> None:
        """A bidi method with per-message rules is answered message by message: its other rules never are."""
        first: dict[str, Rule] = {}
        for rule in rules:
            if rule.per_message:
                first.setdefault(rule.method, rule)
        for rule in rules:
            if not rule.per_message and rule.method in first:
                self.problems.add(
                    rule.location.file,
                    rule.location.line,
                    f"rule is never used: {rule.method} is answered message by message (the per-message "
                    f"rule at {first[rule.method].location}); make this rule per_message: true too",
                )

    def _unreachable(self, reach: list[tuple[int, int, str, bool, Location]]) -> None:
        """Reports rules that an earlier catch-all rule (no when, no times) of the same method shadows."""
        first: dict[str, Location] = {}
        for _priority, _index, method, catch_all, at in sorted(reach, key=lambda r: (-r[0], r[1])):
            if method in first:
                self.problems.add(
                    at.file,
                    at.line,
                    f"rule is unreachable: the rule at {first[method]} answers every call to {method} first",
                )
            elif catch_all:
                first[method] = at

    def rule(
        self,
        node: Any,
        site: Site,
        scenario: str,
        key: str,
        path: str,
        reach: list[tuple[int, int, str, bool, Location]],
        index: int,
    ) -> Rule | None:
        before = len(self.problems.items)
        if not isinstance(node, Mapping):
            site.error(node, None, f"{path}: expected a rule (a mapping with method: ...), got {_kind(node)}")
            return None
        site = self._relocate(node, site).at(node)
        location = Location(site.file, site.line)
        for k in node:
            if k not in RULE_KEYS and k != _LOCATION_KEY:
                site.error(node, k, _unknown(k, RULE_KEYS, "rule key"))

        spec = self._method(node, site)
        times = node.get("times")
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times <= 0):
            site.error(node, "times", f"times: expected a positive integer, got {_show(times)}")
        priority = node.get("priority", 0)
        if priority is None:
            priority = 0
        priority_ok = isinstance(priority, int) and not isinstance(priority, bool)
        if not priority_ok:
            site.error(node, "priority", f"priority: expected an integer, got {_show(priority)}")
        after = node.get("after", "repeat_last")
        if "after" in node:
            if "sequence" not in node:
                site.error(node, "after", "after: only a sequence has an after (what happens past its end)")
            elif after not in AFTER_VALUES:
                site.error(
                    node, "after", _unknown_value("after", after, AFTER_VALUES, "repeat_last (the default)")
                )
        per_message = self._per_message(node, site, spec)
        rule_id = self._rule_id(node, site, location) if "id" in node else None
        when = None
        condition = node.get("when")
        if condition is not None:
            if not isinstance(condition, Mapping):
                site.error(
                    node,
                    "when",
                    f"when: expected a mapping of conditions (request:, metadata:), got {_kind(condition)}",
                )
            elif spec is not None:
                when = compile_when(condition, spec, site, "when", per_message=per_message)

        contract = self._contract(node, site)
        examples = self._examples(node, site, spec)
        if when is not None and spec is not None:
            self._examples_match(examples, when, spec, node, site, scenario)
        verify = node.get("verify", "shape")
        if verify not in VERIFY_VALUES:
            site.error(node, "verify", _unknown_value("verify", verify, VERIFY_VALUES, "shape (the default)"))
        handler = node.get("handler")
        if "handler" in node and not callable(handler):
            site.error(
                node,
                "handler",
                "handler: a handler is a Python function; only Python scenarios (scenario.handler) set one",
            )
        with templates.request_type(spec.input if spec is not None else None):
            steps = self._rule_steps(node, site, spec, location)
            effects: tuple[Effect, ...] = ()
            if node.get("effects") is not None and spec is not None:
                ref = rule_id if rule_id is not None else f"{scenario}#{key}"
                effects = self._effects(node, site, spec, scenario, ref)
        if per_message and any(step.open for step in steps):
            site.error(
                node,
                "stream",
                "stream: a per-message rule answers one message at a time and cannot hold the call open; "
                "hold it open from a rule without per_message",
            )

        if spec is not None and priority_ok:
            # a rule whose effects remove rules may make the rules after it reachable again
            catch_all = not condition and times is None and not node.get("effects")
            # a whole-call rule and a per-message rule never compete: each shadows only its own kind
            group = f"{spec.full_name} (per message)" if per_message else spec.full_name
            reach.append((priority, index, group, catch_all, location))
        if len(self.problems.items) != before or spec is None:
            return None
        return Rule(
            scenario=scenario,
            key=key,
            method=spec.full_name,
            location=location,
            steps=steps,
            after=after,
            when=when,
            times=times,
            priority=priority,
            handler=handler if callable(handler) else None,
            contract=contract,
            examples=examples,
            verify=verify,
            source=node,
            per_message=per_message,
            id=rule_id,
            effects=effects,
        )

    def _per_message(self, node: Mapping[Any, Any], site: Site, spec: MethodSpec | None) -> bool:
        """``per_message: true``: the rule is matched against, and answers, each message of a bidi call."""
        value = node.get("per_message", False)
        if not isinstance(value, bool):
            site.error(node, "per_message", f"per_message: expected true or false, got {_show(value)}")
            value = False
        elif value and spec is not None and spec.kind != "bidi_streaming":
            site.error(
                node,
                "per_message",
                f"per_message: {spec.full_name} is {_kind_words(spec)}; per_message answers the messages "
                "of a bidi call one by one",
            )
            value = False
        elif value:
            for k in node:
                if k in RULE_KEYS and k not in PER_MESSAGE_KEYS:
                    site.error(
                        node,
                        k,
                        f"{k}: a per-message rule answers each message with reply, replies, stream or status "
                        f"(and delay); remove {k}",
                    )
        if "replies" in node and not value:
            site.error(
                node,
                "replies",
                "replies: only a per-message rule (per_message: true) answers message i with replies[i]",
            )
        return bool(value)

    def _rule_id(self, node: Mapping[Any, Any], site: Site, location: Location) -> str | None:
        """``id:``: names the rule for effects; unique among the rules of one list."""
        value = node["id"]
        if not isinstance(value, str) or not _RULE_ID.fullmatch(value):
            site.error(node, "id", f"id: bad rule id {_show(value)}; an id matches {RULE_ID_PATTERN}")
            return None
        first = self._rule_ids.get(value)
        if first is not None:
            site.error(node, "id", f'id: "{value}" is already the id of the rule at {first}')
            return None
        self._rule_ids[value] = location
        self.ids.setdefault(value, location)
        return value

    # -- effects ----------------------------------------------------------------------------------

    def _effects(
        self, node: Mapping[Any, Any], site: Site, trigger: MethodSpec, scenario: str, ref: str
    ) -> tuple[Effect, ...]:
        """``effects:``: what answering changes in the call's session (put, remove, remove_self)."""
        items = node["effects"]
        if not isinstance(items, list) or not items:
            site.error(
                node,
                "effects",
                "effects: expected a list of effects ({put: RULE}, {remove: ID}, {remove_self: true}), "
                f"got {_show(items)}",
            )
            return ()
        out: list[Effect] = []
        for i, item in enumerate(items):
            path = f"effects[{i}]"
            item_site = Site(site.file, site.problems, site.line_of(items, i))
            if not isinstance(item, Mapping):
                item_site.error(
                    items,
                    i,
                    f"{path}: expected {{put: RULE}}, {{remove: ID}} or {{remove_self: true}}, got "
                    f"{_kind(item)}",
                )
                continue
            item_site = item_site.at(item)
            for k in item:
                if k not in EFFECT_KEYS:
                    item_site.error(item, k, f"{path}: " + _unknown(k, EFFECT_KEYS, "effect"))
            kinds = [k for k in EFFECT_KEYS if k in item]
            if len(kinds) != 1:
                if len(kinds) > 1:
                    item_site.error(
                        item, kinds[1], f"{path}: one effect per item; split {' and '.join(kinds)}"
                    )
                elif all(k in EFFECT_KEYS for k in item):
                    item_site.error(item, None, f"{path}: give it put, remove or remove_self")
                continue
            at = Location(item_site.file, item_site.line_of(item, kinds[0]))
            if kinds[0] == "remove_self":
                if item["remove_self"] is not True:
                    item_site.error(item, "remove_self", f"{path}.remove_self: expected true")
                    continue
                out.append(Effect("remove", at, ids=(ref,)))
            elif kinds[0] == "remove":
                ids = self._remove_ids(item, item_site, f"{path}.remove", at)
                if ids:
                    out.append(Effect("remove", at, ids=ids))
            else:
                effect = self._put(item, item_site, trigger, scenario, f"{path}.put", at)
                if effect is not None:
                    out.append(effect)
        return tuple(out)

    def _remove_ids(self, item: Mapping[Any, Any], site: Site, path: str, at: Location) -> tuple[str, ...]:
        value = item["remove"]
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(n, str) and _RULE_ID.fullmatch(n) for n in names):
            site.error(
                item, "remove", f"{path}: expected a rule id or a list of rule ids, got {_show(value)}"
            )
            return ()
        self.removes.extend((n, at) for n in names)
        return tuple(names)

    def _put(
        self,
        item: Mapping[Any, Any],
        site: Site,
        trigger: MethodSpec,
        scenario: str,
        path: str,
        at: Location,
    ) -> Effect | None:
        """``put: RULE``: a rule with an id. Its templates render when the effect applies, from the call
        that triggered it (``{% raw %}`` keeps one for the put rule's own calls)."""
        value = item["put"]
        if not isinstance(value, Mapping):
            site.error(
                item, "put", f"{path}: expected a rule (a mapping with id:, method: ...), got {_kind(value)}"
            )
            return None
        put_site = Site(site.file, site.problems, site.line_of(item, "put")).at(value)
        location = Location(put_site.file, put_site.line)
        if "id" not in value:
            put_site.error(
                value,
                None,
                f"{path}: a rule an effect puts needs an id (a later put of that id replaces it, remove "
                "names it)",
            )
            return None
        if "handler" in value:
            put_site.error(
                value, "handler", f"{path}.handler: a rule an effect puts answers without a handler"
            )
            return None
        data = _plain_copy(value)
        data.setdefault(_LOCATION_KEY, str(location))
        if not templates.has_template(data):
            if isinstance(value.get("id"), str):
                self.ids.setdefault(value["id"], location)
            rule = self.put_rule(value, put_site, scenario, path)
            return None if rule is None or rule.id is None else Effect("put", at, (rule.id,), rule, data)
        if isinstance(value.get("id"), str) and not templates.is_template(value["id"]):
            self.ids.setdefault(value["id"], location)
        else:
            self.open_ids = True
        template = templates.compile_data(data, put_site, path)
        if template is None:
            return None
        # Checked as a call with an empty request would put it (unchecked if a template fails on one).
        try:
            sample = template.render(_sample_call(trigger, scenario), 0)
        except templates.TemplateError:
            sample = None
        if sample is not None:
            self._check_sample(sample, put_site, scenario, path, _template_paths(value))
        upstreams = self.upstreams
        catalog = self.catalog

        def compile_rendered(rendered: Any) -> Rule:
            return compile_put(rendered, catalog, scenario, upstreams)

        return Effect("put", at, template=template, compile=compile_rendered)

    def _check_sample(
        self, sample: Any, site: Site, scenario: str, path: str, templated: Collection[str]
    ) -> None:
        """Compiles a put rule rendered from an empty request and reports its problems, except those in
        values a template makes: they depend on the triggering call (``times: "{{ request.qty }}"`` is 0
        here), and fail the effect with INTERNAL naming it if a real call renders them wrong."""
        scratch = Problems()
        saved = self.problems
        self.problems = scratch
        try:
            with templates.request_type(None):
                self.put_rule(sample, Site(site.file, scratch, site.line), scenario, path)
        finally:
            self.problems = saved
        for problem in scratch.items:
            if not any(re.match(re.escape(p) + r"[:.\[ ]", problem.message) for p in templated):
                saved.add(problem.file, problem.line, problem.message)

    def put_rule(self, node: Any, site: Site, scenario: str, path: str) -> Rule | None:
        """A rule an effect puts, keyed by its id."""
        if not isinstance(node, Mapping) or not isinstance(node.get("id"), str):
            site.error(node, None, f"{path}: a rule an effect puts needs an id, got {_show(node)}")
            return None
        saved, self._rule_ids = self._rule_ids, {}  # a put rule's id may be the id of a rule it replaces
        try:
            return self.rule(node, site, scenario, f"effect:{node['id']}", path, [], 0)
        finally:
            self._rule_ids = saved

    def _contract(self, node: Mapping[Any, Any], site: Site) -> str | None:
        """``contract:``: the fingerprint of the method's contract a recorded rule was made against."""
        if "contract" not in node:
            return None
        value = node["contract"]
        if not isinstance(value, str) or not _CONTRACT.fullmatch(value):
            site.error(
                node,
                "contract",
                f"contract: expected a contract fingerprint like {_CONTRACT_EXAMPLE} "
                f"(written by `virtsvc record`), got {_show(value)}",
            )
            return None
        return value

    def _examples(
        self, node: Mapping[Any, Any], site: Site, spec: MethodSpec | None
    ) -> tuple[tuple[bytes, ...], ...]:
        """``examples:``: requests `virtsvc verify` sends; a list of messages each for client streams."""
        if "examples" not in node or spec is None:
            return ()
        items = node["examples"]
        streams = spec.client_streaming
        shape = "lists of request messages" if streams else "request messages"
        if not isinstance(items, list) or not items:
            site.error(node, "examples", f"examples: expected a list of {shape}, got {_show(items)}")
            return ()
        out: list[tuple[bytes, ...]] = []
        for i, item in enumerate(items):
            where = Site(site.file, site.problems, site.line_of(items, i) or site.line_of(node, "examples"))
            messages = item if streams else [item]
            if streams and not isinstance(item, list):
                where.error(items, i, f"examples[{i}]: expected a list of requests, got {_show(item)}")
                continue
            encoded = []
            for j, message in enumerate(messages):
                path = f"examples[{i}][{j}]" if streams else f"examples[{i}]"
                msg = spec.input_class()
                try:
                    fields.fill_message(msg, {} if message is None else message, True, path)
                except ConversionError as exc:
                    where.error(items, i, str(exc))
                    break
                encoded.append(msg.SerializeToString())
            else:
                out.append(tuple(encoded))
        return tuple(out)

    def _examples_match(
        self,
        examples: Sequence[tuple[bytes, ...]],
        when: Matcher,
        spec: MethodSpec,
        node: Mapping[Any, Any],
        site: Site,
        scenario: str,
    ) -> None:
        """Each example must be a request the rule answers: else verifying it says nothing of the rule."""
        for i, example in enumerate(examples):
            call = Call(method=spec, scenario=scenario, session=None, metadata={}, raw_requests=list(example))
            # metadata conditions are verify's to send (when.metadata literals), not the example's
            failures = [f for f in when.check(call).failures if not f.startswith("metadata")]
            if failures:
                site.error(
                    node,
                    "examples",
                    f"examples[{i}]: the rule's when does not hold for this request: " + "; ".join(failures),
                )

    def _method(self, node: Mapping[Any, Any], site: Site) -> MethodSpec | None:
        if "method" not in node:
            example = next(iter(self.catalog.methods), "pkg.Service/Method")
            site.error(node, None, f"the rule has no method: add e.g. method: {example}")
            return None
        name = node["method"]
        if not isinstance(name, str):
            site.error(node, "method", f"method: expected a name like pkg.Service/Method, got {_show(name)}")
            return None
        spec = self.catalog.find(name)
        if spec is None:
            site.error(node, "method", self.catalog.unknown_method_message(name))
        return spec

    def _rule_steps(
        self, node: Mapping[Any, Any], site: Site, spec: MethodSpec | None, location: Location
    ) -> tuple[Step, ...]:
        defaults = _Defaults(
            delay=self._delay(node, "delay", site, "delay") if "delay" in node else None,
            headers=self._metadata(node, "headers", site, "headers"),
            trailers=self._metadata(node, "trailers", site, "trailers"),
        )
        answers = [k for k in STEP_ANSWERS if k in node]
        if "replies" in node:
            for k in answers:
                site.error(node, k, f"{k}: replies answer message i with replies[i]; remove {k}")
            return self._replies(node, site, spec, location, defaults)
        if "handler" in node:
            # The handler is the whole answer: it can sleep and set metadata through its context.
            for k in (*answers, "sequence", "delay", "headers", "trailers"):
                if k in node:
                    site.error(node, k, f"{k}: a handler rule answers with its handler alone; remove {k}")
            return ()
        if "sequence" in node:
            for k in answers:
                site.error(
                    node, k, f"{k}: a sequence rule answers from its items; move {k} into the sequence"
                )
            return self._sequence(node, site, spec, defaults)
        if not answers:
            # With an unknown key, that typo is most likely the answer (and is reported already).
            if all(k in RULE_KEYS or k == _LOCATION_KEY for k in node):
                site.error(
                    node,
                    None,
                    "the rule has nothing to do: give it a reply, status, fault, sequence, stream, "
                    "each_request, passthrough or (in Python) a handler",
                )
            return ()
        step = self._step(node, site, spec, "", location, defaults, level="rule")
        return (step,) if step is not None else ()

    def _replies(
        self,
        node: Mapping[Any, Any],
        site: Site,
        spec: MethodSpec | None,
        location: Location,
        defaults: _Defaults,
    ) -> tuple[Step, ...]:
        """``replies: [...]``: message i of a bidi call answered by replies[i] (a per-message rule)."""
        items = node["replies"]
        if not isinstance(items, list) or not items:
            site.error(node, "replies", f"replies: expected a non-empty list of messages, got {_show(items)}")
            return ()
        before = len(self.problems.items)
        out = []
        for i, item in enumerate(items):
            item_site = Site(site.file, site.problems, site.line_of(items, i))
            body = _reply({"reply": item}, spec, item_site, f"replies[{i}]")
            out.append(Step(Location(item_site.file, item_site.line), body=body))
        if len(self.problems.items) != before:
            return ()
        return (Step(location, delay=defaults.delay, replies=tuple(out)),)

    def _sequence(
        self, node: Mapping[Any, Any], site: Site, spec: MethodSpec | None, defaults: _Defaults
    ) -> tuple[Step, ...]:
        items = node["sequence"]
        if not isinstance(items, list) or not items:
            site.error(node, "sequence", f"sequence: expected a non-empty list of steps, got {_show(items)}")
            return ()
        steps = []
        for i, item in enumerate(items):
            path = f"sequence[{i}]"
            item_site = Site(site.file, site.problems, site.line_of(items, i))
            if not isinstance(item, Mapping):
                item_site.error(
                    item, None, f"{path}: expected a step (reply:, status:, ...), got {_kind(item)}"
                )
                continue
            item_site = item_site.at(item)
            for k in item:
                if k not in STEP_KEYS:
                    item_site.error(
                        item, k, _unknown(k, STEP_KEYS, "step key", _misplaced(k, "a sequence item"))
                    )
            if not any(k in item for k in ITEM_ANSWERS):
                if all(k in STEP_KEYS for k in item):  # else the unknown key is most likely the answer
                    item_site.error(
                        item,
                        None,
                        f"{path} has nothing to do: give it a reply, status, fault, stream or passthrough",
                    )
                continue
            step = self._step(
                item,
                item_site,
                spec,
                f"{path}.",
                Location(item_site.file, item_site.line),
                defaults,
                level="item",
            )
            if step is not None:
                steps.append(step)
        return tuple(steps)

    def _step(
        self,
        node: Mapping[Any, Any],
        site: Site,
        spec: MethodSpec | None,
        prefix: str,
        location: Location,
        defaults: _Defaults,
        *,
        level: Literal["rule", "item"],
    ) -> Step | None:
        """A step from a rule's own keys or a sequence item: what to answer, and how."""
        before = len(self.problems.items)
        status = self._status(node, "status", site, prefix + "status") if "status" in node else None
        failing = status is not None and not status.ok

        # Which answers may be combined: a fault replaces everything; streams carry their own messages; a
        # passthrough relays the real service's answer whole.
        passthrough = None
        if "passthrough" in node:
            for k in ("reply", "status", "fault", "stream", "each_request", "headers", "trailers"):
                if k in node:
                    site.error(
                        node,
                        k,
                        f"{prefix}{k}: a passthrough relays the upstream's own answer; remove the {k} "
                        "or the passthrough",
                    )
            passthrough = self._upstream(node, "passthrough", site, prefix + "passthrough")
        elif "fault" in node:
            for k in ("reply", "status", "stream", "each_request"):
                if k in node:
                    site.error(
                        node, k, f"{prefix}{k}: a fault replaces the answer; remove the {k} or the fault"
                    )
        if "reply" in node:
            for k in ("stream", "each_request"):
                if k in node:
                    site.error(
                        node,
                        "reply",
                        f"{prefix}reply: a {k} rule sends its messages under {k}: ; remove reply",
                    )
            if failing and status is not None:
                site.error(
                    node,
                    "reply",
                    f"{prefix}reply: a failing call carries no reply (status is {status.code.name}); "
                    "drop the reply, or answer and fail on successive calls with a sequence",
                )
        if "stream" in node and "each_request" in node:
            site.error(
                node, "each_request", f"{prefix}each_request: use either stream or each_request, not both"
            )

        body = _reply(node, spec, site, prefix + "reply")
        stream = None
        held = False
        if "stream" in node:
            if spec is not None and not spec.server_streaming:
                what = "a stream held open" if _holds_open(node["stream"]) else "stream"
                site.error(
                    node,
                    "stream",
                    f"{prefix}stream: {spec.full_name} is {_kind_words(spec)}; "
                    f"{what} needs a server-streaming or bidi method",
                )
            else:
                stream, held = self._stream(node, site, spec, prefix)
            if held and "status" in node:
                site.error(
                    node,
                    "status",
                    f"{prefix}status: a stream held open ends when the test ends it (.close() or "
                    ".fail(code, message); EndStream through the admin API); remove status",
                )
        each = None
        if "each_request" in node and level == "rule":  # in a sequence item it is an unknown step key
            if spec is not None and spec.kind != "bidi_streaming":
                site.error(
                    node,
                    "each_request",
                    f"{prefix}each_request: {spec.full_name} is {_kind_words(spec)}; "
                    "each_request needs a bidi method",
                )
            else:
                each = self._each_request(node, site, spec, prefix)
        fault = self._fault(node, site, prefix) if "fault" in node else None
        if level == "rule":  # the rule's own delay and metadata, compiled once by the caller
            delay, headers, trailers = defaults.delay, defaults.headers, defaults.trailers
        else:
            delay = self._delay(node, "delay", site, prefix + "delay") if "delay" in node else defaults.delay
            headers = _merge(defaults.headers, self._metadata(node, "headers", site, prefix + "headers"))
            trailers = _merge(defaults.trailers, self._metadata(node, "trailers", site, prefix + "trailers"))
        if len(self.problems.items) != before:
            return None
        headers = _seed_header(
            headers,
            body,
            *(item.body for item in stream or ()),
            each.body if each is not None else None,
        )
        if status is not None and status.ok and status.message is None:
            status = None  # an explicit plain OK is the default
        return Step(
            location=location,
            body=body,
            status=status,
            delay=delay,
            headers=headers,
            trailers=trailers,
            fault=fault,
            stream=stream,
            each_request=each,
            passthrough=passthrough,
            open=held,
        )

    def _stream(
        self, node: Mapping[Any, Any], site: Site, spec: MethodSpec | None, prefix: str
    ) -> tuple[tuple[Step, ...] | None, bool]:
        """The stream's items, and whether it is then held open (``{open: true}`` last, or alone as
        ``stream: {open: true}``)."""
        items = node["stream"]
        if isinstance(items, Mapping) and "open" in items:
            held_site = Site(site.file, site.problems, site.line_of(node, "stream")).at(items)
            return (), self._open_item(items, held_site, f"{prefix}stream", last=True)
        if not isinstance(items, list):
            site.error(
                node,
                "stream",
                f"{prefix}stream: expected a list of messages ({{reply: ...}}), got {_kind(items)}",
            )
            return None, False
        out = []
        held = False
        for i, item in enumerate(items):
            path = f"{prefix}stream[{i}]"
            item_site = Site(site.file, site.problems, site.line_of(items, i))
            if not isinstance(item, Mapping):
                item_site.error(
                    item,
                    None,
                    f"{path}: expected a stream item ({{reply: ..., delay: ...}}), got {_kind(item)}",
                )
                continue
            item_site = item_site.at(item)
            if "open" in item:
                held = self._open_item(item, item_site, path, last=i == len(items) - 1)
                continue
            before = len(self.problems.items)
            for k in item:
                if k == "status":
                    item_site.error(
                        item,
                        k,
                        f"{path}.status: a stream's final status goes next to stream:, at the rule level",
                    )
                elif k not in STREAM_ITEM_KEYS:
                    item_site.error(item, k, _unknown(k, STREAM_ITEM_KEYS, "stream item key"))
            if "reply" not in item and "fault" not in item:
                item_site.error(item, None, f"{path}: a stream item needs a reply (the message to send)")
            if "reply" in item and "fault" in item:
                item_site.error(
                    item, "fault", f"{path}.fault: a fault replaces the message; remove reply or fault"
                )
            body = _reply(item, spec, item_site, f"{path}.reply")
            delay = self._delay(item, "delay", item_site, f"{path}.delay") if "delay" in item else None
            fault = self._fault(item, item_site, f"{path}.") if "fault" in item else None
            if len(self.problems.items) == before:
                out.append(
                    Step(Location(item_site.file, item_site.line), body=body, delay=delay, fault=fault)
                )
        return tuple(out), held

    @staticmethod
    def _open_item(item: Mapping[Any, Any], site: Site, path: str, *, last: bool) -> bool:
        """``{open: true}``: the stream is held open after the items before it, for the test to drive."""
        for k in item:
            if k != "open":
                site.error(
                    item,
                    k,
                    f"{path}.{k}: {{open: true}} stands alone: the messages the test pushes come later; "
                    f"move {k} to an item of its own before it",
                )
        value = item["open"]
        if value is not True:
            site.error(
                item,
                "open",
                f"{path}.open: expected true (hold the stream open for the test), got {_show(value)}; "
                "without it, remove the key",
            )
            return False
        if not last:
            site.error(
                item,
                "open",
                f"{path}: {{open: true}} holds the stream open after the items before it, so it comes "
                "last; move the items after it before it",
            )
            return False
        return True

    def _each_request(
        self, node: Mapping[Any, Any], site: Site, spec: MethodSpec | None, prefix: str
    ) -> Step | None:
        value = node["each_request"]
        path = f"{prefix}each_request"
        if not isinstance(value, Mapping):
            site.error(node, "each_request", f"{path}: expected a step ({{reply: ...}}), got {_kind(value)}")
            return None
        each_site = Site(site.file, site.problems, site.line_of(node, "each_request")).at(value)
        before = len(self.problems.items)
        for k in value:
            if k not in EACH_REQUEST_KEYS:
                each_site.error(value, k, _unknown(k, EACH_REQUEST_KEYS, "each_request key"))
        if not any(k in value for k in ("reply", "status")):
            each_site.error(value, None, f"{path}: give it a reply (sent for every incoming message)")
        status = self._status(value, "status", each_site, f"{path}.status") if "status" in value else None
        if "reply" in value and status is not None and not status.ok:
            each_site.error(
                value, "reply", f"{path}.reply: a failing call carries no reply; drop one of them"
            )
        body = _reply(value, spec, each_site, f"{path}.reply")
        delay = self._delay(value, "delay", each_site, f"{path}.delay") if "delay" in value else None
        if len(self.problems.items) != before:
            return None
        if status is not None and status.ok and status.message is None:
            status = None
        return Step(Location(each_site.file, each_site.line), body=body, status=status, delay=delay)

    # -- values ---------------------------------------------------------------------------------

    def _status(self, node: Mapping[Any, Any], key: str, site: Site, path: str) -> Status | None:
        value = node[key]
        if not isinstance(value, Mapping):
            # `status: UNAVAILABLE` is short for `status: {code: UNAVAILABLE}`.
            code = _status_code(value, site, node, key, path)
            return Status(code) if code is not None else None
        status_site = Site(site.file, site.problems, site.line_of(node, key)).at(value)
        before = len(self.problems.items)
        for k in value:
            if k not in STATUS_KEYS:
                status_site.error(value, k, _unknown(k, STATUS_KEYS, "status key"))
        if "code" not in value:
            status_site.error(value, None, f"{path}: a status needs a code, e.g. code: UNAVAILABLE")
            return None
        code = _status_code(value["code"], status_site, value, "code", f"{path}.code")
        message = None
        text = value.get("message")
        if text is not None:
            message = templates.compile_text(text, status_site, value, "message", f"{path}.message")
        details: tuple[bytes, ...] = ()
        if value.get("details") is not None:
            details = self._details(value, status_site, f"{path}.details")
            if code is grpc.StatusCode.OK and details:
                status_site.error(value, "details", f"{path}.details: an OK status carries no details")
        if code is None or len(self.problems.items) != before:
            return None
        return Status(code, message, details)

    def _details(self, node: Mapping[Any, Any], site: Site, path: str) -> tuple[bytes, ...]:
        items = node["details"]
        if not isinstance(items, list):
            site.error(
                node, "details", f"{path}: expected a list of messages with an @type, got {_kind(items)}"
            )
            return ()
        out = []
        for i, detail in enumerate(items):
            where = f"{path}[{i}]"
            if not isinstance(detail, Mapping) or not isinstance(detail.get("@type"), str):
                site.error(
                    items,
                    i,
                    f'{where}: each detail is a mapping with an "@type", e.g. '
                    '{"@type": type.googleapis.com/google.rpc.ErrorInfo, reason: ...}',
                )
                continue
            data = dict(detail)
            type_name = data["@type"]
            if "/" not in type_name:
                data["@type"] = (
                    "type.googleapis.com/" + type_name
                )  # the prefix is boilerplate: allow leaving it out
            full_name = data["@type"].rpartition("/")[2]
            try:
                self.catalog.pool.FindMessageTypeByName(full_name)
            except KeyError:
                site.error(items, i, f"{where}: {self._unknown_type(full_name)}")
                continue
            try:
                packed = json_format.ParseDict(data, any_pb2.Any(), descriptor_pool=self.catalog.pool)
            except Exception as exc:  # ParseError, and TypeError/ValueError on odd values
                site.error(items, i, f"{where} ({full_name}): {_parse_error(exc)}")
                continue
            out.append(packed.SerializeToString())
        return tuple(out)

    def _unknown_type(self, name: str) -> str:
        names = _message_names(self.catalog)
        close = _text.closest(name, names, n=3)
        text = f'unknown message type "{name}"'
        if close:
            return text + "; " + _text.alternatives(close)
        return text + " (rich error details are usually google.rpc types, e.g. google.rpc.ErrorInfo)"

    def _delay(self, node: Mapping[Any, Any], key: str, site: Site, path: str) -> Delay | None:
        return latency.compile_delay(node[key], site, node, key, path, _seconds)

    def _fault(self, node: Mapping[Any, Any], site: Site, prefix: str) -> Fault | None:
        value = node["fault"]
        names = tuple(f.value for f in Fault)
        if isinstance(value, str) and value.strip().lower() in names:
            return Fault(value.strip().lower())
        site.error(node, "fault", _unknown_value(f"{prefix}fault", value, names, "", noun="fault"))
        return None

    def _metadata(
        self, node: Mapping[Any, Any], key: str, site: Site, path: str
    ) -> tuple[tuple[str, TextTemplate], ...]:
        if key not in node or node[key] is None:
            return ()
        value = node[key]
        if not isinstance(value, Mapping):
            site.error(node, key, f"{path}: expected a mapping of metadata keys to text, got {_kind(value)}")
            return ()
        msite = Site(site.file, site.problems, site.line_of(node, key)).at(value)
        out: dict[str, TextTemplate] = {}
        for name, text in value.items():
            if not isinstance(name, str):
                msite.error(value, name, f"{path}: metadata keys are text, got {_show(name)}")
                continue
            lower = name.lower()
            if not _METADATA_KEY.fullmatch(lower):
                msite.error(
                    value,
                    name,
                    f'{path}: "{name}" is not a valid metadata key (letters, digits, "_", "." and "-" only)',
                )
                continue
            if lower.startswith("grpc-"):
                msite.error(
                    value, name, f'{path}: "{name}" is reserved for gRPC itself (keys starting grpc-)'
                )
                continue
            if lower in out:
                msite.error(value, name, f'{path}: "{name}" is given twice (keys are not case-sensitive)')
                continue
            template = templates.compile_text(text, msite, value, name, f"{path}.{name}")
            if template is None:
                continue
            if lower.endswith("-bin") and template.static is not None and not _is_base64(template.static):
                msite.error(
                    value,
                    name,
                    f"{path}.{name}: a -bin key carries bytes, written as base64 text; "
                    f"{_show(text)} is not base64",
                )
                continue
            out[lower] = template
        return tuple(out.items())


# -- helpers --------------------------------------------------------------------------------------------


def _merge(
    defaults: tuple[tuple[str, TextTemplate], ...], own: tuple[tuple[str, TextTemplate], ...]
) -> tuple[tuple[str, TextTemplate], ...]:
    """A sequence item's metadata over the rule's: the item's value wins for the same key."""
    if not defaults:
        return own
    merged = dict(defaults)
    merged.update(own)
    return tuple(merged.items())


def _status_code(value: Any, site: Site, node: Any, key: Any, path: str) -> grpc.StatusCode | None:
    codes = grpc.StatusCode.__members__
    if isinstance(value, str):
        name = value.strip().upper().removeprefix("STATUSCODE.")
        if name in codes:
            return codes[name]
        if name.isdigit():
            value = int(name)
        else:
            close = _text.closest(name, list(codes), n=3)
            hint = _text.alternatives(close) if close else "the codes are " + ", ".join(codes)
            site.error(node, key, f"{path}: unknown status code {_show(value)}; {hint}")
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        for code in grpc.StatusCode:
            if code.value[0] == value:
                return code
        site.error(
            node, key, f"{path}: unknown status code {value}; codes are 0 (OK) to 16 (UNAUTHENTICATED)"
        )
        return None
    site.error(
        node, key, f"{path}: expected a status code name (e.g. UNAVAILABLE) or number, got {_show(value)}"
    )
    return None


def duration_seconds(text: str) -> float | None:
    """A duration as scenarios write it (``25ms``, ``1.5s``, ``2m``, ``500us``, bare seconds) in seconds;
    None when ``text`` is not one (negative ones included)."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        return None
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    return seconds if math.isfinite(seconds) else None


def _seconds(value: Any, site: Site, node: Any, key: Any, path: str) -> float | None:
    """A duration in seconds: ``25ms``, ``1.5s``, ``2m``, ``500us`` or a bare number of seconds."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        elif value.strip().startswith("-") and _DURATION.fullmatch(value.strip()[1:]):
            site.error(node, key, f"{path}: a duration cannot be negative, got {_show(value)}")
            return None
    if seconds is None or not math.isfinite(seconds):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            site.error(node, key, f"{path}: bad duration {_show(value)}; use e.g. 25ms, 1.5s, 2m")
        else:
            site.error(
                node,
                key,
                f"{path}: expected a duration (e.g. 25ms) or one delay model ("
                + ", ".join(latency.MODELS)
                + f"), got {_show(value)}",
            )
        return None
    if seconds < 0:
        site.error(node, key, f"{path}: a duration cannot be negative, got {_show(value)}")
        return None
    return seconds


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # Unpadded base64 is common in metadata; accept it too.
        try:
            base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            return False
    return True


def _parse_error(exc: Exception) -> str:
    """json_format's message without its trailer naming the Any wrapper (the user never wrote one)."""
    text = str(exc).strip().split("\n")[0]
    text = re.sub(r'\s*at "?Any[\w.\[\]]*"?\.?$', "", text)
    return text or type(exc).__name__


def _message_names(catalog: Catalog) -> list[str]:
    names: list[str] = []

    def walk(prefix: str, messages: Sequence[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            full = f"{prefix}.{m.name}" if prefix else m.name
            names.append(full)
            walk(full, m.nested_type)

    for proto in catalog.file_set.file:
        walk(proto.package, proto.message_type)
    from google.rpc import error_details_pb2

    names.extend(m.full_name for m in error_details_pb2.DESCRIPTOR.message_types_by_name.values())
    return names


def _ensure_rich_error_types(pool: DescriptorPool) -> None:
    """Rich error details need google.rpc types in the catalog's pool (catalogs normally have them)."""
    from google.rpc import error_details_pb2, status_pb2

    for file_desc in (status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR):
        _add_file(pool, file_desc)


def _add_file(pool: DescriptorPool, file_desc: Any) -> None:
    try:
        pool.FindFileByName(file_desc.name)
        return
    except KeyError:
        pass
    for dep in file_desc.dependencies:
        _add_file(pool, dep)
    proto = descriptor_pb2.FileDescriptorProto()
    file_desc.CopyToProto(proto)
    pool.Add(proto)


def _holds_open(stream: Any) -> bool:
    """Whether a ``stream:`` as written asks to be held open (for messages that name it)."""
    items = stream if isinstance(stream, list) else [stream]
    return any(isinstance(item, Mapping) and "open" in item for item in items)


def _kind_words(spec: MethodSpec) -> str:
    return {
        "unary": "unary",
        "server_streaming": "server-streaming",
        "client_streaming": "client-streaming",
        "bidi_streaming": "bidi-streaming",
    }[spec.kind]


def _unknown(key: Any, vocabulary: Sequence[str], what: str, hint: str = "") -> str:
    text = f"unknown {what} {_show(key)}"
    close = _text.closest(str(key), list(vocabulary), n=1) if isinstance(key, str) else []
    if close:
        return text + "; " + _text.alternatives(close)
    if hint:
        return text + f"; {hint}"
    return text + "; expected one of " + ", ".join(vocabulary)


def _misplaced(key: Any, where: str) -> str:
    if key in RULE_KEYS:
        return f"{key} belongs to the rule, not to {where}"
    return ""


def _unknown_value(path: str, value: Any, valid: Sequence[str], default: str, *, noun: str = "value") -> str:
    text = f"{path}: unknown {noun} {_show(value)}"
    close = _text.closest(value, list(valid), n=1) if isinstance(value, str) else []
    listed = ", ".join(default if (default and v == valid[0]) else v for v in valid[:-1]) + f" or {valid[-1]}"
    if close:
        return text + "; " + _text.alternatives(close) + f" (use {listed})"
    return text + f"; use {listed}"


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "nothing"
    return _show(value)


def _show(value: Any) -> str:
    """A value as the user wrote it, for messages: text in quotes, collections by kind."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, (LocatedDict, dict, Mapping)):
        return "a mapping"
    if isinstance(value, (LocatedList, list, tuple)):
        return "a list"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return type(value).__name__


def _reply(node: Mapping[Any, Any], spec: MethodSpec | None, site: Site, path: str) -> Any:
    """The compiled ``reply`` of a rule, step or item (an empty ``reply:`` is the empty message)."""
    if "reply" not in node or spec is None:
        return None
    value = node["reply"]
    if synthetic.is_generate(value):
        return synthetic.compile_generate(value, spec.output, site, path)
    return templates.compile_message(value if value is not None else {}, spec.output, site, path)


def _template_paths(value: Any, where: str = "") -> list[str]:
    """The paths (``times``, ``reply.sku``, ``when.request.ids[0]``) of the strings in ``value`` that hold
    templates, as problem messages name them."""
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _template_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _template_paths(v, f"{where}[{i}]")]
    return [where] if isinstance(value, str) and templates.is_template(value) else []


def _plain_copy(value: Any) -> Any:
    """Located YAML data as plain dicts and lists (JSON-able, as shared stores keep it)."""
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    return value


class _SampleSession:
    """The session a put rule's templates are checked in at load."""

    id = "check"
    calls = 0
    rng = random.Random(0)


def _sample_call(method: MethodSpec, scenario: str) -> Call:
    """A call with an empty request: what a put rule's templates are rendered from when it is checked."""
    return Call(method=method, scenario=scenario, session=_SampleSession(), metadata={}, raw_requests=[])


def _seed_header(
    headers: tuple[tuple[str, TextTemplate], ...], *bodies: Any
) -> tuple[tuple[str, TextTemplate], ...]:
    """The step's headers, with ``x-virtsvc-seed`` when a reply is generated without a seed of its own."""
    for body in bodies:
        header = getattr(body, "seed_header", None)
        if header is not None and all(k != synthetic.SEED_HEADER for k, _ in headers):
            return (*headers, (synthetic.SEED_HEADER, header))
    return headers


def load_scenarios(
    paths: str | Path | Sequence[str | Path], catalog: Catalog, upstreams: Collection[str] = ()
) -> list[CompiledScenario]:
    """Loads and validates scenario files, directories and scripts against ``catalog``; raises
    ScenarioError listing every problem. The public way to get compiled scenarios for a server.
    ``upstreams`` names the real services ``passthrough:`` may forward to."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        return []
    return compile_sources(load_sources([Path(p) for p in paths]), catalog, upstreams)


def unknown_upstream_message(name: str, known: Collection[str]) -> str:
    """The one wording of "no such upstream", with the closest names and the declared ones."""
    names = sorted(known)
    text = f'unknown upstream "{name}"' + _text.did_you_mean(name, names, quote='"')
    if not names:
        return text + "; no upstream is declared (serve --upstream NAME=HOST:PORT)"
    return text + "; declared upstreams: " + _text.quoted_list(names)
