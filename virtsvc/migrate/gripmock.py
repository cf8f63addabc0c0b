"""GripMock stub files -> virtsvc scenarios (``virtsvc import gripmock``).

Each directory (or file) given becomes one scenario: every ``.yaml``/``.yml``/``.json`` stub file under it,
one stub or a list, read with their lines. A stub becomes a rule that answers as GripMock would:

- ``service`` (the short name too, resolved against the contracts) and ``method`` -> ``method``;
- ``input``/``inputs``/``headers`` matchers -> ``when`` (``equals`` literals, ``matches`` -> ``$regex``,
  ``contains`` -> subsets and ``$all``, ``glob`` -> ``$glob``, ``ignoreArrayOrder`` -> ``$unordered``,
  ``anyOf`` -> ``$anyOf``); on streams, ``input`` is any message of a client stream and each message of a
  bidi call (a per-message rule), ``inputs`` is message i of either (one element: every message);
- GripMock's choice among matching stubs (the stub matching more set request fields first, then
  ``priority``, then exact matchers over patterns, then more fields) -> rule priorities, ``options.times``
  -> ``times``;
- ``output`` -> ``reply``/``stream``/``status`` (``details`` with ``@type``), ``headers`` (trailers when the
  answer is an error with no message, as in GripMock), ``trailers``, ``delay`` (before every message), the
  in-stream ``_gripmock`` error marker; Go templates -> Jinja2 (:mod:`virtsvc.migrate.gotemplate`);
- ``effects`` -> ``effects`` (``upsert`` -> ``put``, ``delete`` -> ``remove``/``remove_self``), ``id`` ->
  ``id``; stubs of ``grpc.health.v1.Health`` -> health rules.

What cannot be expressed is a :class:`~virtsvc.errors.Problem` at the stub's ``file:line``; the scenario
written is then checked with virtsvc's own loader, and a rule it refuses is reported at its stub too.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from virtsvc.contracts import Catalog
from virtsvc.contracts.catalog import HEALTH_SERVICE, MethodSpec
from virtsvc.errors import Problem
from virtsvc.migrate.gotemplate import GoTemplateError, has_actions, load_time_value, translate
from virtsvc.scenarios.loader import check_scenarios
from virtsvc.scenarios.located import LocatedDict, LocatedList, Problems
from virtsvc.scenarios.yamltree import load_text

__all__ = ["NOT_FOUND_MESSAGE", "Imported", "import_gripmock"]

NOT_FOUND_MESSAGE = "No matching stub found"  # GripMock's status message when no stub matches
STUB_SUFFIXES = (".yaml", ".yml", ".json")
STUB_KEYS = ("id", "service", "method", "input", "inputs", "headers", "output", "priority", "options",
             "effects", "session", "_meta")  # fmt: skip
MATCHER_KEYS = ("equals", "contains", "matches", "glob", "ignoreArrayOrder", "anyOf")
OUTPUT_KEYS = ("data", "stream", "error", "code", "details", "headers", "trailers", "delay")
_LOAD_TIME = re.compile(r"\{\{-?\s*(uuid2int64|uuid2base64)\s+\"([^\"]*)\"\s*-?\}\}")
_SCENARIO_NAME = re.compile(r"[^a-z0-9._-]+")
_GRIPMOCK_SERVICE = "gripmock"  # GripMock's own readiness in its health service: never a stub's
_GO_UNITS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}  # in ms
_GO_DURATION_PART = r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)"
_MAX_PERMUTED = 5  # an unordered list of distinct patterns is tried in every order up to this length


@dataclass
class Imported:
    """One scenario made from GripMock stubs: its file's text, and what could not be converted."""

    scenario: str
    sources: list[Path]
    text: str = ""
    stubs: int = 0
    rules: int = 0
    problems: list[Problem] = field(default_factory=list)  # stubs (or parts) left out: file:line
    notes: list[Problem] = field(default_factory=list)  # converted, but answering otherwise than asked

    def write(self, out: Path) -> Path:
        """Writes ``OUT/<scenario>.yaml`` atomically; returns its path."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.scenario}.yaml"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{self.scenario}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.text)
        os.replace(tmp, path)
        return path


def import_gripmock(
    paths: Sequence[Path], catalog: Catalog, *, scenario: str | None = None
) -> list[Imported]:
    """The scenarios GripMock stubs under ``paths`` make: one per path (all in one named ``scenario``)."""
    groups = [(scenario, list(paths))] if scenario else [(_name_of(p), [p]) for p in paths]
    return [_Importer(catalog, name, sources).run() for name, sources in groups]


def stub_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in STUB_SUFFIXES and p.is_file())


def _name_of(path: Path) -> str:
    stem = (path.resolve().name if path.is_dir() else path.stem).lower()
    name = _SCENARIO_NAME.sub("-", stem).strip("-._")
    return name or "imported"


# --------------------------------------------------------------------------------------------------------
# one scenario


@dataclass
class _Rule:
    """A converted stub: the rule's data, where the stub was written, and its GripMock rank."""

    data: dict[str, Any]
    method: str
    file: str
    line: int
    rank: tuple[float, ...]  # (priority, exactness, fields); specificity goes first once all are read
    order: int
    keys: list[_Key] = field(default_factory=list)
    puts: list[_Rule] = field(default_factory=list)  # rules its effects put


