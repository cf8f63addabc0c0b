"""Streams held open for the test to drive: a server-streaming or bidi rule whose ``stream`` ends with
``{open: true}`` keeps its call open after its items, and the test decides what is sent and when.

A :class:`HeldStream` is the hand-over point between two threads: the call's serving thread waits on it
(``Exchange.hold`` in the pipeline) and sends what the test put there; the test's thread (the pytest
plugin in-process, the admin API for sidecars) puts messages, a final status or the end. Pushed messages
are validated against the method's output type here, on the test's side, so a bad field is the pusher's
error and never reaches the client.

Streams live in the process whose call holds them: with a shared store (Redis) and several replicas, a
push reaches only the replica serving the call. Ids name their holder (``HOST-PID.K-N``: the host, the
process, the server within it, the stream's number), so a replica that does not hold a stream can say
which one does.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from virtsvc.contracts.catalog import MethodSpec
from virtsvc.errors import ConversionError, Refusal, StreamEnded
from virtsvc.scenarios.fields import fill_message

__all__ = ["HeldStream", "HeldStreams", "encode_pushed", "session_ended_message"]

_PROCESS = f"{socket.gethostname()}-{os.getpid()}"
_REGISTRIES = itertools.count(1)  # a process may serve several servers (tests, tools): each names itself
_ID = re.compile(r"^(?P<holder>.+)-(?P<n>\d+)$")

SEND, FAIL, CLOSE, GONE = "send", "fail", "close", "gone"
Item = tuple[str, Any]


def session_ended_message(scenario: str, session: str, method: str) -> str:
    """What the client of a stream still held open is told when its session ends (reset or expiry)."""
    where = f'session "{session}" of scenario "{scenario}"' if scenario else f'session "{session}"'
    return (
        f"the {where} ended (reset or expired) while {method} was held open for the test to drive; "
        "nothing more will be sent on this stream"
    )


def encode_pushed(spec: MethodSpec, message: Any) -> bytes:
    """A pushed message as the output type's bytes: a message of that type, or its proto3 JSON (proto or
    JSON field names). ConversionError naming the field (and the closest one) when it does not fit."""
    output = spec.output
    if isinstance(message, Message):
        if message.DESCRIPTOR.full_name != output.full_name:
            raise ConversionError(
                "message",
                f"a {message.DESCRIPTOR.full_name} was pushed, but {spec.full_name} sends {output.full_name}",
            )
        return message.SerializeToString()
    msg = spec.output_class()
    fill_message(msg, message, True, "message")
    return msg.SerializeToString()


class HeldStream:
    """One call held open: what the test drives. Thread-safe; every method returns at once."""

    def __init__(
        self,
        stream_id: str,
        scenario: str,
        session: str,
        spec: MethodSpec,
        rule: str,
        on_end: Callable[[], None],
        max_bytes: int,
    ) -> None:
        self.id = stream_id
        self.max_bytes = max_bytes  # the server's message size limit, checked when a message is pushed
        self.scenario = scenario
        self.session = session
        self.spec = spec
        self.rule = rule  # "file:line" of the rule that opened it
        self.started_at = time.time()
        self.sent = 0  # messages pushed (the serving thread counts them as it sends)
        self.received = 0  # messages the client sent while the stream was held (bidi)
        self.ended: str | None = None  # how it ended, once it has
        self._queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._on_end = on_end

    @property
    def method(self) -> str:
        return self.spec.full_name

    def send(self, message: Any) -> None:
        """Queues one message (a message or proto3 JSON), validated now; it is journaled as it is sent."""
        raw = encode_pushed(self.spec, message)
        if len(raw) > self.max_bytes:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the message pushed to {self.method} is {len(raw):,} bytes, over the maximum message size "
                f"of {self.max_bytes:,} bytes; raise it with --max-message-bytes",
            )
        self._put((SEND, raw))

    def fail(self, code: grpc.StatusCode, message: str = "") -> None:
        """Ends the call with a status (after the messages queued before)."""
        if code is grpc.StatusCode.OK:
            self.close()
            return
        self._put((FAIL, (code, message)), ended=f"ended by the test with {code.name}")

    def close(self) -> None:
        """Ends the call with OK (after the messages queued before)."""
        self._put((CLOSE, None), ended="closed by the test")

    def abort(self, code: grpc.StatusCode, message: str, why: str) -> None:
        """Ends the call from the server's side (session ended, server stopping); quiet when it had ended."""
        self._put((FAIL, (code, message)), ended=why, quiet=True)

    def gone(self) -> None:
        """The client went away: wakes the serving thread."""
        self._put((GONE, None), ended="ended by the client", quiet=True)

    def _put(self, item: Item, *, ended: str | None = None, quiet: bool = False) -> None:
        with self._lock:
            if self.ended is not None:
                if quiet:
                    return
                raise StreamEnded(f"the stream {self.id} of {self.method} is no longer open: {self.ended}")
            if ended is not None:
                self.ended = ended
        if ended is not None:
            self._on_end()  # out of the listing at once: a second ListStreams no longer shows it
        self._queue.put(item)

    def next(self, timeout: float) -> Item | None:
        """The next thing to do (for the serving thread), or None when ``timeout`` passed with nothing."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def finished(self, how: str) -> None:
        """The call has ended (whatever ended it): no more pushes."""
        with self._lock:
            if self.ended is None:
                self.ended = how
        self._on_end()


class HeldStreams:
    """The streams held open in this process, by id; waitable, so a test can wait for its call to arrive."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        #: who holds these streams, as their ids say: host, process and server within it
        self.holder = f"{_PROCESS}.{next(_REGISTRIES)}"
        self._streams: dict[str, HeldStream] = {}
        self._changed = threading.Condition()
        self._ids = itertools.count(1)

    def open(self, scenario: str, session: str, spec: MethodSpec, rule: str) -> HeldStream:
        stream_id = f"{self.holder}-{next(self._ids)}"
        stream = HeldStream(
            stream_id, scenario, session, spec, rule, lambda: self._remove(stream_id), self.max_message_bytes
        )
        with self._changed:
            self._streams[stream_id] = stream
            self._changed.notify_all()
        return stream

    def _remove(self, stream_id: str) -> None:
        with self._changed:
            if self._streams.pop(stream_id, None) is not None:
                self._changed.notify_all()

    def get(self, stream_id: str) -> HeldStream | None:
        return self._streams.get(stream_id)

    def listed(
        self, scenario: str | None = None, session: str | None = None, method: str | None = None
    ) -> list[HeldStream]:
        """The open streams (oldest first) of a scenario, session and method (None: any)."""
        return [
            s
            for s in list(self._streams.values())
            if (scenario is None or s.scenario == scenario)
            and (session is None or s.session == session)
            and (method is None or s.method == method)
        ]

    def wait(
        self,
        scenario: str | None,
        session: str | None,
        method: str | None,
        count: int,
        timeout: float,
    ) -> list[HeldStream]:
        """``listed``, once at least ``count`` are open or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.listed(scenario, session, method)
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._changed.wait(left)

    def end_session(self, scenario: str, session: str) -> None:
        """A session was dropped: its streams end with ABORTED, saying so."""
        for stream in self.listed(scenario, session):
            stream.abort(
                grpc.StatusCode.ABORTED,
                session_ended_message(scenario, session, stream.method),
                "its session ended",
            )

    def __iter__(self) -> Iterator[HeldStream]:
        return iter(self.listed())

    def __len__(self) -> int:
        return len(self._streams)

    def not_found_message(self, stream_id: str) -> str:
        """Why ``stream_id`` cannot be driven here: held by another process, ended, or never known."""
        match = _ID.match(stream_id)
        if match and match["holder"] != self.holder:
            return (
                f"the stream {stream_id} is held by another replica or worker ({match['holder']}), "
                f"not by this one ({self.holder}): a stream is driven through the server whose call "
                "holds it; send this call to that server's own address"
            )
        open_ids = [s.id for s in self.listed()]
        listed = ", ".join(open_ids) if open_ids else "none"
        return (
            f'no open stream "{stream_id}" here (it has ended, or never was); open streams: {listed} '
            "(ListStreams lists them)"
        )
