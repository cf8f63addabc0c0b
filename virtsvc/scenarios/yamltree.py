"""YAML (and JSON) loading into located nodes, with guards against hostile input.

Every mapping becomes a ``LocatedDict`` that knows the line of each key, every sequence a ``LocatedList``
that knows the line of each item, so validation can point at the offending key. JSON goes through the same
loader: JSON is YAML. Nothing here raises for bad input: syntax errors, duplicate keys, unsupported tags,
oversized files, deep nesting and alias bombs all become located problems.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from virtsvc.scenarios.located import LocatedDict, LocatedList, Problems

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "check_plain",
    "load_file",
    "load_text",
]

MAX_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 100  # nested mappings and lists; a scenario needs a dozen at most
MAX_NODES = 1_000_000  # values after expanding aliases: stops "billion laughs"

_TAG = "tag:yaml.org,2002:"
_MAP_TAGS = {_TAG + "map", _TAG + "omap"}
_SEQ_TAGS = {_TAG + "seq"}
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null")}


class _Refused(Exception):
    """A document that is not read at all (too deep, too big, recursive): line and message."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    """The safe loader, composing nodes with a nesting guard (the composer recurses per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(
                    mark.line + 1, f"nesting deeper than {MAX_DEPTH} levels; a scenario never needs that much"
                )
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1


def load_file(path: Path, file: str, problems: Problems) -> list[Any]:
    """The documents of a YAML or JSON file; problems are reported against ``file`` (the name as given)."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            problems.add(file, 0, f"file is too large ({size:,} bytes; the limit is 16 MiB)")
            return []
        data = path.read_bytes()
    except OSError as exc:
        problems.add(file, 0, f"cannot read: {exc.strerror or exc}")
        return []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.add(file, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})")
        return []
    return load_text(text, file, problems)


def load_text(text: str, file: str, problems: Problems) -> list[Any]:
    """The non-empty documents of ``text`` as located nodes (documents before a syntax error are kept)."""
    if len(text) > MAX_BYTES:
        problems.add(file, 0, f"text is too large ({len(text):,} characters; the limit is 16 MiB)")
        return []
    text = _json_tabs(text)
    if _CLoader is not None and text.count("[") + text.count("{") <= _C_MAX_BRACKETS:
        fast = Problems()
        docs = _load(text, file, fast, _CLoader)
        if not fast:
            return docs
        # libyaml's messages are terser ("did not find expected ','"): say it the way PyYAML does.
    return _load(text, file, problems, _Loader)


def _load(text: str, file: str, problems: Problems, loader_class: Any) -> list[Any]:
    docs: list[Any] = []
    loader: Any = None
    try:
        loader = loader_class(text)
        for node in _nodes(loader):
            try:
                _measure(node)
                doc = _Builder(file, problems).build(node)
            except _Refused as exc:
                problems.add(file, exc.line, exc.message)
                continue
            if doc is not None:
                docs.append(doc)
    except _Refused as exc:
        problems.add(file, exc.line, exc.message)
    except yaml.MarkedYAMLError as exc:
        problems.add(file, _mark_line(exc), "YAML syntax error: " + _yaml_message(exc))
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        problems.add(file, line, f"character U+{exc.character:04X} is not allowed in YAML text")
    except yaml.YAMLError as exc:
        problems.add(file, 0, f"YAML error: {exc}")
    finally:
        if loader is not None:
            loader.dispose()
    return docs


# libyaml composes recursively in C and crashes the process past some 20,000 nested flow collections
# (seen at 50,000). Fewer brackets than this cannot nest that deep, block nesting in 16 MiB stays under
# 6,000 levels, and _measure still refuses anything nested deeper than MAX_DEPTH.
_C_MAX_BRACKETS = 10_000
_SURROGATE = re.compile("[\ud800-\udfff]")
_CLoader: Any = getattr(yaml, "CSafeLoader", None)


def _nodes(loader: Any) -> Iterator[Node]:
    while loader.check_node():
        node = loader.get_node()
        if node is not None:
            yield node


def _json_tabs(text: str) -> str:
    """Tabs indenting a JSON text: YAML rejects them, JSON allows them (and never inside strings)."""
    if "\t" not in text or text.lstrip()[:1] not in ("{", "["):
        return text
    try:
        json.loads(text)
    except ValueError:
        return text
    return text.replace("\t", " ")


def _mark_line(exc: yaml.MarkedYAMLError) -> int:
    mark = exc.problem_mark or exc.context_mark
    return mark.line + 1 if mark is not None else 0


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    parts = [p for p in (exc.context, exc.problem) if p]
    text = ", ".join(parts) if parts else "cannot parse"
    start, where = exc.context_mark, exc.problem_mark
    if start is not None and where is not None and start.line != where.line:
        text += f" (the construct started on line {start.line + 1})"
    return text


def _measure(root: Node) -> None:
    """Refuses documents whose aliases expand too much, nest too deep or refer to themselves.

    Sizes and depths are memoised per node, so an alias bomb costs its written size, not its expansion.
    """
    if _plain_tree(root):
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            own = 1 if isinstance(node, (MappingNode, SequenceNode)) else 0
            depth[key] = own + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_NODES:
                raise _Refused(
                    node.start_mark.line + 1,
                    f"the document expands to more than {MAX_NODES:,} values (YAML aliases repeating "
                    "aliases?); refusing to load it",
                )
            if depth[key] > MAX_DEPTH:
                raise _Refused(
                    node.start_mark.line + 1,
                    f"nesting deeper than {MAX_DEPTH} levels once aliases are expanded",
                )
            continue
        if key in size:
            continue
        if key in on_path:
            raise _Refused(
                node.start_mark.line + 1, "a YAML alias refers to a mapping or list that contains it"
            )
        on_path.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_path:
                raise _Refused(
                    kid.start_mark.line + 1, "a YAML alias refers to a mapping or list that contains it"
                )
            if id(kid) not in size:
                stack.append((kid, False))


def _plain_tree(root: Node) -> bool:
    """Whether a document is a tree within MAX_NODES and MAX_DEPTH, in one walk without memo tables.

    What almost every document is, and this walk costs a tenth of the memoised one, which was a third of
    loading a scenario file. False as soon as a mapping or list is reached twice (an alias) or a limit is
    passed: the memoised walk then decides, and words its refusal, as before.
    """
    seen: set[int] = set()
    count = 0
    stack: list[tuple[Node, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            return False
        if isinstance(node, ScalarNode):
            continue
        if id(node) in seen or depth == MAX_DEPTH:
            return False
        seen.add(id(node))
        depth += 1
        if isinstance(node, MappingNode):
            for key, value in node.value:
                stack.append((key, depth))
                stack.append((value, depth))
        else:
            stack.extend((kid, depth) for kid in node.value)
    return True


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


class _Builder:
    """Builds located Python values from a measured node tree (depth is bounded, so recursion is safe)."""

    def __init__(self, file: str, problems: Problems) -> None:
        self.file = file
        self.problems = problems
        self.scalars = yaml.SafeLoader("")  # only its scalar constructors are used
        self.built: dict[int, Any] = {}  # aliases share one value, as PyYAML does

    def build(self, node: Node) -> Any:
        key = id(node)
        if key in self.built:
            return self.built[key]
        if isinstance(node, MappingNode):
            value: Any = self._mapping(node)
        elif isinstance(node, SequenceNode):
            value = self._sequence(node)
        else:
            assert isinstance(node, ScalarNode)
            value = self._scalar(node)
        self.built[key] = value
        return value

    def _line(self, node: Node) -> int:
        return int(node.start_mark.line) + 1

    def _mapping(self, node: MappingNode) -> LocatedDict:
        if node.tag not in _MAP_TAGS:
            self._tag_problem(node)
        out = LocatedDict(line=self._line(node))
        merges: list[LocatedDict] = []
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                merges.extend(self._merge_sources(value_node))
                continue
            key = self.build(key_node)
            if isinstance(key, (dict, list)):
                self.problems.add(self.file, self._line(key_node), "a mapping key must be a plain value")
                continue
            line = self._line(key_node)
            if key in out.key_lines:
                self.problems.add(
                    self.file, line, f"duplicate key {_show_key(key)} (first on line {out.key_lines[key]})"
                )
            out[key] = self.build(value_node)
            out.key_lines[key] = line
        # `<<: *base` merges keys the mapping does not set itself; the first merged source wins.
        for source in merges:
            for key, value in source.items():
                if key not in out:
                    out[key] = value
                    out.key_lines[key] = source.key_lines.get(key, out.line)
        return out

    def _merge_sources(self, node: Node) -> list[LocatedDict]:
        items = node.value if isinstance(node, SequenceNode) else [node]
        out = []
        for item in items:
            value = self.build(item)
            if isinstance(value, LocatedDict):
                out.append(value)
            else:
                self.problems.add(self.file, self._line(item), "<< merges a mapping (or a list of mappings)")
        return out

    def _sequence(self, node: SequenceNode) -> LocatedList:
        if node.tag not in _SEQ_TAGS:
            self._tag_problem(node)
        out = LocatedList(line=self._line(node))
        for item in node.value:
            out.append(self.build(item))
            out.item_lines.append(self._line(item))
        return out

    def _scalar(self, node: ScalarNode) -> Any:
        tag = node.tag
        if tag == _TAG + "timestamp":
            return node.value  # proto3 JSON wants the text of a Timestamp, not a datetime
        if tag == _TAG + "binary":
            return "".join(node.value.split())  # proto3 JSON bytes are base64 text already
        if tag not in _SCALAR_TAGS:
            self._tag_problem(node)
            return node.value  # its text: validation goes on without a second, confusing problem
        try:
            value = self.scalars.yaml_constructors[tag](self.scalars, node)
            if isinstance(value, str) and _SURROGATE.search(value):
                # "\ud83d\ude00" (how JSON writers escape an emoji) arrives as two lone surrogates.
                value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return value
        except (ValueError, yaml.YAMLError) as exc:
            reason = str(exc).split(";")[0]
            self.problems.add(
                self.file, self._line(node), f"cannot read the value {node.value[:40]!r}: {reason}"
            )
            return None

    def _tag_problem(self, node: Node) -> None:
        self.problems.add(
            self.file,
            self._line(node),
            f'the YAML tag "{_short_tag(node.tag)}" is not supported here (plain mappings, lists and scalars '
            "only)",
        )


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def _show_key(key: Any) -> str:
    return f'"{key}"' if isinstance(key, str) else repr(key)


def check_plain(value: Any) -> str | None:
    """Why data built in Python cannot be compiled (self-referencing, too deep, too big), or None.

    YAML input is measured while loading; plain dicts and lists from scripts bypass the loader.
    """
    seen = 0
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(value, 1, False)]
    while stack:
        item, level, done = stack.pop()
        if done:
            on_path.discard(id(item))
            continue
        if not isinstance(item, (dict, list, tuple)):
            seen += 1
            continue
        if id(item) in on_path:
            return "the data refers to itself (a dict or list that contains itself)"
        if level > MAX_DEPTH:
            return f"nesting deeper than {MAX_DEPTH} levels"
        seen += 1
        if seen > MAX_NODES:
            return f"more than {MAX_NODES:,} values"
        on_path.add(id(item))
        stack.append((item, level, True))
        children = list(item.items()) if isinstance(item, dict) else list(item)
        for child in children:
            if isinstance(child, tuple) and isinstance(item, dict):
                stack.extend((c, level + 1, False) for c in child)
            else:
                stack.append((child, level + 1, False))
    return None