@dataclass(frozen=True)
class _Key:
    """A request field a stub's matcher names: GripMock's specificity counts those set in the request."""

    message: int  # which message of a stream (0 for input)
    name: str
    kind: str  # equals, contains, matches, glob
    default: bool  # the matcher's value is the field's default (an unset field)


class _Importer:
    def __init__(self, catalog: Catalog, name: str, sources: list[Path]) -> None:
        self.catalog = catalog
        self.result = Imported(scenario=name, sources=sources)
        self.order = itertools.count()
        self.health = False  # a stub of the health service was imported

    def run(self) -> Imported:
        rules: list[_Rule] = []
        for source in self.result.sources:
            if not source.exists():
                self.problem(str(source), 0, "no such file or directory")
                continue
            files = stub_files(source)
            if not files:
                self.problem(str(source), 0, "no GripMock stub files (*.yaml, *.yml, *.json) here")
            for path in files:
                rules.extend(self.file(path))
        # A rule virtsvc's loader refuses is left out and the rest written again, so that what --partial
        # writes always loads; a problem outside any rule (or a loop that does not settle) stays a problem.
        for _ in range(3):
            self.result.text = self.render(rules)
            refused = self.verify()
            if not refused:
                break
            rules = [r for r in rules if id(r) not in refused]
        self.result.rules = len(rules)
        return self.result

    def problem(self, file: str, line: int, message: str) -> None:
        self.result.problems.append(Problem(file, line, message))

    def note(self, file: str, line: int, message: str) -> None:
        self.result.notes.append(Problem(file, line, message))

    def file(self, path: Path) -> list[_Rule]:
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(name, 0, f"cannot read: {exc}")
            return []
        problems = Problems()
        try:
            text = _LOAD_TIME.sub(lambda m: json.dumps(load_time_value(m[1], m[2])), text)
        except GoTemplateError as exc:
            self.problem(name, 0, str(exc))
            return []
        docs = load_text(text, name, problems)
        self.result.problems.extend(problems.items)
        rules: list[_Rule] = []
        for doc in docs:
            stubs = doc if isinstance(doc, list) else [doc]
            for i, stub in enumerate(stubs):
                line = stubs.item_lines[i] if isinstance(stubs, LocatedList) else getattr(stub, "line", 0)
                self.result.stubs += 1
                rule = _Stub(self, name, line or getattr(stub, "line", 0), stub).convert()
                if rule is not None:
                    rules.append(rule)
        return rules

    # ----------------------------------------------------------------------------------------------------
    # the scenario file

    def render(self, rules: list[_Rule]) -> str:
        _assign_priorities(rules)
        sources = ", ".join(str(s) for s in self.result.sources)
        head = {"scenario": self.result.scenario}
        lines = [
            f"# imported from GripMock stubs ({sources}) by `virtsvc import gripmock`",
            "# each rule names the stub it came from; priorities reproduce GripMock's choice among stubs",
            *_dump(head).rstrip().splitlines(),
            # GripMock answers a call no stub matches with NOT_FOUND; the near miss travels as a detail
            *_dump({"unmatched": {"code": "NOT_FOUND", "message": NOT_FOUND_MESSAGE}}).rstrip().splitlines(),
            "rules:",
        ]
        ordered = sorted(rules, key=lambda r: (r.method, -r.data.get("priority", 0), r.order))
        if self.health:
            ordered = [*_health_rules(), *ordered]
        self.spans: list[tuple[int, int, _Rule]] = []
        for rule in ordered:
            start = len(lines) + 1
            if rule.file:
                lines.append(f"  # {rule.file}:{rule.line}")
            body = _dump([rule.data]).rstrip().splitlines()
            lines.extend("  " + b for b in body)
            self.spans.append((start, len(lines), rule))
        return "\n".join(lines) + "\n"

    def verify(self) -> set[int]:
        """Loads the scenario as ``virtsvc serve`` would; a problem is reported at the stub it came from.
        Returns the ids of the rules refused."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{self.result.scenario}.yaml"
            path.write_text(self.result.text, encoding="utf-8")
            problems, _ = check_scenarios([path], self.catalog)
        refused: set[int] = set()
        for p in problems:
            span = next(((s, e, r) for s, e, r in self.spans if s <= p.line <= e), None)
            if span is None or not span[2].file:
                self.problem(self.result.scenario, p.line, f"the imported scenario: {p.message}")
            else:
                rule = span[2]
                refused.add(id(rule))
                self.problem(rule.file, rule.line, f"imported as {p.message}")
        return refused


class _Dumper(yaml.SafeDumper):
    """Block style with list items indented under their key, as people write scenario files."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _dump(value: Any) -> str:
    return yaml.dump(
        value, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1 << 16
    )


