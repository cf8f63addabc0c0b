"""Scenario data that remembers where it was written, and a collector of located problems.

The YAML loader builds ``LocatedDict`` / ``LocatedList`` nodes that know the line of every key and item, so
every validation problem can be reported at the line of the offending key. Data built in Python (scenario
scripts, the pytest plugin) uses plain dicts and lists; ``Site.line`` then falls back to the line of the
call that built the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from virtsvc.errors import Problem, ScenarioError

__all__ = ["LocatedDict", "LocatedList", "Problems", "Site"]


class LocatedDict(dict[Any, Any]):
    """A mapping with the line of itself (``line``) and of each of its keys (``key_lines``)."""

    line: int = 0
    key_lines: dict[Any, int]

    def __init__(self, *args: Any, line: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.line = line
        self.key_lines = {}


class LocatedList(list[Any]):
    """A sequence with the line of itself and of each item."""

    line: int = 0
    item_lines: list[int]

    def __init__(self, *args: Any, line: int = 0) -> None:
        super().__init__(*args)
        self.line = line
        self.item_lines = []


@dataclass
class Problems:
    """Collects every problem of a load, so a user sees them all at once."""

    items: list[Problem] = field(default_factory=list)

    def add(self, file: str, line: int, message: str) -> None:
        self.items.append(Problem(file, line, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise ScenarioError(sorted(set(self.items), key=lambda p: (p.file, p.line, p.message)))


@dataclass
class Site:
    """The file being compiled, a fallback line, and the problem collector."""

    file: str
    problems: Problems
    line: int = 0  # fallback: where the enclosing rule was written

    def line_of(self, node: Any, key: Any = None) -> int:
        """The line of ``node[key]`` (or of ``node`` itself), else the fallback line."""
        if key is not None:
            if isinstance(node, LocatedDict) and key in node.key_lines:
                return node.key_lines[key]
            if isinstance(node, LocatedList) and isinstance(key, int) and key < len(node.item_lines):
                return node.item_lines[key]
        line = getattr(node, "line", 0)
        return line or self.line

    def error(self, node: Any, key: Any, message: str) -> None:
        self.problems.add(self.file, self.line_of(node, key), message)

    def at(self, node: Any) -> Site:
        """A site whose fallback line is ``node``'s own."""
        return Site(self.file, self.problems, getattr(node, "line", 0) or self.line)
