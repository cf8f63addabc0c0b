"""The call pipeline: one per call, whatever answers it.

Every call goes through the same stages, carried by one :class:`Exchange`:

1. **admit** - routed once (scenario and session from its metadata), counted in its session, journal entry
   opened, concurrency limits claimed;
2. **choose** - the router picks the rule and step (conditions, ``times``, sequences);
3. **answer** - the step's answer strategy emits itself through the exchange (``virtsvc.scenarios.answers``);
   a fixed reply is the same stage run from its precomputed :class:`~virtsvc.scenarios.answers.Plan`;
4. **finish** - ``Exchange.finish`` journals the call exactly once, whatever happened, and ``release``
   frees what admission claimed.

Requests and replies cross grpc as raw bytes (no (de)serialisers registered): a fixed reply is sent as the
bytes serialised at load. Every request is parsed once, as it arrives: bytes that are not the method's input
type are answered INVALID_ARGUMENT before any rule runs. Everything that can go wrong is answered with a
status and a message that says why; an unexpected exception inside matching, rendering or a handler is
INTERNAL naming the rule, and journaled. gRPC would turn an exception raised while looking up a handler into
an opaque UNKNOWN, so the lookup here never raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import status_pb2

from virtsvc import _logs, _text
from virtsvc.contracts.catalog import Catalog, MethodSpec
from virtsvc.engine.clock import ClockClosed, VirtualClock, switch
from virtsvc.engine.forward import Upstream, forwarded_metadata
from virtsvc.engine.journal import Entry, Journal, Metadata
from virtsvc.engine.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Gauge,
    InFlight,
    server_busy_message,
    session_busy_message,
)
from virtsvc.engine.observers import CallObserver, Observers
from virtsvc.engine.router import (
    BAGGAGE_SCENARIO,
    BAGGAGE_SESSION,
    NO_SCENARIO,
    SCENARIO_HEADER,
    SESSION_HEADER,
    Choice,
    Router,
    parse_baggage,
)
from virtsvc.engine.store import DEFAULT_SESSION, SessionState
from virtsvc.engine.streams import HeldStream, HeldStreams
from virtsvc.errors import Refusal, RuleFailure, VirtsvcError
from virtsvc.scenarios.answers import Answer, Plan, answer_message, metadata_value
from virtsvc.scenarios.data import session_data
from virtsvc.scenarios.latency import LONGEST, draw
from virtsvc.scenarios.model import Call, CompiledScenario, Delay, Fault, Rule, Step

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Dispatcher",
    "Exchange",
    "current_data",
    "current_session",
    "server_stopping_message",
]

log = _logs.get_logger("virtsvc.calls")

# A truncated varint (field 1, continuation bit set, no next byte): every protobuf parser rejects it,
# whereas some accept a truncated length-delimited field.
GARBAGE = b"\x08\x80"
MAX_JOURNALED_MESSAGES = 100  # per call, so a long stream cannot blow up the journal
_NO_DEADLINE = 1e7  # seconds (about four months): more than this left is a call without a deadline
_DEADLINE_SLACK = 0.1  # seconds: a cancellation this close to the deadline is the deadline
_OK = grpc.StatusCode.OK
_HOLD_POLL = 1.0  # seconds between looks at the session and the server while a stream is held open
_INTERNAL = grpc.StatusCode.INTERNAL

_current: contextvars.ContextVar[SessionState | None] = contextvars.ContextVar(
    "virtsvc_session", default=None
)


# The call a handler is answering, for virtsvc.data() (set beside _current).
_current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar("virtsvc_call", default=None)


def current_session() -> Any:
    """The per-session dict a Python scenario handler may keep state in (``virtsvc.session()``)."""
    session = _current.get()
    if session is None:
        raise RuntimeError("virtsvc.session() is only available inside a scenario handler")
    return session.data


def current_data(collection: str | None = None) -> Any:
    """The session's data collections (``virtsvc.data()``), or one of them (``virtsvc.data("items")``), as a
    Python handler reads and changes them: ``.get(key)``, ``[key]``, iteration, ``.put(record)``,
    ``.remove(key)``. Changes are the session's own; a reset drops them."""
    call = _current_call.get()
    if call is None:
        raise RuntimeError("virtsvc.data() is only available inside a scenario handler")
    view = session_data(call, for_code=True)
    return view if collection is None else view.collection(collection)


class _Ended(Exception):
    """The call has ended (journaled); grpc is told how in ``Exchange._close``."""


class _Cancelled(Exception):
    """The client went away (cancelled, deadline) while we were waiting."""


class _Garbage(Exception):
    """Answer with bytes no parser accepts (the ``garbage`` fault)."""


