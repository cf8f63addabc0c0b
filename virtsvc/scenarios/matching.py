"""Compiled ``when`` conditions: which calls a rule answers.

``when: {request: {...}, metadata: {...}}`` is validated against the method's input type at load and compiled
into flat *leaves*: a path into the request's proto3 JSON (or a metadata key) and a small test closure. A
check walks the leaves and nothing else: no parsing of conditions, no regex compilation, no descriptor
lookups. Literals are canonicalised at load into the exact proto3 JSON form the request takes (enum
names, int64 as text, normalised timestamps and durations, nested defaults dropped), so equality is ``==``.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import regex
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from virtsvc.contracts.catalog import MethodSpec
from virtsvc.errors import ConversionError
from virtsvc.scenarios.fields import (
    DURATION,
    INT64_TYPES,
    JSON_TYPES,
    TIMESTAMP,
    WRAPPERS,
    element_default,
    is_map,
    json_default,
    map_key,
    message_class,
    named_fields,
    set_field,
    show,
    special_type,
    suggest,
    type_name,
)
from virtsvc.scenarios.located import Site
from virtsvc.scenarios.model import Call, Matcher, MatchResult, to_json

__all__ = [
    "MAX_REGEX",
    "MAX_REGEX_INPUT",
    "OPERATORS",
    "STREAM_KEYS",
    "WHEN_KEYS",
    "compile_when",
    "glob_regex",
]

OPERATORS = (
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$regex", "$glob", "$contains", "$all", "$unordered",
    "$exists", "$anyOf",
)  # fmt: skip
# request: the first message; requests: every message of a client stream, element by element, with the count;
# any_request / every_request: some / each message of a client stream; $anyOf: an OR of when blocks
WHEN_KEYS = ("request", "requests", "any_request", "every_request", "metadata", "$anyOf")
STREAM_KEYS = ("requests", "any_request", "every_request")
# Python's re backtracks: a pattern like (a+)+$ can take exponential time. Patterns are bounded at load and
# applied to at most the first 64 KiB of a value, which keeps a bad pattern's cost bounded per check.
MAX_REGEX = 1000
MAX_REGEX_INPUT = 64 * 1024
REGEX_TIMEOUT = 0.1  # seconds one $regex may take on one value

_ORDER_SYMBOLS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_ORDER_TESTS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}
_MISSING = object()

Test = Callable[[bool, Any], "str | None"]  # (present, value or default) -> failure text or None


@dataclass(frozen=True, slots=True)
class _Leaf:
    """One condition: where its value is, what it is when absent, and the test.

    A ``whole`` leaf (``$anyOf`` on a field) tests the whole request or metadata: its alternatives are
    leaves of their own, at their own paths."""

    keys: tuple[str, ...]
    default: Any
    test: Test
    expected: Any = None  # for plain equality (``equality``): the canonical value the test compares with
    equality: bool = False
    whole: bool = False


def _request_failures(leaves: tuple[_Leaf, ...], root: Any) -> list[str]:
    """The failure texts of ``leaves`` on one request's JSON (every leaf is checked: counts rank misses)."""
    failures: list[str] = []
    for leaf in leaves:
        if leaf.whole:
            failure = leaf.test(True, root)
        else:
            present, value = _lookup(root, leaf.keys)
            failure = leaf.test(present, value if present else leaf.default)
        if failure is not None:
            failures.append(failure)
    return failures


def _metadata_failures(leaves: tuple[_Leaf, ...], md: Mapping[str, str]) -> list[str]:
    failures: list[str] = []
    for leaf in leaves:
        if leaf.whole:
            failure = leaf.test(True, md)
        else:
            value = md.get(leaf.keys[0], _MISSING)
            present = value is not _MISSING
            failure = leaf.test(present, value if present else None)
        if failure is not None:
            failures.append(failure)
    return failures


@dataclass(frozen=True, slots=True)
class _Streamed:
    """Conditions on every message of a client stream: ``requests`` (element by element, with the count),
    ``any_request`` and ``every_request``."""

    elements: tuple[tuple[_Leaf, ...], ...] | None = None
    any: tuple[_Leaf, ...] | None = None
    every: tuple[_Leaf, ...] | None = None

    @property
    def total(self) -> int:
        n = 0
        if self.elements is not None:
            n += 1 + sum(len(e) for e in self.elements)  # the count is a condition of its own
        n += len(self.any or ()) + len(self.every or ())
        return n

    def one(self, message: dict[str, Any], position: int) -> tuple[list[str], int]:
        """A per-message rule: message ``position`` of a bidi call meets condition ``position``."""
        assert self.elements is not None
        total = 1 + sum(len(e) for e in self.elements)
        if position >= len(self.elements):
            return [f"requests: message {position} is past the {_count(len(self.elements))} listed"], total
        missed = _request_failures(self.elements[position], message)
        # the conditions on the other positions do not apply to this message: they count as held
        return missed, len(missed)

    def failures(self, messages: list[dict[str, Any]]) -> tuple[list[str], int]:
        """The failure texts, and how many conditions failed (a missing message fails all of its own)."""
        failures: list[str] = []
        failed = 0
        if self.elements is not None:
            want = len(self.elements)
            if len(messages) != want:
                failures.append(f"requests: expected {_count(want)}, got {len(messages)}")
                failed += 1
            for i, leaves in enumerate(self.elements):
                if i < len(messages):
                    missed = _request_failures(leaves, messages[i])
                    failures.extend(missed)
                    failed += len(missed)
                elif leaves:
                    failed += len(leaves)
        if self.any is not None:
            missed = self._any(self.any, messages)
            failures.extend(missed)
            failed += len(missed) if messages else len(self.any)
        if self.every is not None:
            for i, message in enumerate(messages):
                missed = _request_failures(self.every, message)
                if missed:  # the first message that fails says why
                    failures.extend(f"message {i}: {text}" for text in missed)
                    failed += len(missed)
                    break
        return failures, failed

    @staticmethod
    def _any(leaves: tuple[_Leaf, ...], messages: list[dict[str, Any]]) -> list[str]:
        if not messages:
            return ["any_request: no message arrived"]
        best: tuple[int, list[str]] | None = None
        for i, message in enumerate(messages):
            missed = _request_failures(leaves, message)
            if not missed:
                return []
            if best is None or len(missed) < len(best[1]):
                best = (i, missed)
        assert best is not None
        i, missed = best
        return [f"no message matched (closest, message {i}: {text})" for text in missed]


