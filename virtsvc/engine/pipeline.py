"""Generic grpc handlers for the four cardinalities, built from descriptors and driven by the router.

Requests and replies cross grpc as raw bytes (no (de)serialisers registered): a static reply is sent as the
bytes serialised at load. Every request is parsed once, as it arrives (cheap in upb, and the journal and
matchers need it anyway): bytes that are not the method's input type are answered INVALID_ARGUMENT before
any rule runs, and the parsed messages are handed to the Call so nothing parses them again.
Everything that can go wrong with a call is answered here with a status and a message that says why;
gRPC would turn an exception raised while looking up a handler into an opaque UNKNOWN.

Limits (``max_concurrency``, ``max_concurrency_per_session``, ``max_message_bytes``) are counters and length
checks: no lock is held across a call, and nothing is counted when no limit is set.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import status_pb2

from virtsvc import _logs
from virtsvc.contracts.catalog import Catalog, MethodSpec
from virtsvc.engine.journal import Entry, Journal
from virtsvc.engine.limits import Gauge, server_busy_message, session_busy_message
from virtsvc.engine.router import (
    BAGGAGE_SCENARIO,
    BAGGAGE_SESSION,
    NO_SCENARIO,
    SCENARIO_HEADER,
    SESSION_HEADER,
    RouteError,
    Router,
    parse_baggage,
    sequence_key,
)
from virtsvc.engine.store import DEFAULT_SESSION, Session
from virtsvc.scenarios.model import Call, CompiledScenario, Fault, Rule, Step

__all__ = ["Dispatcher", "current_session"]

log = _logs.get_logger("virtsvc.calls")

# A truncated varint (field 1, continuation bit set, no next byte): every protobuf parser rejects it,
# whereas some accept a truncated length-delimited field.
GARBAGE = b"\x08\x80"
MAX_JOURNALED_MESSAGES = 100  # per call, so a long stream cannot blow up the journal
_DEADLINE_SLACK = 0.1  # seconds: a cancellation this close to the deadline is the deadline
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's own default

_current: contextvars.ContextVar[Session | None] = contextvars.ContextVar("virtsvc_session", default=None)


def current_session() -> dict[str, Any]:
    """The per-session dict a Python scenario handler may keep state in (``virtsvc.session()``)."""
    session = _current.get()
    if session is None:
        raise RuntimeError("virtsvc.session() is only available inside a scenario handler")
    return session.data


class _Answered(Exception):
    """Raised after the call has been ended with a status (abort); carries it for the journal."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Cancelled(Exception):
    """The client went away (cancelled, deadline) while we were waiting."""


class _BadRequest(Exception):
    """A request that does not parse as the method's input type: answered INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _TooBig(Exception):
    """A reply over the maximum message size: answered RESOURCE_EXHAUSTED."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HandlerContext:
    """The context handed to Python scenario handlers: grpc's own, plus ``session`` (a per-session dict)."""

    def __init__(self, context: grpc.ServicerContext, session: Session) -> None:
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


