"""What never reaches a recorded file: secrets in headers and in message fields.

By default ``authorization``, cookies and API-key-like headers (names with key, token, secret, password,
credential or session in them) are redacted; ``--redact NAME`` adds a header, or a field path under
``request.`` or ``reply.`` (``reply.token``, ``request.card.number``; proto or JSON field names).

A redacted header keeps its name with the value ``REDACTED``. A redacted reply field that is text becomes
``REDACTED`` (other kinds are dropped); a redacted request field is dropped from the matcher, so the recorded
rule still answers the call whatever the secret was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REDACTED", "Redaction"]

REDACTED = "REDACTED"
DEFAULT_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_SECRET_LIKE = re.compile(r"api[-_]?key|key$|token|secret|passw(or)?d|credential|session|auth")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True)
class Redaction:
    """The headers and field paths to keep out of recorded files."""

    headers: frozenset[str] = DEFAULT_HEADERS
    request_paths: tuple[tuple[str, ...], ...] = ()
    reply_paths: tuple[tuple[str, ...], ...] = ()
    names: tuple[str, ...] = field(default=())

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Redaction:
        """The defaults plus ``--redact`` names: ``request.``/``reply.``/``response.`` paths, else headers."""
        headers = set(DEFAULT_HEADERS)
        request: list[tuple[str, ...]] = []
        reply: list[tuple[str, ...]] = []
        given = tuple(names)
        for name in given:
            head, _, rest = name.partition(".")
            if rest and head == "request":
                request.append(tuple(rest.split(".")))
            elif rest and head in ("reply", "response"):
                reply.append(tuple(rest.split(".")))
            else:
                headers.add(name.lower())
        return cls(frozenset(headers), tuple(request), tuple(reply), given)

    def header(self, name: str) -> bool:
        name = name.lower()
        return name in self.headers or bool(_SECRET_LIKE.search(name))

    def metadata(self, pairs: dict[str, str]) -> dict[str, str]:
        return {k: (REDACTED if self.header(k) else v) for k, v in pairs.items()}

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        for path in self.request_paths:
            message = _apply(message, path, drop=True)
        return message

    def reply(self, message: dict[str, Any]) -> dict[str, Any]:
        for path in self.reply_paths:
            message = _apply(message, path, drop=False)
        return message


def _apply(message: Any, path: tuple[str, ...], *, drop: bool) -> Any:
    """A copy of ``message`` with the field at ``path`` redacted (in every element of repeated fields)."""
    if isinstance(message, list):
        return [_apply(m, path, drop=drop) for m in message]
    if not isinstance(message, dict) or not path:
        return message
    out = dict(message)
    head, rest = path[0], path[1:]
    for key in {head, _camel(head)}:
        if key not in out:
            continue
        if rest:
            out[key] = _apply(out[key], rest, drop=drop)
        elif drop or not isinstance(out[key], str):
            del out[key]
        else:
            out[key] = REDACTED
    return out