class HandlerContext:
    """The context handed to Python scenario handlers: grpc's own, plus ``session`` (a per-session dict)."""

    def __init__(self, context: grpc.ServicerContext, session: SessionState) -> None:
        self._context = context
        self.session = session.data
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborted = (code, details)
        self._context.abort(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        self.aborted = (status.code, status.details)
        self._context.abort_with_status(status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class Exchange:
    """One call going through the pipeline: what came in, what was sent, and how it ended.

    ``finish`` journals it exactly once; the ``run_*`` methods turn every way a call can end (an answer,
    a refusal, a fault, a cancellation, an unexpected exception) into one finish and one grpc outcome.
    Implements the ``Exchange`` protocol answers emit themselves through.
    """

    __slots__ = (
        "_admitted",
        "_call",
        "_draws",
        "_finished",
        "_incoming",
        "_observed",
        "_requests",
        "attempt",
        "context",
        "dispatcher",
        "entry",
        "metadata",
        "number",
        "rule",
        "scenario",
        "session",
        "spec",
        "t0",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        spec: MethodSpec,
        context: grpc.ServicerContext,
        requests: list[bytes],
        incoming: Iterator[bytes] | None = None,
    ) -> None:
        self.t0 = time.perf_counter()
        self._incoming = incoming  # the client's stream, for bidi answers that read it
        self.dispatcher = dispatcher
        self.spec = spec
        self.context = context
        self._requests = requests  # raw requests as read: the Call and the entry share the list
        self._call: Call | None = None
        self._admitted = False
        self._finished = False
        self.entry: Entry | None = None
        self.rule: Rule | None = None
        self.scenario: CompiledScenario | None = None
        self.session: SessionState | None = None
        self.metadata: dict[str, str] = {}
        self.number = 0  # the call's 1-based number in its session
        self.attempt = 0  # its number among the calls of its rule, when the rule counts them
        self._draws = 0  # delays drawn so far (a stream draws one per item)
        self._observed: Any = None  # what the observers returned at the start, for their finish

    def _observe(self) -> None:
        """Tells the dispatcher's observers the call has started (only called when there are some)."""
        observers = self.dispatcher.observers
        if observers is not None:
            self._observed = observers, observers.on_start(self)

    # -- 1. admit ------------------------------------------------------------------------------

    def admit(self) -> None:
        """Routes the call, counts it in its session, opens its journal entry and claims the concurrency
        limits (``release`` frees them). A refusal here is journaled under the names the call sent."""
        d = self.dispatcher
        next(d.in_flight.arrived)
        context = self.context
        pairs = context.invocation_metadata()
        metadata = self.metadata = {k: v for k, v in pairs if isinstance(v, str)}
        if "baggage" in metadata:  # W3C: members of several baggage headers combine
            metadata["baggage"] = ",".join(v for k, v in pairs if k == "baggage" and isinstance(v, str))
        if d.observers is not None:
            self._observe()
        gauge = d.gauge
        if gauge is not None and not gauge.enter():
            self._open_unrouted()
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, server_busy_message(gauge.limit))
        try:
            # A unary or server-streaming call has its request: its rule is chosen next, unless a
            # per-session limit refuses it first (a step moved in the look-up would then be lost).
            sure = not self.spec.client_streaming and d.max_concurrency_per_session is None
            compiled, session = d.router.route(
                metadata, calling=True, method=self.spec.full_name if sure else None
            )
        except Refusal:
            self._open_unrouted()
            if gauge is not None:
                gauge.leave()
            raise
        self.number = session.touch()
        self.scenario = compiled
        self.session = session
        entry = self.entry = Entry(
            session.scenario, session.id, self.spec, metadata, time.time(), self._requests
        )
        entry.scenario_version = compiled.version if compiled is not None else None
        if compiled is not None and compiled.clock == "virtual" and session.clock is None:
            try:  # `clock: virtual`: each session of the scenario is switched on its first call
                switch(d.router.store, session.scenario, session.id)
            except Refusal:
                if gauge is not None:
                    gauge.leave()
                raise
        limit = d.max_concurrency_per_session
        if limit is not None and not session.enter(limit):
            if gauge is not None:
                gauge.leave()
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED, session_busy_message(limit, session.scenario, session.id)
            )
        self._admitted = d.limited

    def _open_unrouted(self) -> None:
        """The entry of a call refused before routing: journaled under the names the call sent."""
        metadata = self.metadata
        baggage = parse_baggage(metadata.get("baggage", ""))
        scenario = metadata.get(SCENARIO_HEADER, baggage.get(BAGGAGE_SCENARIO, NO_SCENARIO))
        session_id = metadata.get(SESSION_HEADER, baggage.get(BAGGAGE_SESSION, "")) or DEFAULT_SESSION
        self.entry = Entry(scenario, session_id, self.spec, metadata, time.time(), self._requests)

    def release(self) -> None:
        """Frees what admission claimed (only counted when a limit is set, see ``_admitted``)."""
        self._admitted = False
        d = self.dispatcher
        if d.max_concurrency_per_session is not None and self.session is not None:
            self.session.leave()
        if d.gauge is not None:
            d.gauge.leave()

    # -- 2. choose -----------------------------------------------------------------------------

    @property
    def call(self) -> Call:
        """The call as matchers, templates and handlers see it."""
        call = self._call
        if call is None:
            session = self.session
            assert session is not None
            call = self._call = Call(
                self.spec,
                session.scenario,
                session,
                self.metadata,
                self._requests,
                datasets=self.dispatcher.router.registry.data_of(session.scenario),
            )
        return call

    def candidates(self) -> tuple[Rule, ...]:
        session = self.session
        assert session is not None
        return self.dispatcher.router.candidates(session, session.scenario, self.spec.full_name)

    def choose(self) -> Choice:
        choice = self.dispatcher.router.choose(self.call)
        self.rule = choice.rule
        self.attempt = choice.attempt
        assert self.entry is not None
        self.entry.rule = choice.rule.where
        if choice.refusal is not None:
            raise choice.refusal
        return choice

    def choose_for(self, one: Call) -> Choice:
        """The rule answering one message of a bidi call (``one.position``); the journal names the rule
        that answered the latest message."""
        choice = self.dispatcher.router.choose(one)
        self.rule = choice.rule
        self.attempt = choice.attempt
        assert self.entry is not None
        self.entry.rule = choice.rule.where
        return choice

    def plan(self) -> tuple[Rule, Plan] | None:
        """The fixed plan that answers this call, if the first candidate has one."""
        session = self.session
        assert session is not None
        return self.dispatcher.router.plan(session, session.scenario, self.spec.full_name)

    # -- 3. answer: the primitives answers emit through --------------------------------------------

    def send_headers(self, pairs: Metadata) -> None:
        self.context.send_initial_metadata(pairs)
        assert self.entry is not None
        self.entry.headers = pairs

    def set_trailers(self, pairs: Metadata) -> None:
        self.context.set_trailing_metadata(pairs)
        assert self.entry is not None
        self.entry.trailers = pairs

    def sent(self, raw: bytes) -> bytes:
        """A reply about to be sent: checked against the size limit and journaled."""
        limit = self.dispatcher.max_message_bytes
        if len(raw) > limit:
            where = f" (rule at {self.rule.location})" if self.rule is not None else ""
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the reply to {self.spec.full_name}{where} is {len(raw):,} bytes, over the maximum message "
                f"size of {limit:,} bytes; raise it with --max-message-bytes "
                "(VirtualServer(max_message_bytes=...))",
            )
        replies = self.entry.raw_replies if self.entry is not None else None
        if replies is not None and len(replies) < MAX_JOURNALED_MESSAGES:
            replies.append(raw)
        return raw

    def answer_plan(self, rule: Rule, plan: Plan) -> bytes:
        """A fixed answer: the same primitives as any answer, from data decided at load."""
        self.rule = rule
        assert self.entry is not None
        self.entry.rule = rule.where
        if plan.headers:
            self.send_headers(plan.headers)
        if plan.trailers:
            self.set_trailers(plan.trailers)
        raw = plan.reply
        if len(raw) > self.dispatcher.max_message_bytes:
            return self.sent(raw)  # refuses it
        self.entry.raw_replies.append(raw)
        return raw

    def wait(self, delay: Delay) -> None:
        seconds = self.sample(delay)
        assert self.entry is not None
        self.entry.delay += seconds
        session = self.session
        assert session is not None
        clock = session.clock
        if clock is None:
            self._sleep(seconds)
        else:
            self._hold(clock, seconds)

    def _hold(self, clock: VirtualClock, seconds: float) -> None:
        """Waits until the session's virtual clock has moved ``seconds`` on; the client's deadline and
        cancellation stay real and end the wait as ``_sleep``'s do."""
        context = self.context
        ended = threading.Event()
        if not context.add_callback(ended.set):
            raise _Cancelled
        try:
            reached = clock.hold(self.spec.full_name, seconds, ended, self.dispatcher.stopping)
        except ClockClosed:
            session = self.session
            assert session is not None
            raise Refusal(
                grpc.StatusCode.ABORTED,
                f'session "{session.id}" of scenario "{session.scenario}" was dropped while this call '
                "waited on its virtual clock",
            ) from None
        if not reached or not context.is_active():
            raise _Cancelled

    def sample(self, delay: Delay) -> float:
        """The delay's seconds for this call, times the server's time scale.

        A draw is a hash of (scenario, session, rule, the call's number in the session, the draw's number
        in the call): the same session run again waits the same delays, on every store and process."""
        u = 0.5
        if delay.random:
            session, rule = self.session, self.rule
            assert session is not None
            self._draws += 1
            where = f"{rule.scenario}:{rule.key}" if rule is not None else ""
            u = draw(session.scenario, session.id, where, self.number, self._draws)
        return min(LONGEST, delay.seconds(u, self.attempt or 1) * self.dispatcher.time_scale)

    def _sleep(self, seconds: float | None) -> None:
        """Sleeps, waking at once when the call ends (cancel, deadline, server stop).

        No timer or thread: the worker waits on an Event that grpc sets (through ``add_callback``) when the
        call terminates, so a cancelled delay frees its worker at once.
        """
        context = self.context
        done = threading.Event()
        if not context.add_callback(done.set):
            raise _Cancelled
        if seconds is None:
            stopping = self.dispatcher.stopping
            while not done.wait(1.0):
                if stopping.is_set():
                    break
        elif seconds > 0:
            done.wait(seconds)
        if done.is_set() or not context.is_active():
            raise _Cancelled

    def fault(self, fault: Fault) -> NoReturn:
        if fault is Fault.DROP:
            # Never answer: wait for the client's deadline or cancellation (or the server to stop).
            self._sleep(None)
            raise _Cancelled
        if fault is Fault.RESET:
            self.finish(grpc.StatusCode.CANCELLED, "fault: reset")
            self.context.cancel()  # RST_STREAM: the call ends abruptly
            raise _Cancelled
        self.finish(_OK, "fault: garbage")
        raise _Garbage

    def headers(self, step: Step, call: Call, index: int) -> None:
        self.send_headers(self._render_metadata(step, step.headers, call, index))

    def trailers(self, step: Step, call: Call, index: int) -> None:
        self.set_trailers(self._render_metadata(step, step.trailers, call, index))

    def _render_metadata(
        self, step: Step, pairs: Iterable[tuple[str, Any]], call: Call, index: int
    ) -> Metadata:
        try:
            return tuple((k, metadata_value(k, v.render(call, index))) for k, v in pairs)
        except Exception as exc:  # a header/trailer template failing at run time
            raise self._failed(f"a metadata template of the rule at {step.location} failed", exc) from None

    def body(self, step: Step, call: Call, index: int) -> bytes:
        template = step.body
        assert template is not None
        raw = template.static
        if raw is None:
            try:
                raw = template.render(call, index)
            except Exception as exc:  # a template failing at run time: say which and why
                raise self._failed(f"the reply template of the rule at {step.location} failed", exc) from None
        return self.sent(raw)

    def fail(self, step: Step, call: Call, index: int) -> NoReturn:
        status = step.status
        assert status is not None
        try:
            message = status.message.render(call, index) if status.message is not None else ""
        except Exception as exc:
            raise self._failed(
                f"the status message template of the rule at {step.location} failed", exc
            ) from None
        if step.trailers:
            self.trailers(step, call, index)
        self.end(status.code, message, status.details)

    def incoming(self) -> Iterator[tuple[Call, int]]:
        call = self.call
        spec = self.spec
        session = call.session
        for position, (raw, msg) in enumerate(self._stream(call)):
            one = Call(spec, call.scenario, session, call.metadata, [raw], datasets=call.datasets)
            one.set_messages([msg])
            yield one, position

    def _stream(self, call: Call) -> Iterator[tuple[bytes, Message]]:
        """The messages already read for matching, then the rest of the stream (parsed, journaled)."""
        yield from zip(list(call.raw_requests), list(call.request_messages), strict=True)
        spec = self.spec
        for raw in self._incoming or ():
            msg = parse(spec, raw)
            if len(call.raw_requests) < MAX_JOURNALED_MESSAGES:
                call.add_request(raw, msg)
            yield raw, msg

    def forward(self, name: str) -> Iterator[bytes]:
        """Forwards the call to the upstream ``name`` and relays what it answers, unchanged: headers,
        messages, trailers, status and details. The caller's deadline is the upstream call's; the caller's
        cancellation cancels it. Journaled like any answer, marked as forwarded."""
        upstream = self.dispatcher.upstreams.get(name)
        entry = self.entry
        assert entry is not None
        entry.forwarded = name
        if upstream is None:  # scenarios are checked against the declared upstreams: only from code
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f'upstream "{name}" is not declared on this server')
        context = self.context
        call = upstream.open(
            self.spec,
            self._forwarded_requests(),
            forwarded_metadata(context.invocation_metadata()),
            _timeout(context),
        )
        if not context.add_callback(call.cancel):
            call.cancel()
            raise _Cancelled
        headers = call.headers()
        if headers:
            self.send_headers(headers)
        for raw in call.replies():
            yield self.sent(raw)
        code, message, trailers = call.outcome()
        if code is not _OK and not context.is_active():
            raise _Cancelled  # the caller's deadline or cancellation ended the upstream call
        if call.unreachable:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f'upstream "{name}" at {upstream.address} is unavailable: {message or "no answer"}',
            )
        rich = next((v for k, v in trailers if k == "grpc-status-details-bin"), None)
        plain = tuple((k, v) for k, v in trailers if k != "grpc-status-details-bin")
        if plain:
            self.set_trailers(plain)
        if code is _OK:
            return
        details: tuple[bytes, ...] = ()
        if isinstance(rich, bytes):
            # Relayed as the upstream sent it; the journal keeps its details as the entry's own.
            context.set_trailing_metadata((*plain, ("grpc-status-details-bin", rich)))
            with contextlib.suppress(Exception):
                details = tuple(d.SerializeToString() for d in status_pb2.Status.FromString(rich).details)
        self.finish(code, message, details)
        raise _Ended(code, message)

    def forward_single(self, name: str) -> bytes:
        reply = b""
        for raw in self.forward(name):
            reply = raw
        return reply

    def _forwarded_requests(self) -> bytes | Iterator[bytes]:
        """What is forwarded: the request, or the messages read so far and then the rest of the stream."""
        raws = self._requests
        if self._incoming is None:
            return raws[0]
        read = list(raws)
        incoming = self._incoming

        def stream() -> Iterator[bytes]:
            yield from read
            for raw in incoming:
                if len(raws) < MAX_JOURNALED_MESSAGES:
                    raws.append(raw)
                yield raw

        return stream()

    def drain(self) -> None:
        """Lets the client finish sending before the final status, as a real server would. Every message is
        parsed (garbage is refused); the first ones are kept for the journal."""
        iterator = self._incoming
        if iterator is None:
            return
        call = self.call
        for raw in iterator:
            msg = parse(self.spec, raw)
            if len(call.raw_requests) < MAX_JOURNALED_MESSAGES:
                call.add_request(raw, msg)

    def hold(self) -> Iterator[bytes]:
        """Holds the stream open for the test (``stream: [..., {open: true}]``): sends what it pushes
        (journaled as sent), until it closes or fails the call. The session's end (reset, expiry) ends it
        with ABORTED, the server's stop with UNAVAILABLE, the client going away as any cancellation; a bidi
        client's messages are read (parsed, journaled) meanwhile, on a thread of their own."""
        session = self.session
        assert session is not None and self.rule is not None
        d = self.dispatcher
        stream = d.streams.open(session.scenario, session.id, self.spec, self.rule.where)
        how = "ended"
        try:
            if not self.context.add_callback(stream.gone):
                raise _Cancelled
            if self._incoming is not None:
                threading.Thread(
                    target=self._read_alongside, args=(stream,), name="virtsvc-held-reader", daemon=True
                ).start()
            store = d.router.store
            while True:
                item = stream.next(_HOLD_POLL)
                if item is None:
                    # Checked here too, not only on the store's events: with a shared store the session may
                    # have been reset or expired by another replica.
                    if d.stopping.is_set():
                        stream.abort(
                            grpc.StatusCode.UNAVAILABLE,
                            server_stopping_message(self.spec),
                            "the server stopped",
                        )
                    elif store.find(session.scenario, session.id) is None:
                        d.streams.end_session(session.scenario, session.id)
                    continue
                kind, value = item
                if kind == "send":
                    stream.sent += 1
                    yield self.sent(value)
                elif kind == "close":
                    how = "closed by the test"
                    return
                elif kind == "fail":
                    code, message = value
                    how = f"ended with {code.name}"
                    self.end(code, message)
                else:  # the client went away
                    raise _Cancelled
        finally:
            stream.finished(how)

    def _read_alongside(self, stream: HeldStream) -> None:
        """A held bidi stream's incoming messages, read while the test pushes: parsed (a message that is
        not the input type ends the call with INVALID_ARGUMENT) and journaled."""
        call = self.call
        spec = self.spec
        try:
            for raw in self._incoming or ():
                try:
                    msg = parse(spec, raw)
                except Refusal as exc:
                    stream.abort(exc.code, exc.message, "the client sent a message that does not parse")
                    return
                if len(call.raw_requests) < MAX_JOURNALED_MESSAGES:
                    call.add_request(raw, msg)
                stream.received += 1
        except Exception:
            return  # the call ended (cancelled, finished): the held loop says how

    # -- 4. finish -----------------------------------------------------------------------------

    def finish(self, code: grpc.StatusCode, message: str = "", details: tuple[bytes, ...] = ()) -> None:
        """Journals the call, once: later calls (a fault that ended it already) change nothing."""
        if self._finished:
            return
        self._finished = True
        entry = self.entry
        if entry is not None:  # every path opens the entry before it can end
            entry.code = code
            entry.message = message
            entry.details = details
            entry.duration = time.perf_counter() - self.t0 or 1e-9
            if len(entry.raw_requests) > MAX_JOURNALED_MESSAGES:  # a long client stream: keep it bounded
                entry.raw_requests = entry.raw_requests[:MAX_JOURNALED_MESSAGES]
            try:
                self.dispatcher.journal.record(entry)
            except Refusal:
                # A shared journal out of reach: an answer must not go out unjournaled (the caller turns
                # this into the store's UNAVAILABLE); a failure is still told as it was.
                if code is _OK:
                    next(self.dispatcher.in_flight.ended)
                    raise
                log.warning("journal.unrecorded", method=self.spec.full_name, code=code.name)
        next(self.dispatcher.in_flight.ended)
        observed = self._observed
        if observed is not None:
            self._observed = None
            observed[0].on_finish(self, observed[1])

    def end(self, code: grpc.StatusCode, message: str, details: tuple[bytes, ...] = ()) -> NoReturn:
        """Ends the call with a status: journaled now, told to grpc when the pipeline unwinds."""
        if details:
            self._rich(code, message, details)
        self.finish(code, message, details)
        raise _Ended(code, message)

    def _rich(self, code: grpc.StatusCode, message: str, details: tuple[bytes, ...]) -> None:
        """Sets the status's rich details (``grpc-status-details-bin``) beside the trailers already set."""
        rich = status_pb2.Status(
            code=code.value[0], message=message, details=[any_pb2.Any.FromString(d) for d in details]
        )
        trailers = self.entry.trailers if self.entry is not None else ()
        self.context.set_trailing_metadata((*trailers, ("grpc-status-details-bin", rich.SerializeToString())))

    def _failed(self, what: str, exc: BaseException) -> BaseException:
        if isinstance(exc, (Refusal, _Ended, _Cancelled, _Garbage)):
            return exc
        summary = _text.describe(exc)
        log.warning(
            "template.failed",
            rule=str(self.rule.location) if self.rule else None,
            method=self.spec.full_name,
            error=summary,
        )
        # A template's own error explains itself; anything else is a bug, shown with its type.
        return Refusal(_INTERNAL, f"{what}: {exc if isinstance(exc, VirtsvcError) else summary}")

    def _outcome(self, exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
        """How the call ends after ``exc``: the status to abort with, or None when nothing more is sent."""
        if isinstance(exc, _Ended):
            code, message = exc.args
            return code, message
        if isinstance(exc, Refusal):
            if exc.near_miss and self.entry is not None:
                self.entry.near_miss = exc.report or exc.message
            if exc.details:
                self._rich(exc.code, exc.message, exc.details)
            self.finish(exc.code, exc.message, exc.details)
            return exc.code, exc.message
        if isinstance(exc, (_Cancelled, grpc.RpcError, GeneratorExit)):
            self._cancelled()
            return None
        if isinstance(exc, RuleFailure):  # raised while choosing: the rule was not chosen yet
            self.rule, exc = exc.rule, exc.cause
            if self.entry is not None:
                self.entry.rule = self.rule.where
        rule = self.rule
        where = f"the rule at {rule.location}" if rule is not None else f"the call to {self.spec.full_name}"
        summary = _text.describe(exc)
        log.error(
            "call.failed",
            rule=str(rule.location) if rule else None,
            method=self.spec.full_name,
            error=summary,
        )
        message = f"{where} failed unexpectedly: {summary}"
        self.finish(_INTERNAL, message)
        return _INTERNAL, message

    def _cancelled(self) -> None:
        remaining = self.context.time_remaining()
        # The client's own timer fires a little before ours (our deadline counts from when the call
        # arrived), so its cancellation lands with a sliver of time left: that is still the deadline.
        if remaining is not None and remaining <= _DEADLINE_SLACK:
            self.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline expired")
        else:
            self.finish(grpc.StatusCode.CANCELLED, "the client went away")

    # -- the four kinds run the stages ----------------------------------------------------------------

    def run_single(self, answer: Callable[[Exchange], bytes]) -> bytes | None:
        """Unary and client-streaming calls: ``answer`` returns the reply's bytes."""
        try:
            try:
                self.admit()
                reply = answer(self)
            finally:
                if self._admitted:
                    self.release()
        except _Garbage:
            return GARBAGE
        except BaseException as exc:
            if isinstance(exc, grpc.RpcError):
                self._cancelled()
                raise
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            outcome = self._outcome(exc)
            if outcome is None:
                return None
            self.context.abort(*outcome)
        try:
            self.finish(_OK)
        except Refusal as exc:
            self.context.abort(exc.code, exc.message)
        return reply

    def run_stream(self, answer: Callable[[Exchange], Iterator[bytes]]) -> Iterator[bytes]:
        """Server-streaming and bidi calls: ``answer`` yields the replies."""
        try:
            try:
                self.admit()
                yield from answer(self)
            finally:
                if self._admitted:
                    self.release()
        except _Garbage:
            yield GARBAGE
            return
        except BaseException as exc:
            if isinstance(exc, (GeneratorExit, grpc.RpcError)):
                self._cancelled()  # grpc stopped pulling replies, or the request stream broke
                raise
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            outcome = self._outcome(exc)
            if outcome is None:
                return
            self.context.abort(*outcome)
        try:
            self.finish(_OK)
        except Refusal as exc:
            self.context.abort(exc.code, exc.message)

    def client_stream(self) -> Iterator[bytes]:
        """The client's stream of raw requests (client-streaming and bidi calls)."""
        assert self._incoming is not None
        return self._incoming

    @staticmethod
    def strategy(choice: Choice) -> Answer:
        """The declarative answer of a chosen rule (a rule with a Python handler has none)."""
        assert choice.answer is not None, "a handler rule has no declarative answer"
        return choice.answer

    # -- python handlers -------------------------------------------------------------------------

    def run_handler(self, rule: Rule, arg: Any, stream: bool) -> Any:
        """Runs a Python handler with grpc's servicer signature; its result is encoded to the output type."""
        session = self.session
        assert session is not None
        hctx = HandlerContext(self.context, session)
        token = _current.set(session)
        call_token = _current_call.set(self.call)
        handler = rule.handler
        assert handler is not None
        try:
            result = handler(arg, hctx)
            if not stream:
                return self.sent(encode(self.spec, result))
            return self._handler_stream(rule, hctx, result)
        except Exception as exc:
            raise self._handler_failed(rule, hctx, exc) from None
        finally:
            _current_call.reset(call_token)
            _current.reset(token)

    def _handler_stream(self, rule: Rule, hctx: HandlerContext, result: Any) -> Iterator[bytes]:
        session = self.session
        assert session is not None
        token = _current.set(session)
        call_token = _current_call.set(self.call)
        try:
            if result is None:
                return
            if isinstance(result, (Message, dict)):
                result = [result]
            for item in result:
                yield self.sent(encode(self.spec, item))
        except Exception as exc:
            raise self._handler_failed(rule, hctx, exc) from None
        finally:
            with contextlib.suppress(ValueError):  # a generator resumed in another context
                _current_call.reset(call_token)
            with contextlib.suppress(ValueError):
                _current.reset(token)

    def _handler_failed(self, rule: Rule, hctx: HandlerContext, exc: Exception) -> BaseException:
        """A handler that raised: INTERNAL with the error's summary. Its own aborts, refusals of ours (bad
        request, reply too big) and a client gone away pass through unchanged."""
        if hctx.aborted is not None:
            code, details = hctx.aborted
            self.finish(code, details)
            return _Ended(code, details)  # grpc has the status already; ending again repeats it
        if isinstance(exc, (Refusal, _Ended, _Cancelled, _Garbage)):
            return exc
        if isinstance(exc, grpc.RpcError) and not self.context.is_active():
            return exc  # the request stream broke because the client went away
        name = getattr(rule.handler, "__qualname__", "handler")
        summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("handler.failed", handler=name, rule=str(rule.location), error=summary)
        return Refusal(_INTERNAL, f"the scenario handler {name} (rule at {rule.location}) raised {summary}")

    def requests(self, iterator: Iterator[bytes], parsed: Iterable[Message] = ()) -> Iterator[Message]:
        """The requests a Python handler iterates: those already read, then the rest, parsed as they come."""
        yield from parsed
        spec = self.spec
        raws = self._requests
        for raw in iterator:
            msg = parse(spec, raw)
            if len(raws) < MAX_JOURNALED_MESSAGES:
                raws.append(raw)
            yield msg


class Dispatcher(grpc.GenericRpcHandler):
    """One generic handler serving every method of the catalog through the pipeline."""

    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        journal: Journal,
        *,
        stopping: threading.Event | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_concurrency: int | None = None,
        max_concurrency_per_session: int | None = None,
        upstreams: Mapping[str, Upstream] | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self.catalog = catalog
        #: every delay is multiplied by it (``--time-scale``): above 1 stretches, below 1 compresses
        self.time_scale = time_scale
        self.router = router
        self.journal = journal
        #: the real services calls may be forwarded to, by name
        self.upstreams: Mapping[str, Upstream] = dict(upstreams or {})
        #: the streams held open for the test to drive (``stream: [..., {open: true}]``)
        self.streams = HeldStreams(max_message_bytes)
        self.stopping = stopping or threading.Event()
        self.max_message_bytes = max_message_bytes
        #: calls in flight in the whole server (None: not counted)
        self.gauge = Gauge(max_concurrency) if max_concurrency else None
        self.max_concurrency_per_session = max_concurrency_per_session or None
        self.limited = self.gauge is not None or self.max_concurrency_per_session is not None
        #: calls arrived and not ended (the in-flight gauge of /metrics); two lock-free counts
        self.in_flight = InFlight()
        #: the call observers (None while there are none: the pipeline then pays one ``is None`` per call)
        self.observers: Observers | None = None
        self._observers = Observers(self._observers_changed)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {
            spec.path: self._make_handler(spec) for spec in catalog.methods.values()
        }
        # not served under their paths by the dispatcher: the server's servicer hands calls over
        self._handlers_builtin = {spec.path: self._make_handler(spec) for spec in catalog.builtin.values()}

    def add_observer(self, observer: CallObserver) -> Callable[[], None]:
        """Adds a call observer (see ``virtsvc.engine.observers``); returns the remover."""
        return self._observers.add(observer)

    def _observers_changed(self, observers: Observers) -> None:
        self.observers = observers if len(observers) else None

    # -- grpc.GenericRpcHandler ------------------------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def handler_for(self, spec: MethodSpec) -> grpc.RpcMethodHandler:
        """The handler of one method (registered with the server ahead of time); for a built-in method
        (health), the engine's handler that the server's own servicer hands a call over to."""
        handler = self._handlers.get(spec.path)
        if handler is None:
            handler = self._handlers_builtin[spec.path]
        return handler

    def unknown_method_handler(self) -> grpc.GenericRpcHandler:
        """A last-resort handler answering UNIMPLEMENTED with the method's name and the services here."""
        services = ", ".join(self.catalog.services) or "none"

        def answer(method: str) -> grpc.RpcMethodHandler:
            message = (
                f"unknown method {method}: this virtual server does not serve it; "
                f"its services are: {services}"
            )

            def behaviour(
                request_iterator: Iterator[bytes], context: grpc.ServicerContext
            ) -> Iterator[bytes]:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
                yield b""  # pragma: no cover - abort raises

            return grpc.stream_stream_rpc_method_handler(behaviour)

        class _Unknown(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                return answer(details.method)

        return _Unknown()

    def _make_handler(self, spec: MethodSpec) -> grpc.RpcMethodHandler:
        # partial, not a lambda: grpc calls it with (request, context) without a Python frame of ours
        if spec.kind == "unary":
            return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, spec))
        if spec.kind == "server_streaming":
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._streaming, spec))
        if spec.kind == "client_streaming":
            return grpc.stream_unary_rpc_method_handler(functools.partial(self._client_streaming, spec))
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._bidi, spec))

    # -- the four kinds ----------------------------------------------------------------------------

    def _unary(self, spec: MethodSpec, raw: bytes, context: grpc.ServicerContext) -> bytes | None:
        return Exchange(self, spec, context, [raw]).run_single(_answer_unary)

    def _client_streaming(
        self, spec: MethodSpec, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> bytes | None:
        return Exchange(self, spec, context, [], request_iterator).run_single(_answer_client_stream)

    def _streaming(self, spec: MethodSpec, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        return Exchange(self, spec, context, [raw]).run_stream(_answer_server_stream)

    def _bidi(
        self, spec: MethodSpec, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        return Exchange(self, spec, context, [], request_iterator).run_stream(_answer_bidi)


def server_stopping_message(spec: MethodSpec) -> str:
    """What the client of a stream held open is told when the server stops."""
    return (
        f"the virtual server is stopping: {spec.full_name} was held open for the test to drive and is "
        "ended; retry against a server that is serving"
    )


def _timeout(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline as a timeout for a forwarded call; None when the caller set none (grpc then
    reports a time far in the future, which would overflow the upstream call's deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE else remaining


def _unparsable(spec: MethodSpec, exc: Exception) -> str:
    reason = str(exc) or type(exc).__name__
    return (
        f"the request to {spec.full_name} is not a valid {spec.input.full_name} message ({reason}); "
        "send the method's input type, serialised"
    )


# Small requests already known to parse as their type: the same bytes come again and again (polling
# clients, retries, load tests), and a dict look-up costs a tenth of parsing them. Bounded in entries and
# size; emptied when full, so it follows what is being sent now.
_PARSED: dict[tuple[type[Message], bytes], None] = {}  # by the message class: one per descriptor pool
_PARSED_MAX = 4096
_PARSED_MAX_BYTES = 512


def parses(spec: MethodSpec, raw: bytes) -> bool:
    """Whether ``raw`` is a valid ``spec.input`` message (fixed replies never need it decoded)."""
    small = len(raw) <= _PARSED_MAX_BYTES
    key = (spec.input_class, raw)
    if small and key in _PARSED:
        return True
    try:
        spec.input_class.FromString(raw)
    except Exception:
        return False
    if small:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = None
    return True


def parse(spec: MethodSpec, raw: bytes) -> Message:
    try:
        return spec.input_class.FromString(raw)
    except Exception as exc:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, _unparsable(spec, exc)) from None


def encode(spec: MethodSpec, result: Any) -> bytes:
    """A handler's result (a message, a proto3 JSON dict, bytes or None) as the output type's bytes."""
    if result is None:
        return b""
    if isinstance(result, Message):
        if result.DESCRIPTOR.full_name != spec.output.full_name:
            raise TypeError(
                f"returned a {result.DESCRIPTOR.full_name} but {spec.full_name} answers "
                f"{spec.output.full_name}"
            )
        return result.SerializeToString()
    if isinstance(result, bytes):
        return result
    if isinstance(result, dict):
        msg = spec.output_class()
        try:
            json_format.ParseDict(result, msg, descriptor_pool=spec.output.file.pool)
        except json_format.ParseError as exc:
            raise ValueError(f"its reply does not fit {spec.output.full_name}: {exc}") from None
        return msg.SerializeToString()
    raise TypeError(
        f"returned {type(result).__name__}; return a dict (proto3 JSON) or a {spec.output.full_name}"
    )


# -- the answer stage of each kind (module functions, not closures: nothing allocated per call for them) --


def _forwarding(ex: Exchange) -> bool:
    """Passthrough mode: the call goes to the real service as it came (not parsed, nothing read first)."""
    return ex.dispatcher.router.forward_all


def _answer_unary(ex: Exchange) -> bytes:
    if _forwarding(ex):
        return ex.strategy(ex.choose()).single(ex, 0)
    spec, raw = ex.spec, ex._requests[0]
    found = ex.plan()
    if found is not None and parses(spec, raw):
        return ex.answer_plan(*found)
    msg = parse(spec, raw)
    ex.call.set_messages([msg])
    choice = ex.choose()
    if choice.rule.handler is not None:
        return ex.run_handler(choice.rule, msg, stream=False)
    return ex.strategy(choice).single(ex, choice.index)


def _answer_client_stream(ex: Exchange) -> bytes:
    if _forwarding(ex):
        return ex.strategy(ex.choose()).single(ex, 0)
    spec, request_iterator = ex.spec, ex.client_stream()
    call = ex.call
    call.set_messages([])
    choice: Choice | None = None
    if any(r.handler is not None for r in ex.candidates()):
        # Handlers consume the stream themselves: pick the rule on what is known up front.
        choice = ex.choose()
        if choice.rule.handler is not None:
            return ex.run_handler(choice.rule, ex.requests(request_iterator), stream=False)
    for raw in request_iterator:
        call.add_request(raw, parse(spec, raw))
    if choice is None:
        choice = ex.choose()
    if choice.rule.handler is not None:
        return ex.run_handler(choice.rule, iter(call.request_messages), stream=False)
    return ex.strategy(choice).single(ex, choice.index)


def _answer_server_stream(ex: Exchange) -> Iterator[bytes]:
    if _forwarding(ex):
        yield from ex.strategy(ex.choose()).stream(ex, 0)
        return
    ex.call.set_messages([parse(ex.spec, ex._requests[0])])
    choice = ex.choose()
    if choice.rule.handler is not None:
        yield from ex.run_handler(choice.rule, ex.call.request_messages[0], stream=True)
    else:
        yield from ex.strategy(choice).stream(ex, choice.index)


def _answer_per_message(ex: Exchange) -> Iterator[bytes]:
    """A bidi call answered message by message: each incoming message is matched on its own against the
    method's per-message rules (``when``, ``times``, priority) and answered by the one it matches."""
    ex.call.set_messages([])
    for one, position in ex.incoming():
        one.position = position
        choice = ex.choose_for(one)
        yield from answer_message(choice.rule.steps[0], ex, one, position)


def _answer_bidi(ex: Exchange) -> Iterator[bytes]:
    if _forwarding(ex):
        yield from ex.strategy(ex.choose()).stream(ex, 0)
        return
    if any(r.per_message for r in ex.candidates()):
        yield from _answer_per_message(ex)
        return
    spec, request_iterator = ex.spec, ex.client_stream()
    messages: list[Message] = []
    call = ex.call
    call.set_messages(messages)
    # Read the first message only when some rule must see it: a server that speaks first must not wait for
    # the client.
    if any(r.needs_request for r in ex.candidates()):
        first = next(request_iterator, None)
        if first is not None:
            call.add_request(first, parse(spec, first))
    choice = ex.choose()
    if choice.rule.handler is not None:
        yield from ex.run_handler(choice.rule, ex.requests(request_iterator, list(messages)), stream=True)
    else:
        yield from ex.strategy(choice).stream(ex, choice.index)
