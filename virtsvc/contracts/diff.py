"""Breaking changes between two versions of the contracts, in the spirit of ``buf breaking``.

Compares two catalogs element by element: services and methods (removed, streaming kinds, input and output
types), messages and their fields (removed, renamed, renumbered, retyped, relabelled, moved between oneofs)
and enums (removed, values removed, renamed or renumbered). Fields and enum values are matched by number,
as the wire matches them; a field that keeps its name under a new number is reported as renumbered.
Additions are not breaking. Each change names its element the way protobuf does
(``bank.v1.Account.owner``; methods as ``pkg.Service/Method``) and carries the keys
(:attr:`Change.keys`) by which the scenarios stage finds the rules it breaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from google.protobuf import descriptor_pb2

from virtsvc import _text
from virtsvc.contracts.catalog import Catalog
from virtsvc.contracts.kinds import method_kind
from virtsvc.errors import ConfigError

__all__ = ["Change", "diff_catalogs", "load_tree"]

_FD: TypeAlias = descriptor_pb2.FieldDescriptorProto
# ("method", "pkg.Svc/M"), ("message", "pkg.Msg"), ("field", "pkg.Msg", "name"), ("enum_value", "pkg.E", "V")
Key = tuple[str, ...]


@dataclass(frozen=True)
class Change:
    """One difference: the element, what happened to it, whether it breaks clients, and its keys."""

    element: str
    message: str
    breaking: bool = True
    keys: frozenset[Key] = field(default=frozenset(), compare=False)

    def __str__(self) -> str:
        return f"{self.element}: {self.message}"


def load_tree(path: str | Path, cache_dir: Path | None = None) -> Catalog:
    """A proto tree (a directory, compiled on the fly) or a descriptor set file, as a catalog."""
    path = Path(path)
    if path.is_dir():
        return Catalog.from_protos(path, cache_dir=cache_dir)
    if path.is_file():
        return Catalog.from_file(path)
    raise ConfigError(f"{path}: no such proto directory or descriptor set")


def diff_catalogs(old: Catalog, new: Catalog) -> list[Change]:
    """Every change from ``old`` to ``new``, breaking ones and additions, in element order."""
    a, b = _Model(old.file_set), _Model(new.file_set)
    changes: list[Change] = []
    changes += _services(a, b)
    changes += _messages(a, b)
    changes += _enums(a, b)
    return sorted(changes, key=lambda c: (not c.breaking, c.element, c.message))


# -- a flat model of a descriptor set ----------------------------------------------------------------


@dataclass
class _Method:
    input: str
    output: str
    kind: str


class _Model:
    """Services, messages and enums of a FileDescriptorSet by full name (nested ones flattened)."""

    def __init__(self, file_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.services: dict[str, dict[str, _Method]] = {}
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, dict[int, str]] = {}
        self.parents: dict[str, str] = {}  # a nested type -> the message it is declared in
        self.proto3: set[str] = set()  # messages declared in proto3 files
        self._syntax = ""
        for file in file_set.file:
            prefix = f"{file.package}." if file.package else ""
            self._syntax = file.syntax
            for service in file.service:
                self.services.setdefault(
                    prefix + service.name,
                    {
                        m.name: _Method(
                            m.input_type.lstrip("."),
                            m.output_type.lstrip("."),
                            method_kind(m.client_streaming, m.server_streaming),
                        )
                        for m in service.method
                    },
                )
            self._add(file.message_type, file.enum_type, prefix, None)

    def _add(
        self,
        messages: Iterable[descriptor_pb2.DescriptorProto],
        enums: Iterable[descriptor_pb2.EnumDescriptorProto],
        prefix: str,
        parent: str | None,
    ) -> None:
        for enum in enums:
            name = prefix + enum.name
            self.enums.setdefault(name, {v.number: v.name for v in enum.value})
            if parent is not None:
                self.parents[name] = parent
        for message in messages:
            name = prefix + message.name
            self.messages.setdefault(name, message)
            if self._syntax == "proto3":
                self.proto3.add(name)
            if parent is not None:
                self.parents[name] = parent
            self._add(message.nested_type, message.enum_type, name + ".", name)

    def is_map_entry(self, name: str) -> bool:
        message = self.messages.get(name)
        return message is not None and message.options.map_entry

    def field_type(self, f: _FD) -> str:
        """``string``, ``bank.v1.Owner``, ``map<string, int64>``."""
        if f.type_name:
            name = f.type_name.lstrip(".")
            if f.type == _FD.TYPE_MESSAGE and self.is_map_entry(name):
                entry = {e.name: e for e in self.messages[name].field}
                return f"map<{self.field_type(entry['key'])}, {self.field_type(entry['value'])}>"
            return name
        return _FD.Type.Name(f.type).removeprefix("TYPE_").lower()

    def label(self, message: str, f: _FD) -> str:
        if f.type == _FD.TYPE_MESSAGE and self.is_map_entry(f.type_name.lstrip(".")):
            return "map"
        if f.label == _FD.LABEL_REPEATED:
            return "repeated"
        if f.label == _FD.LABEL_REQUIRED:
            return "required"
        # proto3 leaves singular fields without presence unless they say `optional`
        return "singular" if message in self.proto3 and not f.proto3_optional else "optional"


def _oneof(message: descriptor_pb2.DescriptorProto, f: _FD) -> str | None:
    if f.HasField("oneof_index") and not f.proto3_optional:
        return message.oneof_decl[f.oneof_index].name
    return None


# -- the comparisons ---------------------------------------------------------------------------------


def _renamed_hint(name: str, added: Iterable[str]) -> str:
    close = _text.closest(name, list(added), n=1)
    return f" (renamed to {close[0]}?)" if close else ""


def _services(a: _Model, b: _Model) -> list[Change]:
    out: list[Change] = []
    added = [s for s in b.services if s not in a.services]
    for name, methods in a.services.items():
        keys = frozenset(("method", f"{name}/{m}") for m in methods)
        if name not in b.services:
            out.append(Change(name, "service removed" + _renamed_hint(name, added), keys=keys))
            continue
        theirs = b.services[name]
        new_methods = [m for m in theirs if m not in methods]
        for m, old in methods.items():
            full = f"{name}/{m}"
            key = frozenset({("method", full)})
            new = theirs.get(m)
            if new is None:
                hint = _renamed_hint(m, new_methods)
                out.append(Change(full, "method removed" + hint.replace("to ", f"to {name}/"), keys=key))
                continue
            if old.kind != new.kind:
                out.append(Change(full, f"streaming kind changed from {old.kind} to {new.kind}", keys=key))
            if old.input != new.input:
                out.append(Change(full, f"input type changed from {old.input} to {new.input}", keys=key))
            if old.output != new.output:
                out.append(Change(full, f"output type changed from {old.output} to {new.output}", keys=key))
        out += [Change(f"{name}/{m}", "method added", breaking=False) for m in new_methods]
    out += [Change(s, "service added", breaking=False) for s in added]
    return out


def _messages(a: _Model, b: _Model) -> list[Change]:
    out: list[Change] = []
    for name, message in a.messages.items():
        if message.options.map_entry:
            continue  # reported through its map field
        theirs = b.messages.get(name)
        if theirs is None:
            if a.parents.get(name) not in a.messages or a.parents.get(name) in b.messages:
                out.append(Change(name, "message removed", keys=frozenset({("message", name)})))
            continue
        out += _fields(a, b, name, message, theirs)
    for name, message in b.messages.items():
        if name not in a.messages and not message.options.map_entry:
            out.append(Change(name, "message added", breaking=False))
    return out


def _fields(
    a: _Model,
    b: _Model,
    name: str,
    old: descriptor_pb2.DescriptorProto,
    new: descriptor_pb2.DescriptorProto,
) -> list[Change]:
    out: list[Change] = []
    by_number = {f.number: f for f in new.field}
    by_name = {f.name: f for f in new.field}
    old_numbers = {f.number for f in old.field}
    old_names = {f.name for f in old.field}
    for f in old.field:
        element = f"{name}.{f.name}"
        keys = frozenset({("field", name, f.name)})
        other = by_number.get(f.number)
        if other is None:
            same = by_name.get(f.name)
            if same is not None:
                text = f"field number changed from {f.number} to {same.number}"
                out.append(Change(element, text, keys=keys))
            else:
                out.append(Change(element, "field removed", keys=keys))
            continue
        if other.name != f.name:
            out.append(Change(element, f"field {f.number} renamed to {other.name}", keys=keys))
        old_type, new_type = a.field_type(f), b.field_type(other)
        if old_type != new_type:
            out.append(Change(element, f"type changed from {old_type} to {new_type}", keys=keys))
        old_label, new_label = a.label(name, f), b.label(name, other)
        if old_label != new_label and "map" not in (old_label, new_label):
            out.append(Change(element, f"label changed from {old_label} to {new_label}", keys=keys))
        was, now = _oneof(old, f), _oneof(new, other)
        if was != now:
            if was is None:
                text = f"moved into oneof {now}"
            elif now is None:
                text = f"moved out of oneof {was}"
            else:
                text = f"moved from oneof {was} to oneof {now}"
            out.append(Change(element, text, keys=keys))
    for f in new.field:
        if f.number not in old_numbers and f.name not in old_names:
            out.append(Change(f"{name}.{f.name}", "field added", breaking=False))
    return out


def _enums(a: _Model, b: _Model) -> list[Change]:
    out: list[Change] = []
    for name, values in a.enums.items():
        theirs = b.enums.get(name)
        if theirs is None:
            if a.parents.get(name) not in a.messages or a.parents.get(name) in b.messages:
                out.append(Change(name, "enum removed", keys=_value_keys(name, values)))
            continue
        by_name = {v: n for n, v in theirs.items()}
        for number, value in values.items():
            element = f"{name}.{value}"
            keys = frozenset({("enum_value", name, value)})
            if number not in theirs:
                if value in by_name:
                    text = f"enum value number changed from {number} to {by_name[value]}"
                    out.append(Change(element, text, keys=keys))
                else:
                    out.append(Change(element, "enum value removed", keys=keys))
            elif theirs[number] != value:
                out.append(Change(element, f"enum value {number} renamed to {theirs[number]}", keys=keys))
        for number, value in theirs.items():
            if number not in values and value not in values.values():
                out.append(Change(f"{name}.{value}", "enum value added", breaking=False))
    for name in b.enums:
        if name not in a.enums:
            out.append(Change(name, "enum added", breaking=False))
    return out


def _value_keys(name: str, values: Mapping[int, str]) -> frozenset[Key]:
    return frozenset(("enum_value", name, v) for v in values.values())
