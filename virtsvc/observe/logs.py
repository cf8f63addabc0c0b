"""The per-call log: one ``rpc`` event for every call, from its journal entry.

Fields: ``scenario``, ``version`` (the scenario's), ``session``, ``method``, ``rule`` (``file:line`` of the
rule that answered) or ``near_miss`` (why none did: the status message), ``code``, ``message`` (when not
OK, unless a near miss), ``delay_ms`` (the simulated delay) and ``duration_ms`` (the whole call).

The events are at debug level: a line per call costs the static reply far more than its metrics may
(README, "Observability"), and a load test would write thousands a second; ``virtsvc serve --log-level
debug`` (``ServeOptions.log_calls``) turns them on. Off, nothing subscribes: a call pays nothing for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from virtsvc import _logs

if TYPE_CHECKING:
    from virtsvc.engine.journal import Entry

__all__ = ["CallLog"]

_OK = grpc.StatusCode.OK


class CallLog:
    """A journal subscriber writing each entry as an ``rpc`` event (logger ``virtsvc.calls``)."""

    def __init__(self, logger: _logs.Logger | None = None) -> None:
        self.log = logger or _logs.get_logger("virtsvc.calls")

    def __call__(self, entry: Entry) -> None:
        code = entry.code
        fields: dict[str, object] = {
            "scenario": entry.scenario,
            "version": entry.scenario_version,
            "session": entry.session,
            "method": entry.method,
        }
        near_miss = entry.near_miss
        if near_miss is not None:
            fields["near_miss"] = near_miss
        else:
            fields["rule"] = entry.rule
        fields["code"] = code.name
        if code is not _OK and near_miss is None:  # a near miss is the status message already
            fields["message"] = entry.message
        fields["delay_ms"] = round(entry.delay * 1000, 3)
        fields["duration_ms"] = round(entry.duration * 1000, 3)
        self.log.debug("rpc", **fields)
