"""Answers as strategies: each kind of answer a step gives (a reply, a stream, an error status, a fault,
an answer per incoming message) is one small object that knows how to emit itself.

An answer orchestrates; the :class:`Exchange` it is handed (the engine's per-call object) does the mechanics
of the wire: waiting, sending metadata, rendering, size checks, journaling. So a step feature is added once,
here, and reaches every RPC kind, and a fixed reply's precomputed :class:`Plan` is derived from the same
answer object, never coded a second time.

Built once per step at load (``Rule.answers``); nothing here parses text per call.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from virtsvc.scenarios.model import Call, Delay, Fault, Step, TextTemplate

__all__ = [
    "Answer",
    "EachRequest",
    "Exchange",
    "Fail",
    "FaultAnswer",
    "Metadata",
    "Passthrough",
    "Plan",
    "Reply",
    "Stream",
    "answer_for",
    "answer_message",
    "metadata_value",
]

Metadata = tuple[tuple[str, "str | bytes"], ...]


def metadata_value(key: str, text: str) -> str | bytes:
    """A metadata value as sent: ``-bin`` keys are written in scenarios as base64 (padding optional)."""
    if key.endswith("-bin"):
        return base64.b64decode(text + "=" * (-len(text) % 4))
    return text


@dataclass(frozen=True, slots=True)
class Plan:
    """A fixed answer as plain data, decided once per rule at load: the reply's bytes and the metadata sent
    with it. The pipeline runs it as it runs any answer (admitted, counted, journaled, finished once) but
    without choosing, rendering or parsing more than the check that the request is valid."""

    reply: bytes
    headers: Metadata = ()
    trailers: Metadata = ()


class Exchange(Protocol):
    """What an answer can do to its call: the engine's per-call object implements it."""

    @property
    def call(self) -> Call: ...

    def wait(self, delay: Delay) -> None:
        """Holds the answer for the delay sampled for this call (ends early if the call does)."""

    def fault(self, fault: Fault) -> None:
        """Ends the call abnormally (never returns)."""

    def headers(self, step: Step, call: Call, index: int) -> None:
        """Renders and sends the step's initial metadata."""

    def trailers(self, step: Step, call: Call, index: int) -> None:
        """Renders and sets the step's trailing metadata."""

    def body(self, step: Step, call: Call, index: int) -> bytes:
        """The step's reply rendered, checked against the size limit and journaled as sent."""
        ...

    def sent(self, raw: bytes) -> bytes:
        """A reply about to be sent as it is: size-checked and journaled."""
        ...

    def fail(self, step: Step, call: Call, index: int) -> None:
        """Ends the call with the step's error status, its details and trailers (never returns)."""

    def incoming(self) -> Iterator[tuple[Call, int]]:
        """Each incoming message of the stream as a call of its own, with its position."""
        ...

    def drain(self) -> None:
        """Reads what the client still sends before the final status, as a real server would."""

    def hold(self) -> Iterator[bytes]:
        """Holds the stream open and sends what the test pushes, until the test (or the session's end,
        the server's stop, the client) ends it; a bidi client's messages are read meanwhile."""
        ...

    def forward(self, upstream: str) -> Iterator[bytes]:
        """Forwards the call to the upstream and relays its headers, replies, trailers and status."""
        ...

    def forward_single(self, upstream: str) -> bytes:
        """``forward`` for unary and client-streaming calls: the one reply."""
        ...


class Answer(Protocol):
    """One step's answer: ``single`` for unary and client-streaming methods, ``stream`` for the others."""

    @property
    def step(self) -> Step: ...

    def single(self, ex: Exchange, index: int) -> bytes: ...

    def stream(self, ex: Exchange, index: int) -> Iterator[bytes]: ...

    def plan(self) -> Plan | None:
        """This answer as fixed data, when nothing in it varies per call or takes time."""
        ...


@dataclass(frozen=True, slots=True)
class _StepAnswer:
    step: Step

    def _prelude(self, ex: Exchange, index: int) -> None:
        step = self.step
        if step.delay is not None:
            ex.wait(step.delay)
        if step.headers:
            ex.headers(step, ex.call, index)

    def _ending(self, ex: Exchange, index: int) -> None:
        step = self.step
        if step.status is not None and not step.status.ok:
            ex.fail(step, ex.call, index)
        if step.trailers:
            ex.trailers(step, ex.call, index)

    def plan(self) -> Plan | None:
        return None


@dataclass(frozen=True, slots=True)
class Reply(_StepAnswer):
    """A reply (or an empty one with status OK); on a streaming method, one message."""

    def single(self, ex: Exchange, index: int) -> bytes:
        self._prelude(ex, index)
        step = self.step
        if step.status is not None and not step.status.ok:
            ex.fail(step, ex.call, index)
        body = ex.body(step, ex.call, index) if step.body is not None else ex.sent(b"")
        if step.trailers:
            ex.trailers(step, ex.call, index)
        return body

    def stream(self, ex: Exchange, index: int) -> Iterator[bytes]:
        self._prelude(ex, index)
        if self.step.body is not None:
            yield ex.body(self.step, ex.call, index)
        ex.drain()
        self._ending(ex, index)

    def plan(self) -> Plan | None:
        step = self.step
        if step.delay is not None or (step.status is not None and not step.status.ok):
            return None
        body = b"" if step.body is None else step.body.static
        headers = _static(step.headers)
        trailers = _static(step.trailers)
        if body is None or headers is None or trailers is None:
            return None
        return Plan(body, headers, trailers)