class Dispatcher(grpc.GenericRpcHandler):
    """One generic handler serving every method of the catalog through the router."""

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
    ) -> None:
        self.catalog = catalog
        self.router = router
        self.journal = journal
        self.stopping = stopping or threading.Event()
        self.max_message_bytes = max_message_bytes
        #: calls in flight in the whole server (None: not counted)
        self.gauge = Gauge(max_concurrency) if max_concurrency else None
        self.max_concurrency_per_session = max_concurrency_per_session or None
        self._limited = self.gauge is not None or self.max_concurrency_per_session is not None
        self._handlers: dict[str, grpc.RpcMethodHandler] = {
            spec.path: self._make_handler(spec) for spec in catalog.methods.values()
        }

    # -- grpc.GenericRpcHandler ------------------------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def handler_for(self, spec: MethodSpec) -> grpc.RpcMethodHandler:
        """The handler of one method (registered with the server ahead of time)."""
        return self._handlers[spec.path]

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

    # -- handlers per cardinality --------------------------------------------------------------

    def _make_handler(self, spec: MethodSpec) -> grpc.RpcMethodHandler:
        # partial, not a lambda: grpc calls it with (request, context) without a Python frame of ours
        if spec.kind == "unary":
            return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, spec))
        if spec.kind == "server_streaming":
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._streaming, spec))
        if spec.kind == "client_streaming":
            return grpc.stream_unary_rpc_method_handler(functools.partial(self._client_streaming, spec))
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._bidi, spec))

    def _begin(
        self, spec: MethodSpec, context: grpc.ServicerContext, raws: list[bytes]
    ) -> tuple[Call, Entry]:
        """``_admit``, and the Call that matchers, templates and handlers see."""
        session, entry, metadata = self._admit(spec, context, raws)
        return Call(spec, session.scenario, session, metadata, raws), entry

    @staticmethod
    def _call_metadata(context: grpc.ServicerContext) -> dict[str, str]:
        """The call's text metadata, as the router and the journal read it."""
        pairs = context.invocation_metadata()
        metadata = {k: v for k, v in pairs if isinstance(v, str)}
        if "baggage" in metadata:  # W3C: members of several baggage headers combine
            metadata["baggage"] = ",".join(v for k, v in pairs if k == "baggage" and isinstance(v, str))
        return metadata

    def _admit(
        self,
        spec: MethodSpec,
        context: grpc.ServicerContext,
        raws: list[bytes],
        routed: _Routed | None = None,
    ) -> tuple[Session, Entry, dict[str, str]]:
        """Routes the call (unless ``routed`` says where it goes already) and admits it under the
        concurrency limits; ``_release`` must follow when it returns (handlers call it in ``finally``).
        Refusals end the call here (abort raises)."""
        gauge = self.gauge
        if gauge is not None and not gauge.enter():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, server_busy_message(gauge.limit))
        try:
            if routed is not None:
                metadata, compiled, session = routed
            else:
                metadata = self._call_metadata(context)
                compiled, session = self._route(spec, metadata, raws, context)
            session.touch()
            scenario = session.scenario
            entry = Entry(scenario, session.id, spec, metadata, time.time(), raws)
            entry.scenario_version = compiled.version if compiled is not None else None
            limit = self.max_concurrency_per_session
            if limit is not None and not session.enter(limit):
                message = session_busy_message(limit, scenario, session.id)
                self._finish(entry, grpc.StatusCode.RESOURCE_EXHAUSTED, message, time.perf_counter())
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        except BaseException:
            if gauge is not None:
                gauge.leave()
            raise
        return session, entry, metadata

    def _route(
        self, spec: MethodSpec, metadata: dict[str, str], raws: list[bytes], context: grpc.ServicerContext
    ) -> tuple[CompiledScenario | None, Session]:
        """``Router.route``; a call it refuses is journaled and ended here (abort raises)."""
        try:
            return self.router.route(metadata)
        except RouteError as exc:
            # Journaled under the names the call sent, from headers or baggage as the router reads them.
            baggage = parse_baggage(metadata.get("baggage", ""))
            scenario_name = metadata.get(SCENARIO_HEADER, baggage.get(BAGGAGE_SCENARIO, NO_SCENARIO))
            session_id = metadata.get(SESSION_HEADER, baggage.get(BAGGAGE_SESSION, "")) or DEFAULT_SESSION
            entry = Entry(scenario_name, session_id, spec, metadata, time.time(), list(raws))
            entry.near_miss = exc.message
            self._finish(entry, exc.code, exc.message, time.perf_counter())
            context.abort(exc.code, exc.message)
            raise  # not reached: abort raises

    def _release(self, session: Session) -> None:
        """Frees the places ``_admit`` claimed (only called when a limit is set)."""
        if self.max_concurrency_per_session is not None:
            session.leave()
        if self.gauge is not None:
            self.gauge.leave()

    def _select(self, call: Call, entry: Entry, context: grpc.ServicerContext, t0: float) -> Rule:
        selection = self.router.select(call)
        if selection.rule is None:
            entry.near_miss = selection.near_miss
            self._end(entry, context, grpc.StatusCode.UNIMPLEMENTED, selection.near_miss or "no rule", t0)
        assert selection.rule is not None
        entry.rule = selection.rule.where
        return selection.rule

    def _unary(self, spec: MethodSpec, raw: bytes, context: grpc.ServicerContext) -> bytes | None:
        t0 = time.perf_counter()
        routed: _Routed | None = None
        if not self._limited:
            metadata = self._call_metadata(context)
            try:
                compiled, session = self.router.route(metadata)
            except RouteError:
                pass  # _admit routes it again, then journals and answers the refusal
            else:
                routed = (metadata, compiled, session)
                reply = self._fixed(spec, raw, routed, t0)
                if reply is not None:
                    return reply
        raws = [raw]
        session, entry, metadata = self._admit(spec, context, raws, routed)
        call = Call(spec, session.scenario, session, metadata, raws)

        def answer() -> tuple[bytes, Rule]:
            msg = _parse(spec, raw)
            call.set_messages([msg])
            rule = self._select(call, entry, context, t0)
            if rule.handler is not None:
                return self._run_unary_handler(rule, call, context, msg, entry, t0), rule
            step, index = self._step(rule, call, entry, context, t0)
            return self._single_reply(step, call, index, context, entry, t0), rule

        return self._answered(spec, call, entry, context, t0, answer)

    def _fixed(self, spec: MethodSpec, raw: bytes, routed: _Routed, t0: float) -> bytes | None:
        """The commonest answer, a fixed reply (``Rule.plain_reply``), in one pass: counted and journaled
        like any call, without admission, a Call, selection, steps or templates.

        None when the call needs more (session rules, a rule with conditions, a request that does not
        parse): the full path answers it with the routing done here, errors included. The request is still
        checked to parse (a dict look-up for bytes seen before): garbage gets INVALID_ARGUMENT from the
        full path, whatever the rule. Servers with concurrency limits never come here: admission and
        release stay in one place.
        """
        metadata, compiled, session = routed
        if compiled is None or session.rules:
            return None
        rules = self.router.registry.rules_for(compiled.name, spec.full_name)
        reply = rules[0].plain_reply if rules else None
        if reply is None or len(reply) > self.max_message_bytes or not _parses(spec, raw):
            return None
        session.touch()
        entry = Entry(compiled.name, session.id, spec, metadata, time.time(), [raw], [reply])
        entry.scenario_version = compiled.version
        entry.rule = rules[0].where
        entry.duration = time.perf_counter() - t0 or 1e-9
        self.journal.record(entry)
        return reply

    def _client_streaming(
        self, spec: MethodSpec, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> bytes | None:
        t0 = time.perf_counter()
        raws: list[bytes] = []
        call, entry = self._begin(spec, context, raws)

        def answer() -> tuple[bytes, Rule]:
            call.set_messages([])
            if any(r.handler is not None for r in self._candidates(call)):
                # Handlers consume the stream themselves: pick the rule on what is known up front.
                rule = self._select(call, entry, context, t0)
                if rule.handler is not None:
                    requests = self._decoded(call, request_iterator)
                    return self._run_unary_handler(rule, call, context, requests, entry, t0), rule
            for raw in request_iterator:
                call.add_request(raw, _parse(spec, raw))
            rule = self._select(call, entry, context, t0)
            if rule.handler is not None:
                requests = iter(call.request_messages)
                return self._run_unary_handler(rule, call, context, requests, entry, t0), rule
            step, index = self._step(rule, call, entry, context, t0)
            return self._single_reply(step, call, index, context, entry, t0), rule

        return self._answered(spec, call, entry, context, t0, answer)

    def _streaming(self, spec: MethodSpec, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        t0 = time.perf_counter()
        call, entry = self._begin(spec, context, [raw])

        def answer() -> Iterator[bytes]:
            msg = _parse(spec, raw)
            call.set_messages([msg])
            rule = self._select(call, entry, context, t0)
            if rule.handler is not None:
                yield from self._run_stream_handler(rule, call, context, msg, entry, t0)
            else:
                step, index = self._step(rule, call, entry, context, t0)
                yield from self._stream_reply(step, call, index, context, entry, t0, None)

        yield from self._streamed(call, entry, context, t0, answer())

    def _bidi(
        self, spec: MethodSpec, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        t0 = time.perf_counter()
        raws: list[bytes] = []
        call, entry = self._begin(spec, context, raws)

        def answer() -> Iterator[bytes]:
            messages: list[Message] = []
            call.set_messages(messages)
            # Read the first message only when some rule must see it: a server that speaks first
            # must not wait for the client.
            if any(r.needs_request for r in self._candidates(call)):
                first = next(request_iterator, None)
                if first is not None:
                    call.add_request(first, _parse(spec, first))
            rule = self._select(call, entry, context, t0)
            if rule.handler is not None:
                requests = self._decoded(call, request_iterator, list(messages))
                yield from self._run_stream_handler(rule, call, context, requests, entry, t0)
            else:
                step, index = self._step(rule, call, entry, context, t0)
                yield from self._stream_reply(step, call, index, context, entry, t0, request_iterator)

        yield from self._streamed(call, entry, context, t0, answer())

    # -- how a call ends: one place for the four kinds -------------------------------------------

    def _answered(
        self,
        spec: MethodSpec,
        call: Call,
        entry: Entry,
        context: grpc.ServicerContext,
        t0: float,
        answer: Callable[[], tuple[bytes, Rule]],
    ) -> bytes | None:
        """Runs a single-reply answer; every way it can end is journaled and turned into a status."""
        try:
            reply, rule = answer()
            if len(reply) > self.max_message_bytes:
                raise _TooBig(self._too_big(spec, rule, len(reply)))
        except _Cancelled:
            self._finish_cancelled(entry, context, t0)
            return None
        except grpc.RpcError:  # the request stream broke: the client cancelled or went away
            self._finish_cancelled(entry, context, t0)
            raise
        except _Garbage:
            return GARBAGE
        except _BadRequest as exc:
            self._end(entry, context, grpc.StatusCode.INVALID_ARGUMENT, exc.message, t0)
        except _TooBig as exc:
            self._end(entry, context, grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message, t0)
        finally:
            if self._limited:
                self._release(call.session)
        entry.raw_replies.append(reply)
        self._finish(entry, grpc.StatusCode.OK, "", t0)
        return reply

    def _streamed(
        self, call: Call, entry: Entry, context: grpc.ServicerContext, t0: float, replies: Iterator[bytes]
    ) -> Iterator[bytes]:
        """Streams an answer's replies; every way it can end is journaled and turned into a status."""
        try:
            yield from replies
        except _Cancelled:
            self._finish_cancelled(entry, context, t0)
            return
        except (GeneratorExit, grpc.RpcError):  # grpc stopped pulling replies, or the request stream broke
            self._finish_cancelled(entry, context, t0)
            raise
        except _Garbage:
            yield GARBAGE
            return
        except _BadRequest as exc:
            self._end(entry, context, grpc.StatusCode.INVALID_ARGUMENT, exc.message, t0)
        except _TooBig as exc:
            self._end(entry, context, grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message, t0)
        finally:
            if self._limited:
                self._release(call.session)
        self._finish(entry, grpc.StatusCode.OK, "", t0)

    def _too_big(self, spec: MethodSpec, rule: Rule | None, size: int) -> str:
        where = f" (rule at {rule.location})" if rule is not None else ""
        return (
            f"the reply to {spec.full_name}{where} is {size:,} bytes, over the maximum message size of "
            f"{self.max_message_bytes:,} bytes; raise it with --max-message-bytes "
            "(VirtualServer(max_message_bytes=...))"
        )

    def _finish_cancelled(self, entry: Entry, context: grpc.ServicerContext, t0: float) -> None:
        remaining = context.time_remaining()
        # The client's own timer fires a little before ours (our deadline counts from when the call
        # arrived), so its cancellation lands with a sliver of time left: that is still the deadline.
        if remaining is not None and remaining <= _DEADLINE_SLACK:
            self._finish(entry, grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline expired", t0)
        else:
            self._finish(entry, grpc.StatusCode.CANCELLED, "the client went away", t0)

    # -- steps ---------------------------------------------------------------------------------

    def _candidates(self, call: Call) -> Sequence[Rule]:
        method = call.method.full_name
        return (*call.session.rules.get(method, ()), *self.router.registry.rules_for(call.scenario, method))

    def _step(
        self, rule: Rule, call: Call, entry: Entry, context: grpc.ServicerContext, t0: float
    ) -> tuple[Step, int]:
        steps = rule.steps
        if not rule.is_sequence:
            return steps[0], 0
        pos = call.session.advance(sequence_key(rule))
        n = len(steps)
        if pos < n:
            return steps[pos], pos
        if rule.after == "cycle":
            return steps[pos % n], pos % n
        if rule.after == "fail":
            self._end(
                entry,
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the sequence of the rule at {rule.location} is exhausted: it had {n} steps and this is "
                f"call {pos + 1} (after: fail)",
                t0,
            )
        return steps[-1], n - 1

    def _prelude(self, step: Step, call: Call, index: int, context: grpc.ServicerContext,
                 entry: Entry, t0: float) -> None:
        """Delay, fault and initial metadata: what happens before any reply."""
        if step.delay is not None:
            self._wait(step.delay.sample(call.session.rng), context)
        if step.fault is not None:
            self._fault(step.fault, context, entry, t0)
        if step.headers:
            context.send_initial_metadata(self._metadata(step, step.headers, call, index, context, entry, t0))

    def _metadata(self, step: Step, pairs: Sequence[tuple[str, Any]], call: Call, index: int,
                  context: grpc.ServicerContext, entry: Entry, t0: float) -> list[tuple[str, str | bytes]]:
        try:
            return [(k, _binary(v.render(call, index)) if k.endswith("-bin") else v.render(call, index))
                    for k, v in pairs]
        except Exception as exc:  # a header/trailer template failing at run time
            self._end(entry, context, grpc.StatusCode.INTERNAL,
                      f"a metadata template of the rule at {step.location} failed: {exc}", t0)
            raise  # pragma: no cover - _end raises

    def _single_reply(
        self, step: Step, call: Call, index: int, context: grpc.ServicerContext, entry: Entry, t0: float
    ) -> bytes:
        self._prelude(step, call, index, context, entry, t0)
        if step.status is not None and not step.status.ok:
            self._fail(step, call, index, context, entry, t0)
        body = b""
        if step.body is not None:
            body = step.body.static if step.body.static is not None else self._render(step, call, index,
                                                                                     context, entry, t0)
        if step.trailers:
            trailers = self._metadata(step, step.trailers, call, index, context, entry, t0)
            context.set_trailing_metadata(trailers)
        return body

    def _stream_reply(
        self,
        step: Step,
        call: Call,
        index: int,
        context: grpc.ServicerContext,
        entry: Entry,
        t0: float,
        request_iterator: Iterator[bytes] | None,
    ) -> Iterator[bytes]:
        limit = self.max_message_bytes
        self._prelude(step, call, index, context, entry, t0)
        if step.each_request is not None and request_iterator is not None:
            each = step.each_request
            spec = call.method
            for position, (raw, msg) in enumerate(_incoming(call, request_iterator)):
                one = Call(spec, call.scenario, call.session, call.metadata, [raw])
                one.set_messages([msg])
                if each.delay is not None:
                    self._wait(each.delay.sample(call.session.rng), context)
                if each.status is not None and not each.status.ok:
                    self._fail(each, one, position, context, entry, t0)
                if each.body is not None:
                    out = each.body.static if each.body.static is not None else self._render(
                        each, one, position, context, entry, t0)
                    if len(out) > limit:
                        raise _TooBig(self._too_big(spec, None, len(out)))
                    self._journal_reply(entry, out)
                    yield out
        elif step.stream is not None:
            for i, item in enumerate(step.stream):
                if item.delay is not None:
                    self._wait(item.delay.sample(call.session.rng), context)
                if item.fault is not None:
                    self._fault(item.fault, context, entry, t0)
                if item.body is not None:
                    out = item.body.static if item.body.static is not None else self._render(
                        item, call, i, context, entry, t0)
                    if len(out) > limit:
                        raise _TooBig(self._too_big(call.method, None, len(out)))
                    self._journal_reply(entry, out)
                    yield out
        elif step.body is not None:
            out = step.body.static if step.body.static is not None else self._render(step, call, index,
                                                                                    context, entry, t0)
            if len(out) > limit:
                raise _TooBig(self._too_big(call.method, None, len(out)))
            self._journal_reply(entry, out)
            yield out
        if request_iterator is not None and step.each_request is None:
            # Let the client finish sending before the final status, as a real server would. Every message
            # is parsed (garbage is refused); the first ones are kept for the journal.
            spec = call.method
            for raw in request_iterator:
                msg = _parse(spec, raw)
                if len(call.raw_requests) < MAX_JOURNALED_MESSAGES:
                    call.add_request(raw, msg)
        if step.status is not None and not step.status.ok:
            self._fail(step, call, index, context, entry, t0)
        if step.trailers:
            trailers = self._metadata(step, step.trailers, call, index, context, entry, t0)
            context.set_trailing_metadata(trailers)

    def _render(self, step: Step, call: Call, index: int, context: grpc.ServicerContext, entry: Entry,
                t0: float) -> bytes:
        assert step.body is not None
        try:
            return step.body.render(call, index)
        except Exception as exc:  # a template failing at run time: say which and why
            self._end(entry, context, grpc.StatusCode.INTERNAL,
                      f"the reply template of the rule at {step.location} failed: {exc}", t0)
            raise  # pragma: no cover - _end raises

    def _fail(self, step: Step, call: Call, index: int, context: grpc.ServicerContext, entry: Entry,
              t0: float) -> None:
        status = step.status
        assert status is not None
        try:
            message = status.message.render(call, index) if status.message is not None else ""
        except Exception as exc:
            self._end(entry, context, grpc.StatusCode.INTERNAL,
                      f"the status message template of the rule at {step.location} failed: {exc}", t0)
        trailers = []
        if step.trailers:
            trailers = self._metadata(step, step.trailers, call, index, context, entry, t0)
        if status.details:
            rich = status_pb2.Status(code=status.code.value[0], message=message,
                                     details=[any_pb2.Any.FromString(d) for d in status.details])
            trailers.append(("grpc-status-details-bin", rich.SerializeToString()))
        if trailers:
            context.set_trailing_metadata(trailers)
        self._end(entry, context, status.code, message, t0)

    def _fault(self, fault: Fault, context: grpc.ServicerContext, entry: Entry, t0: float) -> None:
        if fault is Fault.DROP:
            # Never answer: wait for the client's deadline or cancellation (or the server to stop).
            self._wait(None, context)
        elif fault is Fault.RESET:
            self._finish(entry, grpc.StatusCode.CANCELLED, "fault: reset", t0)
            context.cancel()  # RST_STREAM: the call ends abruptly
            raise _Cancelled
        elif fault is Fault.GARBAGE:
            self._finish(entry, grpc.StatusCode.OK, "fault: garbage", t0)
            raise _Garbage

    def _wait(self, seconds: float | None, context: grpc.ServicerContext) -> None:
        """Sleeps for a delay, waking at once when the call ends (cancel, deadline, server stop).

        No timer or thread: the worker waits on an Event that grpc sets (through ``add_callback``) when the
        call terminates, so a cancelled delay frees its worker at once.
        """
        done = threading.Event()
        if not context.add_callback(done.set):
            raise _Cancelled
        if seconds is None:
            while not done.wait(1.0):
                if self.stopping.is_set():
                    break
        elif seconds > 0:
            done.wait(seconds)
        if done.is_set() or not context.is_active():
            raise _Cancelled

    # -- python handlers -----------------------------------------------------------------------

    def _decoded(
        self, call: Call, raws: Iterable[bytes], parsed: Sequence[Message] = ()
    ) -> Iterator[Message]:
        """The requests a Python handler iterates: those already read, then the rest, parsed as they come
        (a message that does not parse ends the call with INVALID_ARGUMENT)."""
        yield from parsed
        spec = call.method
        for raw in raws:
            msg = _parse(spec, raw)
            if len(call.raw_requests) < MAX_JOURNALED_MESSAGES:
                call.raw_requests.append(raw)
            yield msg

    def _run_unary_handler(self, rule: Rule, call: Call, context: grpc.ServicerContext, arg: Any,
                           entry: Entry, t0: float) -> bytes:
        hctx = HandlerContext(context, call.session)
        token = _current.set(call.session)
        try:
            result = rule.handler(arg, hctx)  # type: ignore[misc]
            return _encode(call.method, result, rule)
        except Exception as exc:
            self._handler_failed(rule, hctx, exc, entry, t0)
            raise
        finally:
            _current.reset(token)

    def _run_stream_handler(
        self, rule: Rule, call: Call, context: grpc.ServicerContext, arg: Any, entry: Entry, t0: float
    ) -> Iterator[bytes]:
        hctx = HandlerContext(context, call.session)
        limit = self.max_message_bytes
        token = _current.set(call.session)
        try:
            result = rule.handler(arg, hctx)  # type: ignore[misc]
            if result is None:
                return
            if isinstance(result, (Message, dict)):
                result = [result]
            for item in result:
                out = _encode(call.method, item, rule)
                if len(out) > limit:
                    raise _TooBig(self._too_big(call.method, rule, len(out)))
                self._journal_reply(entry, out)
                yield out
        except Exception as exc:
            self._handler_failed(rule, hctx, exc, entry, t0)
            raise
        finally:
            with contextlib.suppress(ValueError):  # a generator resumed in another context
                _current.reset(token)

    def _handler_failed(
        self, rule: Rule, hctx: HandlerContext, exc: Exception, entry: Entry, t0: float
    ) -> None:
        """A handler that raised: INTERNAL with the error's summary. Its own aborts, refusals of ours
        (bad request, reply too big) and a client gone away pass through unchanged."""
        if hctx.aborted is not None:
            code, details = hctx.aborted
            self._finish(entry, code, details, t0)
            return
        if isinstance(exc, (_Answered, _Cancelled, _BadRequest, _TooBig)):
            return
        context = hctx._context
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            return  # the request stream broke because the client went away
        name = getattr(rule.handler, "__qualname__", "handler")
        summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("handler.failed", handler=name, rule=str(rule.location), error=summary)
        self._end(entry, context, grpc.StatusCode.INTERNAL,
                  f"the scenario handler {name} (rule at {rule.location}) raised {summary}", t0)

    # -- ending calls --------------------------------------------------------------------------

    def _journal_reply(self, entry: Entry, raw: bytes) -> None:
        if len(entry.raw_replies) < MAX_JOURNALED_MESSAGES:
            entry.raw_replies.append(raw)

    def _end(self, entry: Entry, context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
             t0: float) -> None:
        self._finish(entry, code, message, t0)
        context.abort(code, message)

    def _finish(self, entry: Entry, code: grpc.StatusCode, message: str, t0: float) -> None:
        if entry.duration:  # already journaled (a fault ended the call)
            return
        entry.code = code
        entry.message = message
        entry.duration = time.perf_counter() - t0 or 1e-9
        if len(entry.raw_requests) > MAX_JOURNALED_MESSAGES:  # a long client stream: keep the journal bounded
            entry.raw_requests = entry.raw_requests[:MAX_JOURNALED_MESSAGES]
        self.journal.record(entry)


# A routed call: its text metadata, its scenario (None: session rules only) and its session.
_Routed = tuple[dict[str, str], "CompiledScenario | None", Session]


class _Garbage(Exception):
    pass


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


def _parses(spec: MethodSpec, raw: bytes) -> bool:
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


def _parse(spec: MethodSpec, raw: bytes) -> Message:
    try:
        return spec.input_class.FromString(raw)
    except Exception as exc:
        raise _BadRequest(_unparsable(spec, exc)) from None


def _incoming(call: Call, request_iterator: Iterator[bytes]) -> Iterator[tuple[bytes, Message]]:
    """The messages already read for matching, then the rest of the stream (parsed, journaled as they
    come)."""
    yield from zip(list(call.raw_requests), list(call.request_messages), strict=True)
    spec = call.method
    for raw in request_iterator:
        msg = _parse(spec, raw)
        if len(call.raw_requests) < MAX_JOURNALED_MESSAGES:
            call.add_request(raw, msg)
        yield raw, msg


def _encode(spec: MethodSpec, result: Any, rule: Rule) -> bytes:
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


def _binary(text: str) -> bytes:
    """A ``-bin`` metadata value: written in scenarios as base64 text (padding optional), sent as bytes."""
    return base64.b64decode(text + "=" * (-len(text) % 4))
