"""The exceptions virtsvc raises for user mistakes.

Every one of them carries text meant for a person: a located message (``file:line: message``) where there
is a location, never a traceback. The CLI prints ``str(exc)`` and exits non-zero.

    VirtsvcError
    ├── ConfigError        bad [tool.virtsvc] settings, flags or paths
    ├── ProtoError         .proto files that do not compile (one located line per error)
    ├── DescriptorError    a descriptor set that cannot be loaded
    ├── ScenarioError      scenario files that do not validate (one located line per problem)
    ├── TemplateError      a reply, status or metadata template that failed while rendering
    ├── ConversionError    a value that does not fit its field (also a ValueError)
    ├── StreamEnded        a push to a stream held open that has ended meanwhile
    └── Refusal            a call or admin request answered with a gRPC status and a reason
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from virtsvc import _text

if TYPE_CHECKING:
    from grpc import StatusCode

__all__ = [
    "ConfigError",
    "ConversionError",
    "DescriptorError",
    "Problem",
    "ProtoError",
    "Refusal",
    "RuleFailure",
    "ScenarioError",
    "StreamEnded",
    "TemplateError",
    "VirtsvcError",
]


class VirtsvcError(Exception):
    """Base class of every error virtsvc reports to its user."""


class ConfigError(VirtsvcError):
    """Settings, flags or paths that cannot be used."""


class DescriptorError(VirtsvcError):
    """A descriptor set that cannot be read or resolved."""


class StreamEnded(VirtsvcError):
    """A push (send, fail, close) to a stream held open that has ended: ``str()`` says how it ended."""


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


class TemplateError(VirtsvcError):
    """A template that failed to render; the message starts with the template's path (``reply.qty: ...``)."""


class ConversionError(VirtsvcError, ValueError):
    """A value that does not fit its field; ``str()`` is ``path: message``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class Refusal(VirtsvcError):
    """A call or admin request refused with a gRPC status ``code`` (a ``grpc.StatusCode``) and a message for
    a person: raised by the router, the pipeline and the admin service, answered as that status."""

    def __init__(
        self,
        code: StatusCode,
        message: str,
        *,
        near_miss: bool = False,
        details: tuple[bytes, ...] = (),
        report: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.near_miss = near_miss  # no rule answered: the message explains why (routing, no match)
        self.details = details  # serialised google.protobuf.Any, sent as the status's rich details
        self.report = report  # the near-miss report, when the message is a scenario's own (``unmatched:``)


class RuleFailure(VirtsvcError):
    """A rule's own machinery (its matcher, a template) raised what it never should: a bug, answered as
    INTERNAL naming the rule rather than as an anonymous UNKNOWN."""

    def __init__(self, rule: Any, cause: BaseException) -> None:
        super().__init__(f"the rule at {rule.location} failed unexpectedly: {_text.describe(cause)}")
        self.rule = rule
        self.cause = cause