def _count(n: int) -> str:
    return f"{n} message" if n == 1 else f"{n} messages"


class _When:
    """A compiled ``when``: leaves over ``call.request_json`` and over ``call.metadata``, conditions on every
    message of a client stream, and ``$anyOf`` groups of alternative ``when`` blocks."""

    __slots__ = ("_alternatives", "_matched", "_metadata", "_quick", "_request", "_streamed", "_total")

    def __init__(
        self,
        request: tuple[_Leaf, ...],
        metadata: tuple[_Leaf, ...],
        streamed: _Streamed | None = None,
        alternatives: tuple[tuple[_When, ...], ...] = (),
    ) -> None:
        self._request = request
        self._metadata = metadata
        self._streamed = streamed
        self._alternatives = alternatives
        self._total = (
            len(request) + len(metadata) + (streamed.total if streamed is not None else 0) + len(alternatives)
        )
        self._matched = MatchResult(True, self._total, self._total)  # the same answer for every match
        # The commonest ``when``: top-level fields and metadata keys equal to literals. Such a match is
        # decided by dict look-ups alone; the leaf tests run only to explain a miss.
        quick = (
            streamed is None
            and not alternatives
            and all(leaf.equality and len(leaf.keys) == 1 for leaf in (*request, *metadata))
        )
        self._quick: tuple[tuple[tuple[str, Any, Any], ...], tuple[tuple[str, Any], ...]] | None = (
            (
                tuple((leaf.keys[0], leaf.default, leaf.expected) for leaf in request),
                tuple((leaf.keys[0], leaf.expected) for leaf in metadata),
            )
            if quick
            else None
        )

    @property
    def needs_request(self) -> bool:
        return (
            bool(self._request)
            or self._streamed is not None
            or any(alt.needs_request for group in self._alternatives for alt in group)
        )

    def check(self, call: Call) -> MatchResult:
        if self._quick is not None and self._quick_match(call, *self._quick):
            return self._matched
        # Every leaf is checked, even after a failure: passed/total rank the near misses.
        failures: list[str] = []
        extra = 0  # conditions that failed beyond one text each (messages that never arrived)
        if self._request:
            failures.extend(_request_failures(self._request, call.request_json))
        if self._streamed is not None:
            position = call.position
            texts, failed = (
                self._streamed.failures(call.requests_json)
                if position is None
                else self._streamed.one(call.request_json, position)
            )
            failures.extend(texts)
            extra += failed - len(texts)
        if self._metadata:
            failures.extend(_metadata_failures(self._metadata, call.metadata))
        for group in self._alternatives:
            failure = _any_of([alt.check(call) for alt in group])
            if failure is not None:
                failures.append(failure)
        if not failures:
            return self._matched
        return MatchResult(False, max(self._total - len(failures) - extra, 0), self._total, tuple(failures))

    @staticmethod
    def _quick_match(
        call: Call, request: tuple[tuple[str, Any, Any], ...], metadata: tuple[tuple[str, Any], ...]
    ) -> bool:
        if request:
            root = call.request_json
            if type(root) is not dict:  # a well-known type's JSON (text, a list...): the full check says
                return False
            for key, default, expected in request:
                if root.get(key, default) != expected:
                    return False
        md = call.metadata
        for key, expected in metadata:  # noqa: SIM110 - a plain loop: no generator per call here
            if md.get(key) != expected:
                return False
        return True


def _any_of(results: list[MatchResult]) -> str | None:
    """None when one alternative holds, else one failure naming why each did not."""
    if any(r.ok for r in results):
        return None
    parts = [f"({i + 1}) " + "; ".join(r.failures) for i, r in enumerate(results)]
    return f"$anyOf: none of the {len(results)} alternatives held: " + " | ".join(parts)


