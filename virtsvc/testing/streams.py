"""The streams a test drives: handles on the calls a rule holds open (``stream: [..., {open: true}]``).

``virtual_service.streams(method)`` returns :class:`OpenStream` handles. In-process, they drive the
server's own registry of held streams; against a sidecar, its admin API (``ListStreams``, ``PushMessage``,
``EndStream``). Either way a pushed message is validated against the method's output type before it is
queued (a bad field raises ``ConversionError`` naming it and the closest one) and journaled as it is sent.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from virtsvc.errors import ConversionError, StreamEnded, VirtsvcError

if TYPE_CHECKING:
    from virtsvc.server.virtual_server import VirtualServer

__all__ = ["LocalStreams", "OpenStream", "RemoteStreams", "StreamDriver", "status_code"]

_SLICE = 4.0  # seconds a ListStreams may wait, well inside the admin client's deadline (10 s by default)


class StreamDriver(Protocol):
    """How handles reach the streams: the server's registry in this process, or its admin API."""

    def listed(self, session: str, method: str, at_least: int, timeout: float) -> list[OpenStream]: ...

    def send(self, stream_id: str, message: Any) -> None: ...

    def end(self, stream_id: str, code: grpc.StatusCode, message: str) -> None: ...


@dataclass(frozen=True)
class OpenStream:
    """One call held open for the test: ``.send(message)``, ``.fail(code, message)``, ``.close()``.

    ``sent`` and ``received`` are the counts when the handle was made (``virtual_service.streams`` again
    for fresh ones). Every method returns at once: what it queues reaches the client in order.
    """

    id: str
    method: str
    rule: str  # "file:line" of the rule holding it open
    scenario: str
    session: str
    _driver: StreamDriver = field(repr=False, compare=False)
    sent: int = 0  # messages pushed so far
    received: int = 0  # messages the client sent while it was held (bidi)

    def send(self, message: Mapping[str, Any] | Message) -> None:
        """Sends one message: proto3 JSON (proto or JSON field names) or a message of the output type."""
        __tracebackhide__ = True
        self._driver.send(self.id, message)

    def fail(self, code: str | int | grpc.StatusCode, message: str = "") -> None:
        """Ends the call with a status, after the messages sent before."""
        __tracebackhide__ = True
        self._driver.end(self.id, status_code(code), message)

    def close(self) -> None:
        """Ends the call with OK, after the messages sent before."""
        __tracebackhide__ = True
        self._driver.end(self.id, grpc.StatusCode.OK, "")


def status_code(code: str | int | grpc.StatusCode) -> grpc.StatusCode:
    """A status code from its name, number or enum member; ValueError naming the valid names."""
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int) and not isinstance(code, bool):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member
    elif isinstance(code, str) and code.strip().upper() in grpc.StatusCode.__members__:
        return grpc.StatusCode[code.strip().upper()]
    raise ValueError(
        f"{code!r} is not a status code: give a name ({', '.join(grpc.StatusCode.__members__)}), a number or "
        "a grpc.StatusCode"
    )


class LocalStreams:
    """Handles on the held streams of an in-process server."""

    def __init__(self, server: VirtualServer) -> None:
        self._streams = server.dispatcher.streams

    def listed(self, session: str, method: str, at_least: int, timeout: float) -> list[OpenStream]:
        found = self._streams.wait(None, session, method, at_least, timeout)
        return [
            OpenStream(s.id, s.method, s.rule, s.scenario, s.session, self, s.sent, s.received) for s in found
        ]

    def send(self, stream_id: str, message: Any) -> None:
        self._get(stream_id).send(message)

    def end(self, stream_id: str, code: grpc.StatusCode, message: str) -> None:
        self._get(stream_id).fail(code, message)

    def _get(self, stream_id: str) -> Any:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamEnded(f"the stream {stream_id} is no longer open (it has ended)")
        return stream


class RemoteStreams:
    """Handles on the held streams of a sidecar, through its admin API. ``relocate`` maps the places of
    the rules in the text sent to the server back to the test's lines."""

    def __init__(self, admin: Callable[[], Any], address: str, relocate: Callable[[str, str], str]) -> None:
        self._admin = admin
        self._address = address
        self._relocate = relocate

    def listed(self, session: str, method: str, at_least: int, timeout: float) -> list[OpenStream]:
        # Asked in slices, so that no ListStreams outlasts the admin client's own deadline per call.
        deadline = time.monotonic() + timeout
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            wait = datetime.timedelta(seconds=min(left, _SLICE))
            reply = self._call(
                "ListStreams", session=session, method=method, min_count=at_least, timeout=wait
            )
            if len(reply.streams) >= at_least or left <= _SLICE:
                break
        return [
            OpenStream(
                s.id,
                s.method,
                self._relocate(session, s.rule),
                s.scenario,
                s.session,
                self,
                s.sent,
                s.received,
            )
            for s in reply.streams
        ]

    def send(self, stream_id: str, message: Any) -> None:
        from google.protobuf import struct_pb2

        if isinstance(message, Message):
            message = json_format.MessageToDict(message, preserving_proto_field_name=True)
        body = struct_pb2.Struct()
        try:
            body.update(message)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConversionError(
                "message", f"expected a mapping (proto3 JSON), got {message!r}: {exc}"
            ) from None
        self._call("PushMessage", id=stream_id, message=body)

    def end(self, stream_id: str, code: grpc.StatusCode, message: str) -> None:
        self._call("EndStream", id=stream_id, code=code.name, message=message)

    def _call(self, method: str, /, **fields: Any) -> Any:
        try:
            return self._admin().call(method, **fields)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and method == "PushMessage":
                raise ConversionError("", details) from None
            if exc.code() == grpc.StatusCode.NOT_FOUND and method != "ListStreams":
                raise StreamEnded(details) from None
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise ValueError(details) from None
            raise VirtsvcError(
                f"the virtual server at {self._address} refused {method}: {exc.code().name}: {details}"
            ) from None
