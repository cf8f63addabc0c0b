"""The exceptions virtsvc raises for user mistakes.

Every one of them carries text meant for a person: a located message (``file:line: message``) where there
is a location, never a traceback. The CLI prints ``str(exc)`` and exits non-zero.

    VirtsvcError
    ├── ConfigError        bad [tool.virtsvc] settings, flags or paths
    ├── ProtoError         .proto files that do not compile (one located line per error)
    ├── DescriptorError    a descriptor set that cannot be loaded
    └── ScenarioError      scenario files that do not validate (one located line per problem)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["ConfigError", "DescriptorError", "Problem", "ProtoError", "ScenarioError", "VirtsvcError"]


class VirtsvcError(Exception):
    """Base class of every error virtsvc reports to its user."""


class ConfigError(VirtsvcError):
    """Settings, flags or paths that cannot be used."""


class DescriptorError(VirtsvcError):
    """A descriptor set that cannot be read or resolved."""


class Problem(NamedTuple):
    """One located problem: ``file:line: message`` (line 0 when the whole file is concerned).

    Immutable and ordered by place. A NamedTuple, not a dataclass: ``virtsvc gen`` reports with it, and
    importing ``dataclasses`` (with ``inspect``) was 5% of a gen run.
    """

    file: str
    line: int
    message: str
    column: int = 0

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        return f"{where}: {self.message}"


class _ProblemsError(VirtsvcError):
    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ProtoError(_ProblemsError):
    """``.proto`` files that failed to compile; ``problems`` holds one entry per protoc error."""


class ScenarioError(_ProblemsError):
    """Scenario files or text that failed validation; ``problems`` holds every problem found."""