def _health_rules() -> list[_Rule]:
    """GripMock's own readiness: service ``gripmock`` is SERVING whatever its stubs say."""
    method = f"{HEALTH_SERVICE}/Check"
    data = {
        "method": method,
        "when": {"request": {"service": _GRIPMOCK_SERVICE}},
        "reply": {"status": "SERVING"},
    }
    return [_Rule(data, method, "", 0, (), -1)]


def _assign_priorities(rules: list[_Rule]) -> None:
    """Priorities from GripMock's ranks, per method, for the scenario's rules and the rules effects put
    alike (a put rule competes with the scenario's by priority): 0 for the lowest rank, one more per rank
    above it; no priority key where a method's rules all rank alike."""
    everything: list[_Rule] = []
    pending = list(rules)
    while pending:
        rule = pending.pop()
        everything.append(rule)
        pending.extend(rule.puts)
    # Specificity counts the named fields whose value in the request is set. Statically: an equals of a
    # non-default value, and a pattern or subset on a field, unless another stub of the method pins that
    # field to its default (when both match, the field is unset, so neither counts it).
    pinned: dict[str, set[tuple[int, str]]] = {}
    for rule in everything:
        for key in rule.keys:
            if key.kind == "equals" and key.default:
                pinned.setdefault(rule.method, set()).add((key.message, key.name))
    ranks: dict[int, tuple[float, ...]] = {}
    for rule in everything:
        pins = pinned.get(rule.method, set())
        specificity = sum(
            1
            for k in rule.keys
            if k.kind != "glob" and not k.default and (k.kind == "equals" or (k.message, k.name) not in pins)
        )
        ranks[id(rule)] = (specificity, *rule.rank)
    by_method: dict[str, set[tuple[float, ...]]] = {}
    for rule in everything:
        by_method.setdefault(rule.method, set()).add(ranks[id(rule)])
    for rule in everything:
        ordered = sorted(by_method[rule.method])
        position = ordered.index(ranks[id(rule)])
        rule.data.pop("priority", None)
        if position:
            rule.data["priority"] = position
            # keep the key where it reads best: after method and when
            rule.data = _with_key_after(rule.data, "priority", ("when", "per_message", "method"))
    for rule in everything:  # the effects name the put rules' final data
        for effect in rule.data.get("effects", ()):
            put = effect.get("put")
            if isinstance(put, dict):
                match = next((p for p in rule.puts if p.data.get("id") == put.get("id")), None)
                if match is not None:
                    effect["put"] = match.data


def _with_key_after(data: dict[str, Any], key: str, after: tuple[str, ...]) -> dict[str, Any]:
    value = data.pop(key)
    anchor = next((a for a in after if a in data), None)
    out: dict[str, Any] = {}
    for k, v in data.items():
        out[k] = v
        if k == anchor:
            out[key] = value
    if key not in out:
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------
# one stub


class _Skip(Exception):
    """The stub (or effect) cannot be converted; the problem is recorded already."""