@dataclass(frozen=True, slots=True)
class Fail(_StepAnswer):
    """An error status, with its details and trailers."""

    def single(self, ex: Exchange, index: int) -> bytes:
        self._prelude(ex, index)
        ex.fail(self.step, ex.call, index)
        raise AssertionError("unreachable")  # pragma: no cover - fail raises

    def stream(self, ex: Exchange, index: int) -> Iterator[bytes]:
        self._prelude(ex, index)
        ex.drain()
        ex.fail(self.step, ex.call, index)
        yield b""  # pragma: no cover - fail raises


@dataclass(frozen=True, slots=True)
class FaultAnswer(_StepAnswer):
    """A fault (drop, garbage, reset), after the step's delay."""

    def single(self, ex: Exchange, index: int) -> bytes:
        self._emit(ex)
        raise AssertionError("unreachable")  # pragma: no cover - a fault raises

    def stream(self, ex: Exchange, index: int) -> Iterator[bytes]:
        self._emit(ex)
        yield b""  # pragma: no cover - a fault raises

    def _emit(self, ex: Exchange) -> None:
        step = self.step
        if step.delay is not None:
            ex.wait(step.delay)
        assert step.fault is not None
        ex.fault(step.fault)


@dataclass(frozen=True, slots=True)
class Stream(_StepAnswer):
    """Messages in order, each with its own delay or fault, then the final status; or, for a stream held
    open (``step.open``), then what the test pushes until it ends the call."""

    def single(self, ex: Exchange, index: int) -> bytes:  # pragma: no cover - the loader refuses it
        raise TypeError("a stream answers streaming methods only")

    def stream(self, ex: Exchange, index: int) -> Iterator[bytes]:
        self._prelude(ex, index)
        items: Sequence[Step] = self.step.stream or ()
        call = ex.call
        for i, item in enumerate(items):
            if item.delay is not None:
                ex.wait(item.delay)
            if item.fault is not None:
                ex.fault(item.fault)
            if item.body is not None:
                yield ex.body(item, call, i)
        if self.step.open:
            yield from ex.hold()
        else:
            ex.drain()
        self._ending(ex, index)


@dataclass(frozen=True, slots=True)
class EachRequest(_StepAnswer):
    """A bidi answer: every incoming message answered by the ``each_request`` step, with its position."""

    def single(self, ex: Exchange, index: int) -> bytes:  # pragma: no cover - the loader refuses it
        raise TypeError("each_request answers bidi methods only")

    def stream(self, ex: Exchange, index: int) -> Iterator[bytes]:
        self._prelude(ex, index)
        each = self.step.each_request
        assert each is not None
        for one, position in ex.incoming():
            if each.delay is not None:
                ex.wait(each.delay)
            if each.status is not None and not each.status.ok:
                ex.fail(each, one, position)
            if each.body is not None:
                yield ex.body(each, one, position)
        self._ending(ex, index)


@dataclass(frozen=True, slots=True)
class Passthrough(_StepAnswer):
    """The real service answers: the call is forwarded to the step's upstream (after the step's delay)."""

    def single(self, ex: Exchange, index: int) -> bytes:
        if self.step.delay is not None:
            ex.wait(self.step.delay)
        assert self.step.passthrough is not None
        return ex.forward_single(self.step.passthrough)

    def stream(self, ex: Exchange, index: int) -> Iterator[bytes]:
        if self.step.delay is not None:
            ex.wait(self.step.delay)
        assert self.step.passthrough is not None
        yield from ex.forward(self.step.passthrough)


def answer_message(step: Step, ex: Exchange, call: Call, index: int) -> Iterator[bytes]:
    """A per-message rule's answer to message ``index`` of a bidi call: its reply, its stream's messages,
    ``replies[index]``, or none; then its error status, which ends the call."""
    if step.delay is not None:
        ex.wait(step.delay)
    if step.replies is not None:
        yield ex.body(step.replies[index], call, index)
    elif step.stream is not None:
        for item in step.stream:
            if item.delay is not None:
                ex.wait(item.delay)
            if item.fault is not None:
                ex.fault(item.fault)
            if item.body is not None:
                yield ex.body(item, call, index)
    elif step.body is not None:
        yield ex.body(step, call, index)
    if step.status is not None and not step.status.ok:
        ex.fail(step, call, index)


def answer_for(step: Step) -> Answer:
    """The answer strategy of a compiled step (chosen once, at load)."""
    if step.passthrough is not None:
        return Passthrough(step)
    if step.fault is not None:
        return FaultAnswer(step)
    if step.each_request is not None:
        return EachRequest(step)
    if step.stream is not None:
        return Stream(step)
    if step.status is not None and not step.status.ok and step.body is None:
        return Fail(step)
    return Reply(step)


def _static(pairs: Sequence[tuple[str, TextTemplate]]) -> Metadata | None:
    out = []
    for key, template in pairs:
        if template.static is None:
            return None
        out.append((key, metadata_value(key, template.static)))
    return tuple(out)