def _lookup(root: Any, keys: tuple[str, ...]) -> tuple[bool, Any]:
    cur = root
    for k in keys:
        if not isinstance(cur, dict):
            return False, None
        cur = cur.get(k, _MISSING)
        if cur is _MISSING:
            return False, None
    return True, cur


def compile_when(
    node: Mapping[str, Any], method: MethodSpec, site: Site, path: str = "when", *, per_message: bool = False
) -> Matcher | None:
    """Compiles a ``when`` block for ``method``; None (every problem reported on ``site``) if it is wrong.

    ``per_message``: the rule matches each message of a bidi call on its own (``request`` is that message,
    ``requests[i]`` the condition on message i)."""
    before = len(site.problems.items)
    if not isinstance(node, Mapping):
        site.error(
            node, None, f"{path}: expected a mapping of conditions (request:, metadata:), got {show(node)}"
        )
        return None
    compiled = _compile_when(node, method, site, path, per_message)
    if len(site.problems.items) > before:
        return None
    return compiled


def _compile_when(
    node: Mapping[str, Any], method: MethodSpec, site: Site, path: str, per_message: bool = False
) -> _When:
    compiler = _Compiler(site)
    elements: list[tuple[_Leaf, ...]] | None = None
    any_leaves: tuple[_Leaf, ...] | None = None
    every_leaves: tuple[_Leaf, ...] | None = None
    alternatives: list[tuple[_When, ...]] = []
    for key, value in node.items():
        kpath = f"{path}.{key}"
        if key == "request":
            if isinstance(value, Mapping) and not _is_ops(value):
                compiler.message(method.input, value, (), "request", kpath)
            else:
                site.error(node, key, f"{kpath}: expected a mapping of request fields, got {show(value)}")
        elif key in STREAM_KEYS:
            if per_message and key != "requests":
                site.error(
                    node,
                    key,
                    f"{kpath}: a per-message rule sees one message at a time; use when.request for it, or "
                    "when.requests for message i",
                )
                continue
            if method.kind != "client_streaming" and not per_message:
                site.error(
                    node,
                    key,
                    f"{kpath}: {method.full_name} is {_kind_words(method.kind)}; {key} matches the messages "
                    "of a client stream (use when.request for the first message)",
                )
                continue
            if key == "requests":
                if not isinstance(value, list):
                    site.error(
                        node,
                        key,
                        f"{kpath}: expected a list of request conditions, one per message, got {show(value)}",
                    )
                    continue
                elements = []
                for i, item in enumerate(value):
                    ipath, ilabel = f"{kpath}[{i}]", f"requests[{i}]"
                    if not isinstance(item, Mapping) or _is_ops(item):
                        site.error(
                            value, i, f"{ipath}: expected a mapping of request fields, got {show(item)}"
                        )
                        continue
                    elements.append(_leaves(site, method.input, item, ilabel, ipath))
            elif isinstance(value, Mapping) and not _is_ops(value):
                leaves = _leaves(site, method.input, value, key, kpath)
                if key == "any_request":
                    any_leaves = leaves
                else:
                    every_leaves = leaves
            else:
                site.error(node, key, f"{kpath}: expected a mapping of request fields, got {show(value)}")
        elif key == "metadata":
            if isinstance(value, Mapping):
                compiler.metadata(value, kpath)
            else:
                site.error(node, key, f"{kpath}: expected a mapping of metadata keys, got {show(value)}")
        elif key == "$anyOf":
            if not isinstance(value, list) or not value:
                site.error(
                    node, key, f"{kpath}: expected a list of alternative when blocks, got {show(value)}"
                )
                continue
            group = []
            for i, item in enumerate(value):
                ipath = f"{kpath}[{i}]"
                if not isinstance(item, Mapping):
                    site.error(
                        value,
                        i,
                        f"{ipath}: expected a mapping of conditions (request:, metadata:), got {show(item)}",
                    )
                    continue
                group.append(_compile_when(item, method, site.at(item), ipath, per_message))
            alternatives.append(tuple(group))
        else:
            hint = suggest(str(key), WHEN_KEYS) or "; the keys are " + ", ".join(WHEN_KEYS)
            site.error(node, key, f'{kpath}: unknown key "{key}"{hint}')
    streamed = None
    if elements is not None or any_leaves is not None or every_leaves is not None:
        streamed = _Streamed(None if elements is None else tuple(elements), any_leaves, every_leaves)
    return _When(tuple(compiler.request), tuple(compiler.metadata_leaves), streamed, tuple(alternatives))


def _leaves(
    site: Site, desc: Descriptor, node: Mapping[Any, Any], label: str, path: str
) -> tuple[_Leaf, ...]:
    """The conditions on one message of a stream, each checked against that message."""
    compiler = _Compiler(site)
    compiler.message(desc, node, (), label, path)
    return tuple(compiler.request)


def _kind_words(kind: str) -> str:
    return {
        "unary": "a unary method",
        "server_streaming": "a server-streaming method",
        "client_streaming": "a client-streaming method",
    }.get(kind, "a bidi method")


def _is_ops(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and k.startswith("$") for k in value)
    )


# --------------------------------------------------------------------------------------------------------
# kinds: how the values at one path compare