class _Stub:
    def __init__(self, importer: _Importer, file: str, line: int, node: Any) -> None:
        self.importer = importer
        self.file = file
        self.line = line
        self.node = node

    def fail(self, message: str, node: Any = None, key: Any = None) -> _Skip:
        self.importer.problem(self.file, self._line(node, key), message)
        return _Skip()

    def _line(self, node: Any, key: Any) -> int:
        if isinstance(node, LocatedDict) and key is not None and key in node.key_lines:
            return node.key_lines[key]
        return getattr(node, "line", 0) or self.line

    def convert(self) -> _Rule | None:
        try:
            return self._convert(self.node)
        except _Skip:
            return None

    def _convert(self, stub: Any) -> _Rule:
        if not isinstance(stub, Mapping):
            raise self.fail(
                f"a stub is a mapping (service, method, input, output), got {type(stub).__name__}"
            )
        for key in stub:
            if key not in STUB_KEYS:
                raise self.fail(
                    f"unknown stub key {key!r} (GripMock's keys: {', '.join(STUB_KEYS)})", stub, key
                )
        if stub.get("session"):
            raise self.fail("session: stubs bound to a GripMock session are not imported", stub, "session")
        spec = self.method(stub)
        if spec.service == HEALTH_SERVICE:
            self.importer.health = True
            service = _health_service(stub)
            if service == _GRIPMOCK_SERVICE:
                self.importer.note(
                    self.file,
                    self.line,
                    "a stub for GripMock's own health (service gripmock) is ignored, as GripMock ignores "
                    "it: the import answers SERVING for it",
                )
                raise _Skip()
        data: dict[str, Any] = {}
        if stub.get("id") is not None:
            data["id"] = str(stub["id"])
        data["method"] = spec.full_name
        matching = _Matching(self, spec)
        per_message = spec.kind == "bidi_streaming"
        if per_message:
            data["per_message"] = True
        when, rank = matching.when(stub)
        if when:
            data["when"] = when
        options = stub.get("options") or {}
        if not isinstance(options, Mapping):
            raise self.fail("options: expected a mapping (times)", stub, "options")
        for key in options:
            if key != "times":
                raise self.fail(f"options.{key} is not imported (only options.times is)", options, key)
        times = options.get("times")
        if times:
            if not isinstance(times, int) or isinstance(times, bool) or times < 0:
                raise self.fail(f"options.times: expected a whole number, got {times!r}", options, "times")
            data["times"] = times
        output = stub.get("output")
        if not isinstance(output, Mapping):
            raise self.fail("output: expected a mapping (data, stream, error, code...)", stub, "output")
        data.update(_Output(self, spec, output, matching.inputs_count).convert())
        priority = stub.get("priority") or 0
        if not isinstance(priority, (int, float)) or isinstance(priority, bool):
            raise self.fail(f"priority: expected a number, got {priority!r}", stub, "priority")
        rule = _Rule(data, spec.full_name, self.file, self.line, (priority, *rank), 0, matching.keys)
        rule.order = next(self.importer.order)
        if "effects" in stub:
            data["effects"] = self.effects(stub, rule)
        return rule

    def method(self, stub: Mapping[str, Any]) -> MethodSpec:
        service, method = stub.get("service"), stub.get("method")
        if not isinstance(service, str) or not service:
            raise self.fail("service: missing (the service's full or short name)", stub, "service")
        if not isinstance(method, str) or not method:
            raise self.fail("method: missing", stub, "method")
        names = (*self.importer.catalog.services, HEALTH_SERVICE)
        candidates = [s for s in names if s == service] or [
            s for s in names if s.rsplit(".", 1)[-1] == service or s.endswith("." + service)
        ]
        if not candidates:
            known = ", ".join(self.importer.catalog.services) or "none"
            raise self.fail(
                f"service {service!r} is not in the contracts (their services: {known}); give the "
                "contracts that define it with --protos DIR or --descriptors FILE",
                stub,
                "service",
            )
        if len(candidates) > 1:
            raise self.fail(
                f"service {service!r} is ambiguous: {', '.join(candidates)}; write the full name",
                stub,
                "service",
            )
        spec = self.importer.catalog.find(f"{candidates[0]}/{method}")
        if spec is None:
            methods = [
                m.name for m in self.importer.catalog.methods.values() if m.service == candidates[0]
            ] or [n.split("/")[1] for n in self.importer.catalog.builtin if n.startswith(candidates[0] + "/")]
            raise self.fail(
                f"method {method!r} is not a method of {candidates[0]} (methods: {', '.join(methods)}; "
                "GripMock's method names are case-sensitive)",
                stub,
                "method",
            )
        return spec

    def effects(self, stub: Mapping[str, Any], rule: _Rule) -> list[dict[str, Any]]:
        items = stub["effects"]
        if not isinstance(items, list):
            raise self.fail("effects: expected a list of {action, stub | id}", stub, "effects")
        out: list[dict[str, Any]] = []
        for item in items:
            if not isinstance(item, Mapping):
                raise self.fail("effects: each effect is a mapping {action, stub | id}", item)
            action = item.get("action")
            if action == "upsert":
                target = item.get("stub")
                if not isinstance(target, Mapping) or not target.get("id"):
                    raise self.fail("effects: an upsert needs a stub with an id", item)
                line = getattr(target, "line", 0) or self._line(item, "stub")
                put = _Stub(self.importer, self.file, line, target)._convert(target)
                rule.puts.append(put)
                out.append({"put": put.data})
            elif action == "delete":
                ref = item.get("id")
                if not ref:
                    raise self.fail("effects: a delete needs the id of the stub it removes", item)
                if str(ref) == rule.data.get("id"):
                    out.append({"remove_self": True})
                else:
                    out.append({"remove": str(ref)})
            else:
                raise self.fail(
                    f"effects: unknown action {action!r} (GripMock's: upsert, delete)", item, "action"
                )
        return out


