"""One recorded call, whatever recorded it: the neutral form rules are made from.

From an in-process journal :class:`~virtsvc.engine.journal.Entry` (``virtsvc record``) or from the admin
API's ``JournalEntry`` (``virtsvc journal export --as-scenario``): messages in proto3 JSON (JSON names), the
metadata sent back, the final status with its details, and the call's duration.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2, json_format, symbol_database

if TYPE_CHECKING:
    from virtsvc.engine.journal import Entry

__all__ = ["Interaction", "detail_json", "text_metadata"]


@dataclass
class Interaction:
    """A call and its answer, as data."""

    method: str  # pkg.Service/Method
    kind: str  # unary | server_streaming | client_streaming | bidi_streaming
    requests: list[dict[str, Any]] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    code: str = "OK"
    message: str = ""
    details: list[dict[str, Any]] = field(default_factory=list)
    duration: float = 0.0  # seconds

    @classmethod
    def from_entry(cls, entry: Entry) -> Interaction:
        """From a journal entry of this process."""
        pool = entry.spec.input.file.pool
        return _plain(
            cls(
                method=entry.method,
                kind=entry.spec.kind,
                requests=entry.requests(),
                replies=entry.replies(),
                headers=text_metadata(entry.headers),
                trailers=text_metadata(entry.trailers),
                code=entry.code.name,
                message=entry.message,
                details=[detail_json(raw, pool) for raw in entry.details],
                duration=entry.duration,
            )
        )

    @classmethod
    def from_journal_entry(cls, data: dict[str, Any]) -> Interaction:
        """From the admin API's JournalEntry, as proto3 JSON (``json_format.MessageToDict``)."""
        duration = str(data.get("duration", "0s")).removesuffix("s")
        data = _integral(data)
        return _plain(
            cls(
                method=data.get("method", ""),
                kind=data.get("kind", "unary"),
                requests=list(data.get("requests", [])),
                replies=list(data.get("replies", [])),
                headers=dict(data.get("headers", {})),
                trailers=dict(data.get("trailers", {})),
                code=data.get("code", "OK") or "OK",
                message=data.get("message", ""),
                details=list(data.get("details", [])),
                duration=float(duration or 0),
            )
        )


def _integral(value: Any) -> Any:
    """google.protobuf.Struct holds every number as a double: 3.0 back to 3, as the message had it."""
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _plain(item: Interaction) -> Interaction:
    """The interaction with plain JSON data only (protobuf's dicts may be OrderedDicts or Struct views)."""
    for name in ("requests", "replies", "headers", "trailers", "details"):
        setattr(item, name, json.loads(json.dumps(getattr(item, name), default=str)))
    return item


def text_metadata(pairs: Any) -> dict[str, str]:
    """Metadata as scenario files write it: ``-bin`` values in base64 (unpadded, as gRPC's text forms)."""
    out: dict[str, str] = {}
    for key, value in pairs:
        out[key] = base64.b64encode(value).decode().rstrip("=") if isinstance(value, bytes) else value
    return out


def detail_json(raw: bytes, pool: Any) -> dict[str, Any]:
    detail = any_pb2.Any.FromString(raw)
    for candidate in (pool, symbol_database.Default().pool):
        try:
            return json_format.MessageToDict(detail, descriptor_pool=candidate)
        except (TypeError, KeyError, json_format.Error):
            continue
    return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode()}