@dataclass(frozen=True)
class _Kind:
    """What the values at a path are, as far as conditions are concerned."""

    name: str  # for messages: "int32", "repeated string", "common.v1.Region"...
    literal: Callable[[Any], Any]  # a literal (validated) as the canonical proto3 JSON value; ConversionError
    shape: str  # "scalar" | "list" | "map" | "message" | "json"
    order: str | None = None  # "int" | "float" | "time" | "duration" | "string": how $gt & co compare
    element: Callable[[Any], Any] | None = None  # lists: canonical form of one element ($contains)
    int64: bool = False  # JSON text that is shown and compared as a number
    textual: bool = True  # $regex applies
    item: _Kind | None = None  # lists: the kind of one element ($regex and $glob element by element)


def _show_as(kind: _Kind, value: Any) -> str:
    """A value for a failure text: JSON-style, int64 bare like other numbers."""
    if kind.int64:
        value = _int64_display(value)
    if kind.shape == "map" and isinstance(value, dict):
        value = dict(sorted(value.items()))  # map order on the wire is arbitrary; texts should be stable
    return show(value)


def _int64_display(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [_int64_display(v) for v in value]
    if isinstance(value, dict):
        return {k: _int64_display(v) for k, v in value.items()}
    return value


def _canonical(field: FieldDescriptor, *, element: bool = False) -> Callable[[Any], Any]:
    """Canonicalises literals for ``field`` by setting them on a scratch message and reading its JSON back."""
    cls = message_class(field.containing_type)
    name = field.name

    def literal(value: Any) -> Any:
        msg = cls()
        if element:
            try:
                set_field(msg, field, [value], True, "")
            except ConversionError as exc:
                # the literal is one element: drop the "[0]" of the scratch list from the path
                raise ConversionError(exc.path.removeprefix("[0]"), exc.message) from None
            try:
                return to_json(msg)[name][0]
            except ValueError as exc:
                raise ConversionError("", str(exc)) from None
        try:
            set_field(msg, field, value, True, "")
            return to_json(msg).get(name, json_default(field))
        except ConversionError:
            raise
        except ValueError as exc:  # e.g. a Duration or Timestamp outside protobuf's range
            raise ConversionError("", str(exc)) from None

    return literal


def _field_kind(field: FieldDescriptor, *, element: bool = False) -> _Kind:
    """The kind of a field's values (``element``: of one item of a repeated field)."""
    tname = type_name(field, element=element)
    if is_map(field) and not element:
        return _Kind(tname, _canonical(field), "map", textual=False)
    if field.is_repeated and not element:
        inner = _field_kind(field, element=True)
        return _Kind(
            tname,
            _canonical(field),
            "list",
            element=_canonical(field, element=True),
            int64=inner.int64,
            textual=False,
            item=inner,
        )
    literal = _canonical(field, element=True) if element else _canonical(field)
    special = special_type(field)
    if field.message_type is not None:
        if special == TIMESTAMP:
            return _Kind(tname, literal, "scalar", order="time")
        if special == DURATION:
            return _Kind(tname, literal, "scalar", order="duration")
        if special in WRAPPERS:
            inner = _field_kind(field.message_type.fields_by_name["value"])
            return _Kind(
                tname, literal, "scalar", order=inner.order, int64=inner.int64, textual=inner.textual
            )
        if special in JSON_TYPES:
            return _Kind(tname, literal, "json", textual=False)
        return _Kind(tname, literal, "message", textual=False)
    if field.enum_type is not None:
        return _Kind(tname, literal, "scalar")
    t = field.type
    if t in INT64_TYPES:
        return _Kind(tname, literal, "scalar", order="int", int64=True)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _Kind(tname, literal, "scalar", order="float")
    if t == FieldDescriptor.TYPE_BOOL:
        return _Kind(tname, literal, "scalar")
    if t == FieldDescriptor.TYPE_STRING:
        return _Kind(tname, literal, "scalar", order="string")
    if t == FieldDescriptor.TYPE_BYTES:
        return _Kind(tname, literal, "scalar")
    return _Kind(tname, literal, "scalar", order="int")


def _json_literal(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        return [_json_literal(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _json_literal(v) for k, v in value.items()}
    raise ConversionError("", f"expected a JSON value, got {show(value)}")


_JSON_KIND = _Kind("JSON value", _json_literal, "json", textual=False)


def _metadata_literal(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    raise ConversionError("", f"expected text, got {show(value)}")


_METADATA_KIND = _Kind("metadata value", _metadata_literal, "scalar", order="string")


# --------------------------------------------------------------------------------------------------------
# the compiler


class _Compiler:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.request: list[_Leaf] = []
        self.metadata_leaves: list[_Leaf] = []

    def message(
        self, desc: Descriptor, node: Mapping[Any, Any], keys: tuple[str, ...], label: str, path: str
    ) -> None:
        """Subset match: every field named must match."""
        for key, field, value, kpath in named_fields(desc, node, path, self.site):
            self.field(field, value, node, key, (*keys, field.name), f"{label}.{key}", kpath)

    def field(
        self,
        field: FieldDescriptor,
        value: Any,
        node: Any,
        key: Any,
        keys: tuple[str, ...],
        label: str,
        path: str,
    ) -> None:
        kind = _field_kind(field)
        default = json_default(field)
        if self._mixed(value, node, key, path):
            return
        if _is_ops(value):

            def alternative(alt: Any, apath: str, compiler: _Compiler) -> None:
                compiler.field(field, alt, node, key, keys, label, apath)

            self.operators(kind, value, keys, default, label, path, self.request, alternative)
        elif kind.shape == "map" and isinstance(value, Mapping):
            self.map_entries(field, value, keys, label, path)
        elif kind.shape == "message" and isinstance(value, Mapping):
            self.message(field.message_type, value, keys, label, path)
        elif (
            kind.shape == "json"
            and isinstance(value, Mapping)
            and special_type(field) != "google.protobuf.Value"
        ):
            self.json_subset(value, keys, label, path)
        else:
            self.literal(kind, value, node, key, keys, default, label, path)

    def map_entries(
        self, field: FieldDescriptor, node: Mapping[Any, Any], keys: tuple[str, ...], label: str, path: str
    ) -> None:
        """Subset of a map's entries; each entry's value is a literal, operators or (messages) a subset."""
        kf = field.message_type.fields_by_name["key"]
        vf = field.message_type.fields_by_name["value"]
        kind = _field_kind(vf)
        for mk, mv in node.items():
            epath = f"{path}.{mk}"
            try:
                # JSON renders every map key as text: true, 7, "eu"
                k = _map_key_text(kf, mk, epath)
            except ConversionError as exc:
                self.site.error(node, mk, str(exc))
                continue
            ekeys, elabel = (*keys, k), f"{label}.{mk}"
            if self._mixed(mv, node, mk, epath):
                continue
            if _is_ops(mv):

                def alternative(
                    alt: Any, apath: str, compiler: _Compiler, k: Any = mk, ek: Any = ekeys, el: str = elabel
                ) -> None:
                    if _is_ops(alt):
                        compiler.operators(kind, alt, ek, element_default(vf), el, apath, compiler.request)
                    elif kind.shape == "message" and isinstance(alt, Mapping):
                        compiler.message(vf.message_type, alt, ek, el, apath)
                    else:
                        compiler.literal(kind, alt, node, k, ek, element_default(vf), el, apath)

                self.operators(kind, mv, ekeys, element_default(vf), elabel, epath, self.request, alternative)
            elif kind.shape == "message" and isinstance(mv, Mapping):
                self.message(vf.message_type, mv, ekeys, elabel, epath)
            else:
                self.literal(kind, mv, node, mk, ekeys, element_default(vf), elabel, epath)

    def json_subset(self, node: Mapping[Any, Any], keys: tuple[str, ...], label: str, path: str) -> None:
        """Struct and Any: every key named must match (nested mappings match as subsets too)."""
        for k, v in node.items():
            kpath, klabel = f"{path}.{k}", f"{label}.{k}"
            if not isinstance(k, str):
                self.site.error(node, k, f"{kpath}: keys of a JSON object are text, got {show(k)}")
                continue
            if self._mixed(v, node, k, kpath):
                continue
            if _is_ops(v):
                self.operators(_JSON_KIND, v, (*keys, k), None, klabel, kpath, self.request)
            elif isinstance(v, Mapping) and v:
                self.json_subset(v, (*keys, k), klabel, kpath)
            else:
                self.literal(_JSON_KIND, v, node, k, (*keys, k), None, klabel, kpath)

    def metadata(self, node: Mapping[Any, Any], path: str) -> None:
        for key, value in node.items():
            if not isinstance(key, str):
                self.site.error(node, key, f"{path}.{key}: metadata keys are text, got {show(key)}")
                continue
            name = key.lower()  # gRPC metadata keys are case-insensitive and arrive in lower case
            kpath, label = f"{path}.{key}", f"metadata.{name}"
            if self._mixed(value, node, key, kpath):
                continue
            if _is_ops(value):

                def alternative(
                    alt: Any, apath: str, compiler: _Compiler, k: Any = key, n: str = name, lb: str = label
                ) -> None:
                    if _is_ops(alt):
                        out = compiler.metadata_leaves
                        compiler.operators(_METADATA_KIND, alt, (n,), None, lb, apath, out)
                    else:
                        compiler.literal(
                            _METADATA_KIND, alt, node, k, (n,), None, lb, apath, compiler.metadata_leaves
                        )

                self.operators(
                    _METADATA_KIND, value, (name,), None, label, kpath, self.metadata_leaves, alternative
                )
            else:
                self.literal(
                    _METADATA_KIND, value, node, key, (name,), None, label, kpath, self.metadata_leaves
                )

    def _mixed(self, value: Any, node: Any, key: Any, path: str) -> bool:
        if isinstance(value, Mapping) and value and not _is_ops(value):
            ops = [k for k in value if isinstance(k, str) and k.startswith("$")]
            if ops:
                others = [str(k) for k in value if k not in ops]
                self.site.error(
                    node,
                    key,
                    f"{path}: mixes operators ({', '.join(ops)}) and field names ({', '.join(others)}); "
                    "use one or the other",
                )
                return True
        return False

    def literal(
        self,
        kind: _Kind,
        value: Any,
        node: Any,
        key: Any,
        keys: tuple[str, ...],
        default: Any,
        label: str,
        path: str,
        out: list[_Leaf] | None = None,
    ) -> None:
        try:
            expected = kind.literal(value)
        except ConversionError as exc:
            self.site.error(node, key, f"{path}{exc.path}: {exc.message}")
            return
        leaf = _Leaf(keys, default, _equal(kind, expected, label), expected, True)
        (self.request if out is None else out).append(leaf)

    def operators(
        self,
        kind: _Kind,
        ops: Mapping[str, Any],
        keys: tuple[str, ...],
        default: Any,
        label: str,
        path: str,
        out: list[_Leaf],
        alternative: Callable[[Any, str, _Compiler], None] | None = None,
    ) -> None:
        for op, operand in ops.items():
            opath = f"{path}.{op}"
            if op not in OPERATORS:
                hint = suggest(op, OPERATORS) or "; the operators are " + ", ".join(OPERATORS)
                self.site.error(ops, op, f'{opath}: unknown operator "{op}"{hint}')
                continue
            if op == "$anyOf":
                self.any_of(ops, operand, label, opath, out, alternative)
                continue
            try:
                test = _operator(kind, op, operand, label)
            except ConversionError as exc:
                self.site.error(ops, op, f"{opath}{exc.path}: {exc.message}")
                continue
            out.append(_Leaf(keys, default, test))

    def any_of(
        self,
        ops: Mapping[str, Any],
        operand: Any,
        label: str,
        path: str,
        out: list[_Leaf],
        alternative: Callable[[Any, str, _Compiler], None] | None,
    ) -> None:
        """``$anyOf: [alt, ...]`` on one value: each alternative a literal, operators or (messages) a subset;
        one condition that holds when any alternative holds."""
        if alternative is None:
            self.site.error(ops, "$anyOf", f"{path}: $anyOf is not available here")
            return
        if not isinstance(operand, list) or not operand:
            self.site.error(
                ops,
                "$anyOf",
                f"{path}: expected a list of alternatives (values or operators), got {show(operand)}",
            )
            return
        metadata = out is self.metadata_leaves
        groups: list[tuple[_Leaf, ...]] = []
        for i, alt in enumerate(operand):
            compiler = _Compiler(self.site)
            alternative(alt, f"{path}[{i}]", compiler)
            groups.append(tuple(compiler.metadata_leaves if metadata else compiler.request))
        run = _metadata_failures if metadata else _request_failures
        total = tuple(groups)

        def test(present: bool, root: Any) -> str | None:
            results = []
            for leaves in total:
                missed = run(leaves, root)
                if not missed:
                    return None
                results.append(MatchResult(False, 0, len(leaves), tuple(missed)))
            return f"{label}: " + (_any_of(results) or "")

        out.append(_Leaf((), None, test, whole=True))


def _map_key_text(field: FieldDescriptor, key: Any, path: str) -> str:
    k = map_key(field, key, path)
    if isinstance(k, bool):
        return "true" if k else "false"
    return str(k)


# --------------------------------------------------------------------------------------------------------
# tests: each returns None when the condition holds, else the failure text


def _equal(kind: _Kind, expected: Any, label: str) -> Test:
    want = f"{label}: expected {_show_as(kind, expected)}, got "

    def test(present: bool, value: Any) -> str | None:
        if value == expected:
            return None
        return want + (_show_as(kind, value) if present else "nothing")

    return test


def _operator(kind: _Kind, op: str, operand: Any, label: str) -> Test:
    """Compiles one operator; raises ConversionError (message only) for an unusable operand."""
    if op == "$eq":
        return _equal(kind, kind.literal(operand), label)
    if op == "$ne":
        unwanted = kind.literal(operand)
        want = f"{label}: expected not {_show_as(kind, unwanted)}, got "

        def ne(present: bool, value: Any) -> str | None:
            return None if value != unwanted else want + (_show_as(kind, value) if present else "nothing")

        return ne
    if op == "$in":
        if not isinstance(operand, list):
            raise ConversionError("", f"expected a list of values, got {show(operand)}")
        choices = [kind.literal(v) for v in operand]
        want = f"{label}: expected one of {_show_as(kind, choices)}, got "

        def in_(present: bool, value: Any) -> str | None:
            return None if value in choices else want + (_show_as(kind, value) if present else "nothing")

        return in_
    if op == "$exists":
        if not isinstance(operand, bool):
            raise ConversionError("", f"expected true or false, got {show(operand)}")
        if operand:
            failure = f"{label}: expected to be present, got nothing"
            return lambda present, value: None if present else failure
        absent = f"{label}: expected to be absent, got "
        return lambda present, value: absent + _show_as(kind, value) if present else None
    if op in ("$regex", "$glob"):
        if kind.shape == "list" and kind.item is not None and kind.item.textual:
            return _each(kind, op, operand, label)
        return _regex(kind, operand, label) if op == "$regex" else _glob(kind, operand, label)
    if op == "$contains":
        return _contains(kind, operand, label)
    if op in ("$all", "$unordered"):
        return _multiset(kind, op, operand, label)
    return _order(kind, op, operand, label)


def _each(kind: _Kind, op: str, operand: Any, label: str) -> Test:
    """``$regex`` / ``$glob`` on a repeated field: one pattern that every element matches, or a list of
    patterns that the elements match one by one (as many elements as patterns)."""
    item = kind.item
    assert item is not None
    one = _regex if op == "$regex" else _glob
    if isinstance(operand, list):
        if not operand:
            raise ConversionError("", "expected a pattern or a non-empty list of patterns, got []")
        tests = []
        for i, pattern in enumerate(operand):
            try:
                tests.append(one(item, pattern, f"{label}[{i}]"))
            except ConversionError as exc:
                raise ConversionError(f"[{i}]{exc.path}", exc.message) from None
        count = f"{label}: expected {len(tests)} elements, got "

        def pairwise(present: bool, value: Any) -> str | None:
            if not isinstance(value, list) or len(value) != len(tests):
                return count + (_show_as(kind, value) if present else "nothing")
            for test, element in zip(tests, value, strict=True):
                failure = test(True, element)
                if failure is not None:
                    return failure
            return None

        return pairwise
    single = one(item, operand, f"{label}[]")

    def every(present: bool, value: Any) -> str | None:
        for i, element in enumerate(value if isinstance(value, list) else ()):
            failure = single(True, element)
            if failure is not None:
                return failure.replace(f"{label}[]", f"{label}[{i}]", 1)
        return None

    return every


def _multiset_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _multiset(kind: _Kind, op: str, operand: Any, label: str) -> Test:
    """``$all``: every listed element is present (each matched by an element of its own), in any order;
    ``$unordered``: the same elements as listed, as many times each, in any order."""
    if kind.shape != "list" or kind.element is None:
        raise ConversionError("", f"{op} applies to repeated fields, not {kind.name}")
    if not isinstance(operand, list):
        raise ConversionError("", f"expected a list of elements, got {show(operand)}")
    elements = []
    for i, item in enumerate(operand):
        try:
            elements.append(kind.element(item))
        except ConversionError as exc:
            raise ConversionError(f"[{i}]{exc.path}", exc.message) from None
    wanted = collections.Counter(_multiset_key(e) for e in elements)
    exact = op == "$unordered"
    shown = _show_as(kind, elements)
    want = (
        f"{label}: expected {shown} in any order, got "
        if exact
        else f"{label}: expected to contain all of {shown}, got "
    )

    def test(present: bool, value: Any) -> str | None:
        have = collections.Counter(_multiset_key(e) for e in (value if isinstance(value, list) else ()))
        ok = have == wanted if exact else not (wanted - have)
        return None if ok else want + (_show_as(kind, value) if present else "nothing")

    return test


def _regex(kind: _Kind, operand: Any, label: str) -> Test:
    if not kind.textual and kind.shape != "json":
        raise ConversionError("", f"$regex matches text, not {kind.name}")
    if not isinstance(operand, str):
        raise ConversionError("", f"expected a regular expression (text), got {show(operand)}")
    if len(operand) > MAX_REGEX:
        raise ConversionError("", f"regular expression longer than {MAX_REGEX} characters")
    try:
        re.compile(operand)  # Python's own syntax and error messages are what users know
        rx = regex.compile(operand)
    except (re.error, regex.error, ValueError) as exc:
        raise ConversionError("", f"invalid regular expression: {exc}") from None
    search = rx.search
    want = f"{label}: expected to match /{operand}/, got "

    def test(present: bool, value: Any) -> str | None:
        text = _text(value)
        if text is not None:
            try:
                # The regex module (re-compatible syntax) bounds the time a backtracking pattern may take,
                # and releases the GIL while it runs, so one bad pattern cannot stall the server.
                if search(text, 0, MAX_REGEX_INPUT, concurrent=True, timeout=REGEX_TIMEOUT):
                    return None
            except TimeoutError:
                return (
                    f"{label}: matching /{operand}/ took longer than {REGEX_TIMEOUT * 1000:.0f} ms "
                    "(a pattern that backtracks catastrophically?); counted as no match"
                )
        return want + (_show_as(kind, value) if present else "nothing")

    return test


def _glob(kind: _Kind, operand: Any, label: str) -> Test:
    """``$glob``: the whole value matches a shell-style pattern (``*`` and ``?`` stop at ``/``, ``[a-z]``,
    ``[!x]`` or ``[^x]``, ``\\`` escapes), as Go's ``path.Match`` does."""
    if not kind.textual and kind.shape != "json":
        raise ConversionError("", f"$glob matches text, not {kind.name}")
    if not isinstance(operand, str):
        raise ConversionError("", f"expected a glob pattern (text), got {show(operand)}")
    if len(operand) > MAX_REGEX:
        raise ConversionError("", f"glob pattern longer than {MAX_REGEX} characters")
    rx = re.compile(glob_regex(operand), re.DOTALL)
    want = f"{label}: expected to match the glob {show(operand)}, got "

    def test(present: bool, value: Any) -> str | None:
        text = _text(value)
        if text is not None and rx.fullmatch(text):
            return None
        return want + (_show_as(kind, value) if present else "nothing")

    return test


def glob_regex(pattern: str) -> str:
    """A glob pattern as an equivalent regular expression; ConversionError for a malformed class."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i >= n:
                raise ConversionError("", "the glob pattern ends with a lone backslash")
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "[":
            j = i
            negate = j < n and pattern[j] in "!^"
            if negate:
                j += 1
            body: list[str] = []
            start = j
            while j < n and (pattern[j] != "]" or j == start):
                ch = pattern[j]
                if ch == "\\" and j + 1 < n:
                    body.append(re.escape(pattern[j + 1]))
                    j += 2
                    continue
                body.append(
                    "\\-"
                    if ch == "-" and (j == start or pattern[j + 1 : j + 2] == "]")
                    else ("-" if ch == "-" else re.escape(ch))
                )
                j += 1
            if j >= n:
                raise ConversionError("", f"unclosed [ in the glob pattern {show(pattern)}")
            out.append(("[^" if negate else "[") + "".join(body) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _contains(kind: _Kind, operand: Any, label: str) -> Test:
    want = f"{label}: expected to contain {show(operand)}, got "
    if kind.shape == "list":
        assert kind.element is not None
        element = kind.element(operand)
        want = f"{label}: expected to contain {_show_as(kind, element)}, got "

        def in_list(present: bool, value: Any) -> str | None:
            return None if element in value else want + (_show_as(kind, value) if present else "nothing")

        return in_list
    if kind.shape == "map":
        if not isinstance(operand, (str, int)) or isinstance(operand, bool):
            raise ConversionError("", f"expected a map key, got {show(operand)}")
        key = str(operand)

        def has_key(present: bool, value: Any) -> str | None:
            return None if key in value else want + (_show_as(kind, value) if present else "nothing")

        return has_key
    if kind.order == "string" or kind.shape == "json":
        if not isinstance(operand, str):
            raise ConversionError("", f"expected text to look for, got {show(operand)}")

        def substring(present: bool, value: Any) -> str | None:
            if isinstance(value, str) and operand in value:
                return None
            if kind.shape == "json" and isinstance(value, list) and operand in value:
                return None
            return want + (_show_as(kind, value) if present else "nothing")

        return substring
    raise ConversionError("", f"$contains applies to repeated fields, maps and strings, not {kind.name}")


def _order(kind: _Kind, op: str, operand: Any, label: str) -> Test:
    compare = _ORDER_TESTS[op]
    symbol = _ORDER_SYMBOLS[op]
    order = kind.order
    if kind.shape == "json":
        order = "string" if isinstance(operand, str) else "float"
    if order is None:
        raise ConversionError("", f"{op} compares numbers, text, timestamps and durations, not {kind.name}")
    number: Callable[[Any], Any]
    if order in ("int", "float") or (order == "string" and _is_number(operand)):
        if not _is_number(operand) and not (order == "int" and _is_int_text(operand)):
            raise ConversionError("", f"expected a number, got {show(operand)}")
        bound: Any = int(operand) if isinstance(operand, str) else operand
        number = _as_number
    elif order == "string":
        if not isinstance(operand, str):
            raise ConversionError("", f"expected text or a number, got {show(operand)}")
        bound = operand
        number = _as_str
    elif order == "time":
        bound = _timestamp_nanos(operand)
        number = _time_nanos
    else:
        bound = _duration_nanos(operand)
        number = _dur_nanos
    want = f"{label}: expected {symbol} {show(operand)}, got "

    def test(present: bool, value: Any) -> str | None:
        actual = number(value)
        try:
            if actual is not None and compare(actual, bound):
                return None
        except TypeError:
            pass
        # the value compared is shown, defaults included: "expected > 0, got 0"
        return want + (_show_as(kind, value) if present or value is not None else "nothing")

    return test


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int_text(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)  # int64 arrives as text; exact, unlike float
        except ValueError:
            try:
                return float(value)  # "NaN", "Infinity", "1.5"
            except ValueError:
                return None
    return None


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _timestamp_nanos(operand: Any) -> int:
    ts = timestamp_pb2.Timestamp()
    try:
        if isinstance(operand, _dt.datetime):
            ts.FromDatetime(operand if operand.tzinfo else operand.replace(tzinfo=_dt.timezone.utc))
        elif isinstance(operand, str):
            ts.FromJsonString(operand)
        else:
            raise ValueError
    except ValueError:
        raise ConversionError(
            "", f'expected an RFC 3339 timestamp such as "2024-05-01T12:00:00Z", got {show(operand)}'
        ) from None
    return int(ts.ToNanoseconds())


def _duration_nanos(operand: Any) -> int:
    if _is_number(operand):
        return round(operand * 1e9)
    d = duration_pb2.Duration()
    try:
        d.FromJsonString(operand)
    except (ValueError, TypeError, AttributeError):
        raise ConversionError("", f'expected a duration such as "1.5s", got {show(operand)}') from None
    return int(d.ToNanoseconds())


def _time_nanos(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromJsonString(value)
    except ValueError:
        return None
    return int(ts.ToNanoseconds())


def _dur_nanos(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    d = duration_pb2.Duration()
    try:
        d.FromJsonString(value)
    except ValueError:
        return None
    return int(d.ToNanoseconds())