def _health_service(stub: Mapping[str, Any]) -> str | None:
    block = stub.get("input")
    if isinstance(block, Mapping):
        for key in ("equals", "contains"):
            values = block.get(key)
            if isinstance(values, Mapping) and isinstance(values.get("service"), str):
                return str(values["service"])
    return None


# --------------------------------------------------------------------------------------------------------
# matchers -> when


class _Matching:
    """``input``/``inputs``/``headers`` -> a ``when`` block and GripMock's static rank of the stub:
    (specificity, exactness, field count)."""

    def __init__(self, stub: _Stub, spec: MethodSpec) -> None:
        self.stub = stub
        self.spec = spec
        self.inputs_count: int | None = None
        self.keys: list[_Key] = []

    def when(self, node: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[float, float]]:
        stub, spec = self.stub, self.spec
        if "input" in node and "inputs" in node:
            raise stub.fail("a stub has input or inputs, not both", node, "inputs")
        when: dict[str, Any] = {}
        exact = fields = 0.0
        alternatives: list[list[dict[str, Any]]] = []
        if node.get("input") is not None:
            block = node["input"]
            condition, alts, score = self.block(block, "input", 0)
            exact, fields = score
            key = {
                "unary": "request",
                "server_streaming": "request",
                "client_streaming": "any_request",
                "bidi_streaming": "request",
            }[spec.kind]
            if condition:
                when[key] = condition
            if alts:
                alternatives.append([{key: a} for a in alts])
        elif node.get("inputs") is not None:
            blocks = node["inputs"]
            if not isinstance(blocks, list) or not blocks:
                raise stub.fail("inputs: expected a non-empty list of matcher blocks", node, "inputs")
            if not spec.client_streaming:
                raise stub.fail(
                    f"inputs: {spec.full_name} is {spec.kind.replace('_', ' ')}; inputs belong to client "
                    "streaming and bidi methods (use input)",
                    node,
                    "inputs",
                )
            conditions = []
            for i, block in enumerate(blocks):
                condition, alts, score = self.block(block, f"inputs[{i}]", i)
                if alts:
                    raise stub.fail(f"inputs[{i}].anyOf is not imported (anyOf in input is)", block, "anyOf")
                conditions.append(condition)
                exact, fields = exact + score[0], fields + score[1]
            if len(blocks) == 1:  # one element: every message must match it, whatever their count
                when["every_request" if spec.kind == "client_streaming" else "request"] = conditions[0]
            else:
                when["requests"] = conditions
                self.inputs_count = len(blocks)
        if node.get("headers") is not None:
            condition, alts, score = self.block(node["headers"], "headers", 0, headers=True)
            exact += 2 * score[0]  # GripMock ranks matched headers above inputs of the same rank
            fields += score[1]
            if condition:
                when["metadata"] = condition
            if alts:
                alternatives.append([{"metadata": a} for a in alts])
        if alternatives:
            if len(alternatives) == 1:
                when["$anyOf"] = alternatives[0]
            else:  # input.anyOf and headers.anyOf: every pairing
                when["$anyOf"] = [_merge_blocks(list(combo)) for combo in itertools.product(*alternatives)]
        return when, (exact, fields)

    def block(
        self, node: Any, where: str, message: int, *, headers: bool = False
    ) -> tuple[dict[str, Any], list[dict[str, Any]], tuple[float, float]]:
        """One matcher block -> (condition, anyOf alternatives, (exactness, fields)); the fields it names
        go to ``keys``."""
        stub = self.stub
        if not isinstance(node, Mapping):
            raise stub.fail(f"{where}: expected a mapping of matchers ({', '.join(MATCHER_KEYS)})", node)
        for key in node:
            if key not in MATCHER_KEYS:
                raise stub.fail(
                    f"{where}.{key}: unknown matcher (GripMock's: {', '.join(MATCHER_KEYS)})", node, key
                )
        unordered = bool(node.get("ignoreArrayOrder"))
        desc = None if headers else self.spec.input
        condition: dict[str, Any] = {}
        exact = fields = 0.0
        for kind in ("equals", "contains", "matches", "glob"):
            values = node.get(kind)
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise stub.fail(f"{where}.{kind}: expected a mapping of fields", node, kind)
            for name, value in values.items():
                key = str(name).lower() if headers else str(name)
                converted = self.value(kind, value, unordered, headers, f"{where}.{kind}.{name}", values)
                if key in condition:
                    try:
                        converted = _combine(condition[key], converted)
                    except ValueError as exc:
                        raise stub.fail(f"{where}.{kind}.{name}: {exc}", values, name) from None
                condition[key] = converted
                fields += 1
                default = kind != "matches" and _is_default(value, _field(desc, str(name)))
                if not headers:
                    self.keys.append(_Key(message, str(name), kind, default))
                if kind != "glob" and not default:
                    exact += 1 if kind == "equals" else 0.5
        alternatives: list[dict[str, Any]] = []
        if node.get("anyOf") is not None:
            alts = node["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise stub.fail(f"{where}.anyOf: expected a non-empty list of matcher blocks", node, "anyOf")
            for i, alt in enumerate(alts):
                alt_condition, nested, score = self.block(
                    alt, f"{where}.anyOf[{i}]", message, headers=headers
                )
                if nested:
                    raise stub.fail(
                        f"{where}.anyOf[{i}]: an anyOf inside anyOf is not imported", alt, "anyOf"
                    )
                alternatives.append(alt_condition)
                fields += score[1]
            exact += 0.5
        return condition, alternatives, (exact, fields)

    def value(self, kind: str, value: Any, unordered: bool, headers: bool, where: str, node: Any) -> Any:
        stub = self.stub
        _no_templates(stub, value, where, node)
        if kind == "equals":
            return _equals(value, unordered)
        if kind == "contains":
            return _contains(value)
        if kind == "glob":
            if not isinstance(value, str):
                raise stub.fail(f"{where}: a glob is a text pattern, got {value!r}", node)
            return {"$glob": value}
        # matches: Go regexp, unanchored, per leaf; numbers through their text
        return _matches(stub, value, unordered, where, node)


def _field(desc: Descriptor | None, name: str) -> FieldDescriptor | None:
    if desc is None:
        return None
    found = desc.fields_by_name.get(name)
    if found is None:
        found = next((f for f in desc.fields if f.json_name == name), None)
    return found


def _is_default(value: Any, fd: FieldDescriptor | None) -> bool:
    """Whether ``value`` is what an unset field reads as (GripMock's specificity skips those)."""
    if value is None or value == "" or value is False or value == [] or value == {}:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return True
    if fd is not None and fd.enum_type is not None and isinstance(value, str):
        zero = fd.enum_type.values[0].name if fd.enum_type.values else None
        return value == zero
    return False


def _no_templates(stub: _Stub, value: Any, where: str, node: Any) -> None:
    if isinstance(value, str) and has_actions(value):
        raise stub.fail(
            f"{where}: templates in matchers are not imported (GripMock renders them at load)", node
        )
    if isinstance(value, Mapping):
        for k, v in value.items():
            _no_templates(stub, v, f"{where}.{k}", node)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_templates(stub, v, f"{where}[{i}]", node)


def _plain(value: Any) -> Any:
    """Located nodes as plain dicts and lists, for the YAML writer."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _equals(value: Any, unordered: bool) -> Any:
    if isinstance(value, list):
        items = [_equals(v, unordered) if isinstance(v, Mapping) else _plain(v) for v in value]
        return {"$unordered": items} if unordered else items
    if isinstance(value, Mapping):
        return {str(k): _equals(v, unordered) for k, v in value.items()}
    return _plain(value)


def _contains(value: Any) -> Any:
    if isinstance(value, list):
        return {"$all": [_plain(v) for v in value]}
    if isinstance(value, Mapping):
        return {str(k): _contains(v) for k, v in value.items()}
    return _plain(value)


def _matches(stub: _Stub, value: Any, unordered: bool, where: str, node: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _matches(stub, v, unordered, f"{where}.{k}", node) for k, v in value.items()}
    if isinstance(value, list):
        patterns = [_pattern(stub, v, where, node) for v in value]
        if not unordered or len(set(patterns)) == 1:
            return {"$regex": patterns}
        if len(patterns) > _MAX_PERMUTED:
            raise stub.fail(
                f"{where}: ignoreArrayOrder over more than {_MAX_PERMUTED} different patterns is not "
                "imported",
                node,
            )
        orders = dict.fromkeys(itertools.permutations(patterns))
        return {"$anyOf": [{"$regex": list(order)} for order in orders]}
    return {"$regex": _pattern(stub, value, where, node)}


def _pattern(stub: _Stub, value: Any, where: str, node: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (Mapping, list)):
        raise stub.fail(f"{where}: a pattern is text or a number, got {value!r}", node)
    # Go's RE2 syntax is (nearly) a subset of Python's; \z is Go's end of text
    return str(value).replace(r"\z", r"\Z")


def _combine(a: Any, b: Any) -> Any:
    """Two matchers on one field (``equals`` and ``matches`` of the same name), both required."""
    ops_a = a if _is_ops(a) else {"$eq": a}
    ops_b = b if _is_ops(b) else {"$eq": b}
    both = set(ops_a) & set(ops_b)
    if both:
        raise ValueError(f"two {', '.join(sorted(both))} conditions on one field")
    return {**ops_a, **ops_b}


def _is_ops(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(str(k).startswith("$") for k in value)


def _merge_blocks(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block in blocks:
        for key, condition in block.items():
            out[key] = {**out.get(key, {}), **condition}
    return out


# --------------------------------------------------------------------------------------------------------
# output -> the answer


class _Output:
    def __init__(self, stub: _Stub, spec: MethodSpec, node: Mapping[str, Any], inputs: int | None) -> None:
        self.stub = stub
        self.spec = spec
        self.node = node
        self.inputs = inputs

    def fail(self, message: str, key: Any = None) -> _Skip:
        return self.stub.fail(f"output.{key}: {message}" if key else f"output: {message}", self.node, key)

    def convert(self) -> dict[str, Any]:
        node = self.node
        for key in node:
            if key not in OUTPUT_KEYS:
                raise self.fail(f"unknown key {key!r} (GripMock's: {', '.join(OUTPUT_KEYS)})")
        status = self.status()
        delay = self.delay(node.get("delay"), "delay")
        kind = self.spec.kind
        if kind == "bidi_streaming":
            return self.per_message(status, delay)
        headers = self.metadata("headers")
        trailers = self.metadata("trailers")
        out: dict[str, Any] = {}
        if kind == "server_streaming":
            items, marker = self.stream_items(delay)
            if marker is not None:
                status = marker
            if items or status is None:
                out["stream"] = items
            elif delay:
                out["delay"] = delay
            if headers and status is not None and not items:
                trailers = {**headers, **trailers}  # an error with no message: GripMock's trailers-only
                headers = {}
        else:
            if delay:
                out["delay"] = delay
            if status is None:
                data = node.get("data")
                if data is None and isinstance(node.get("stream"), list) and node["stream"]:
                    data = node["stream"][0]
                out["reply"] = self.message(data if data is not None else {}, "data")
            elif headers:
                trailers = {**headers, **trailers}
                headers = {}
        if status is not None:
            out["status"] = status
        if headers:
            out["headers"] = headers
        if trailers:
            out["trailers"] = trailers
        return out

    def per_message(self, status: dict[str, Any] | None, delay: str | None) -> dict[str, Any]:
        node = self.node
        for key in ("headers", "trailers"):
            if node.get(key):
                self.stub.importer.note(
                    self.stub.file,
                    self.stub.line,
                    f"output.{key} on a bidi stub are not sent: an answer per message has no {key}",
                )
        out: dict[str, Any] = {}
        if delay:
            out["delay"] = delay
        stream = node.get("stream")
        if self.inputs is not None:  # inputs: message i answered by stream[i]
            if status is not None:
                out["status"] = status
                return out
            replies = stream if isinstance(stream, list) and stream else None
            if replies is None:
                data = node.get("data")
                replies = [data if data is not None else {}] * self.inputs
            out["replies"] = [self.message(m, f"stream[{i}]") for i, m in enumerate(replies)]
            return out
        if status is not None:
            out["status"] = status
        elif isinstance(stream, list):
            items, marker = self.stream_items(None)
            out["stream"] = items
            if marker is not None:
                out.pop("stream") if not items else None
                out["status"] = marker
        else:
            data = node.get("data")
            out["reply"] = self.message(data if data is not None else {}, "data")
        return out

    def stream_items(self, delay: str | None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """``stream`` (or ``data`` as one message) as stream items, up to a ``_gripmock`` error marker."""
        node = self.node
        stream = node.get("stream")
        if stream is None:
            stream = [node["data"]] if node.get("data") is not None else []
        if not isinstance(stream, list):
            raise self.fail("expected a list of messages", "stream")
        items: list[dict[str, Any]] = []
        for i, message in enumerate(stream):
            item_delay = delay
            if isinstance(message, Mapping) and "_gripmock" in message:
                marker = message["_gripmock"]
                if not isinstance(marker, Mapping):
                    raise self.fail(f"[{i}]._gripmock: expected a mapping (error, code, delay)", "stream")
                if marker.get("error") is not None or marker.get("code"):
                    return items, self.status_of(marker, f"stream[{i}]._gripmock")
                item_delay = self.delay(marker.get("delay"), f"stream[{i}]._gripmock.delay") or delay
                message = {k: v for k, v in message.items() if k != "_gripmock"}
            item: dict[str, Any] = {"reply": self.message(message, f"stream[{i}]")}
            if item_delay:
                item["delay"] = item_delay
            items.append(item)
        return items, None

    def status(self) -> dict[str, Any] | None:
        return self.status_of(self.node, None)

    def status_of(self, node: Mapping[str, Any], where: str | None) -> dict[str, Any] | None:
        error, code = node.get("error"), node.get("code")
        if error is None and not code:
            if node.get("details") and where is None:
                raise self.fail("details without an error or code", "details")
            return None
        if code is None:
            code = 2  # GripMock's code for an error without one: UNKNOWN
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 16:
            raise self.fail(f"a status code is 0..16, got {code!r}", "code")
        status: dict[str, Any] = {"code": code}
        if error:
            status["message"] = self.text(str(error), "error")
        details = node.get("details") if where is None else None
        if details:
            if not isinstance(details, list):
                raise self.fail("expected a list of google.protobuf.Any-style detail objects", "details")
            status["details"] = [self.detail(d, i) for i, d in enumerate(details)]
        return status

    def detail(self, detail: Any, i: int) -> dict[str, Any]:
        if not isinstance(detail, Mapping):
            raise self.fail(f"[{i}]: expected a mapping with type or @type", "details")
        out = {str(k): _plain(v) for k, v in detail.items()}
        if "@type" not in out:
            if "type" not in out:
                raise self.fail(f"[{i}]: a detail names its message type with type or @type", "details")
            out = {"@type": out.pop("type"), **out}
        return out

    def delay(self, value: Any, where: str) -> str | None:
        if value in (None, "", 0):
            return None
        text = str(value).strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = f"{value}ns"  # a Go duration given as a number is nanoseconds
        if re.fullmatch(f"(?:{_GO_DURATION_PART})+", text) is None:
            raise self.fail(f"{value!r} is not a Go duration (10ms, 1.5s, 2m)", where.split(".")[0])
        ms = sum(float(n) * _GO_UNITS[unit] for n, unit in re.findall(_GO_DURATION_PART, text))
        return f"{ms:g}ms"

    def metadata(self, key: str) -> dict[str, str]:
        values = self.node.get(key)
        if not values:
            return {}
        if not isinstance(values, Mapping):
            raise self.fail("expected a mapping of metadata names to values", key)
        return {str(k).lower(): self.text(str(v), f"{key}.{k}") for k, v in values.items()}

    def message(self, value: Any, where: str) -> Any:
        if not isinstance(value, Mapping):
            raise self.fail(f"expected a message (a mapping of fields), got {value!r}", where.split("[")[0])
        return _numbers(self.templated(value, where), self.spec.output)

    def templated(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            return self.text(value, where)
        if isinstance(value, Mapping):
            return {str(k): self.templated(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.templated(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    def text(self, value: str, where: str) -> str:
        if not has_actions(value):
            if "{%" in value or "{#" in value:
                return "{% raw %}" + value + "{% endraw %}"
            return value
        try:
            return translate(value)
        except GoTemplateError as exc:
            raise self.fail(f"{where}: {exc}", where.split(".")[0].split("[")[0]) from None


_NUMERIC = {
    FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip


def _numbers(value: Any, desc: Descriptor | None) -> Any:
    """Numbers written as text in numeric fields made numbers: GripMock's YAML 1.2 reads ``1e+37`` as a
    float where YAML 1.1 reads text, and protojson takes quoted numbers; templates stay text."""
    if desc is None or not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        fd = _field(desc, key)
        if fd is None:
            out[key] = item
        elif fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                vf = fd.message_type.fields_by_name["value"]
                out[key] = {k: _number(v, vf) for k, v in item.items()} if isinstance(item, dict) else item
            elif isinstance(item, list):
                out[key] = [_numbers(v, fd.message_type) for v in item]
            else:
                out[key] = _numbers(item, fd.message_type)
        elif isinstance(item, list):
            out[key] = [_number(v, fd) for v in item]
        else:
            out[key] = _number(item, fd)
    return out


def _number(value: Any, fd: FieldDescriptor) -> Any:
    if fd.message_type is not None and isinstance(value, dict):
        return _numbers(value, fd.message_type)
    if fd.type not in _NUMERIC or not isinstance(value, str) or has_actions(value):
        return value
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return value
