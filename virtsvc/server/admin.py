"""The admin service: scenarios, sessions, session rules, the journal and the streams held open for the
test (ListStreams, PushMessage, EndStream) of a running VirtualServer.

Handlers are generic grpc handlers on the virtual server's own grpc server. Every refusal is a status with
a message for a person: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION or UNAUTHENTICATED, never UNKNOWN.
"""

from __future__ import annotations

import contextlib
import hmac
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from virtsvc import _logs, _text
from virtsvc.admin.api import ADMIN_SERVICE, AUTH_MESSAGE, METHODS, ORIGIN, STREAMING, add_to_pool, messages
from virtsvc.contracts.catalog import normalize_method_name
from virtsvc.engine.clock import VirtualClock
from virtsvc.engine.journal import Entry, JournalFilter, metadata_json
from virtsvc.engine.router import Registry, unknown_scenario_message
from virtsvc.engine.store import DEFAULT_SESSION, RuleSet
from virtsvc.engine.streams import HeldStream
from virtsvc.errors import ConfigError, ConversionError, Refusal, StreamEnded, VirtsvcError
from virtsvc.server.options import is_loopback

if TYPE_CHECKING:
    from virtsvc.scenarios.model import CompiledScenario
    from virtsvc.server.virtual_server import VirtualServer

__all__ = ["AdminService", "add_admin", "compile_put", "entry_json", "install"]

log = _logs.get_logger("virtsvc.admin")

Behaviour = Callable[[Any], Message]
GrpcBehaviour = Callable[[Any, grpc.ServicerContext], Message]
WatchBehaviour = Callable[[Any, grpc.ServicerContext], Iterator[Message]]

WATCH_BACKLOG = 10_000  # entries a watcher may fall behind before its watch is ended
_WATCH_POLL = 0.2  # seconds between looks at whether the watcher or the server has gone
_GONE = object()  # wakes a watch whose client cancelled


class AdminService:
    """The behaviour of each admin method, on one VirtualServer."""

    def __init__(self, vserver: VirtualServer) -> None:
        self.vserver = vserver
        # Serialises admin changes, so a put and a delete never interleave their read-modify-write.
        self._lock = threading.Lock()
        self._watches = 0
        # Each watch holds a worker thread for as long as it runs: a quarter of them at most.
        self.watch_limit = max(1, vserver.options.max_workers // 4)

    # -- scenarios -----------------------------------------------------------------------------

    def ListScenarios(self, request: Any) -> Message:
        registry = self.vserver.registry
        uses = self.vserver.journal.rule_uses
        reply = messages.ListScenariosResponse(default_scenario=self.vserver.default_scenario or "")
        for scenario in registry.scenarios():  # sorted by name
            info = reply.scenarios.add(
                name=scenario.name,
                version="" if scenario.version is None else str(scenario.version),
                description=scenario.description,
                extends=scenario.extends or "",
                source=str(scenario.location),
                methods=registry.methods_of(scenario.name),
                rule_count=len(scenario.rules),
                from_script=scenario.from_script,
            )
            if request.include_rules:
                for rule in scenario.rules:
                    info.rules.add(method=rule.method, rule=rule.where, uses=uses.get(rule.where, 0))
        return reply

    def PutScenario(self, request: Any) -> Message:
        registry = self.vserver.registry
        with self._lock:
            loaded = {s.name for s in registry.scenarios()}
            try:
                compiled = compile_put(self.vserver, request.text)
            except VirtsvcError:
                if _looks_like_python(request.text):
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, PYTHON_REFUSED) from None
                raise
            if not compiled:  # pragma: no cover - the loader reports an empty text itself
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{ORIGIN}: the text holds no scenario")
            replaced = [s.name for s in compiled if s.name in loaded]
            shared = self.vserver.changes
            if shared is None:
                install(registry, compiled)
            else:  # every replica applies it, this one too, in the order the shared log holds
                shared.publish({"op": "put", "text": request.text})
        names = [s.name for s in compiled]
        log.info("admin.scenario.put", names=names, replaced=replaced)
        return messages.PutScenarioResponse(names=names, replaced=replaced)

    def DeleteScenario(self, request: Any) -> Message:
        name = request.name
        registry = self.vserver.registry
        with self._lock:
            if not name:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "give the name of the scenario to delete; " + self._loaded(),
                )
            if name not in registry:
                raise Refusal(grpc.StatusCode.NOT_FOUND, self._unknown_scenario(name))
            dependents = sorted(s.name for s in registry.scenarios() if s.extends == name)
            if dependents:
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f'scenario "{name}" is extended by '
                    + ", ".join(f'"{d}"' for d in dependents)
                    + ": delete them or change their extends first",
                )
            shared = self.vserver.changes
            if shared is None:
                registry.delete(name)
            else:
                shared.publish({"op": "delete", "name": name})
            dropped = self.vserver.store.drop_scenario(name)
            self.vserver.journal.drop_scenario(name)
        log.info("admin.scenario.deleted", name=name, sessions=dropped)
        return messages.DeleteScenarioResponse(sessions_dropped=dropped)

    # -- sessions ------------------------------------------------------------------------------

    def ResetSession(self, request: Any) -> Message:
        scenario, session_id = request.scenario, request.session or DEFAULT_SESSION
        store = self.vserver.store
        if store.find(scenario, session_id) is None:
            if not scenario and not self.vserver.journal.entries(scenario, session_id, limit=1):
                # Nothing under the empty scenario (session rules only): a forgotten "scenario" field,
                # which must not pass for "nothing to reset". The pytest plugin's RemoteServer drops every
                # session it may have used, and tolerates this refusal for the empty scenario alone.
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f'give the scenario whose session "{session_id}" to reset; ' + self._loaded(),
                )
            self._require_scenario(scenario)  # a typo must not pass for "nothing to reset"
        journal = self.vserver.journal
        if request.keep_journal:
            # Before the drop, whose event would otherwise clear it: readable until the session's TTL.
            journal.keep(scenario, session_id, request.label, self.vserver.options.session_ttl)
        existed = store.reset(scenario, session_id)
        if not request.keep_journal:
            # The journal hears of the drop from the store; entries of calls refused before any session
            # existed (routing errors) go too.
            journal.clear(scenario, session_id)
        log.info(
            "admin.session.reset",
            scenario=scenario,
            session=session_id,
            existed=existed,
            kept_journal=request.keep_journal,
        )
        return messages.ResetSessionResponse(existed=existed)

    def PutSessionRules(self, request: Any) -> Message:
        from virtsvc.scenarios.loader import compile_rules

        scenario, session_id = request.scenario, request.session or DEFAULT_SESSION
        with self._lock:
            self._require_scenario(scenario)
            # Counters are keyed by the rule's position, so re-putting the list as a test adds rules
            # keeps the earlier rules' sequences and times where they were (as in-process inline rules
            # do); ClearSessionRules or ResetSession starts them over.
            rules = compile_rules(
                request.text,
                self.vserver.catalog,
                scenario=scenario,
                origin=ORIGIN,
                key_prefix="session:",
                upstreams=self.vserver.upstreams,
            )
            # One replacement: a call in flight sees either the old rules or the new ones, never a mix.
            self.vserver.store.put_rules(scenario, session_id, RuleSet(rules, source=request.text))
        log.info("admin.session.rules", scenario=scenario, session=session_id, rules=len(rules))
        return messages.PutSessionRulesResponse(rule_count=len(rules))

    def ClearSessionRules(self, request: Any) -> Message:
        scenario, session_id = request.scenario, request.session or DEFAULT_SESSION
        with self._lock:
            if self.vserver.store.find(scenario, session_id) is None:
                self._require_scenario(scenario)
                return messages.ClearSessionRulesResponse(rule_count=0)
            # The rules' counters go too: the next put starts their sequences and times over.
            removed = self.vserver.store.clear_rules(scenario, session_id)
        log.info("admin.session.rules.cleared", scenario=scenario, session=session_id, rules=removed)
        return messages.ClearSessionRulesResponse(rule_count=removed)

    # -- streams held open ---------------------------------------------------------------------

    def ListStreams(self, request: Any) -> Message:
        method = self._method(request.method) if request.method else None
        streams = self.vserver.dispatcher.streams
        scenario, session = request.scenario or None, request.session or None
        if request.min_count:
            timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 5.0
            found = streams.wait(scenario, session, method, request.min_count, min(max(timeout, 0.0), 60.0))
        else:
            found = streams.listed(scenario, session, method)
        reply = messages.ListStreamsResponse()
        for stream in found:
            info = reply.streams.add(
                id=stream.id,
                scenario=stream.scenario,
                session=stream.session,
                method=stream.method,
                kind=stream.spec.kind,
                rule=stream.rule,
                sent=stream.sent,
                received=stream.received,
            )
            info.started_at.FromNanoseconds(int(stream.started_at * 1e9))
        return reply

    def PushMessage(self, request: Any) -> Message:
        stream = self._stream(request.id)
        body = json_format.MessageToDict(request.message) if request.HasField("message") else {}
        try:
            stream.send(body)
        except ConversionError as exc:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"PushMessage {stream.id} ({stream.method}): {exc}",
            ) from None
        except StreamEnded as exc:
            raise Refusal(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        return messages.PushMessageResponse()

    def EndStream(self, request: Any) -> Message:
        stream = self._stream(request.id)
        code = _status_code(request.code)
        try:
            stream.fail(code, request.message)
        except StreamEnded as exc:
            raise Refusal(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        log.info("admin.stream.ended", id=stream.id, method=stream.method, code=code.name)
        return messages.EndStreamResponse()

    def _stream(self, stream_id: str) -> HeldStream:
        streams = self.vserver.dispatcher.streams
        if not stream_id:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "give the id of the stream (ListStreams lists the streams held open here)",
            )
        stream = streams.get(stream_id)
        if stream is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, streams.not_found_message(stream_id))
        return stream

    def _method(self, name: str) -> str:
        method = normalize_method_name(name)
        if method not in self.vserver.catalog.methods:
            raise Refusal(grpc.StatusCode.NOT_FOUND, self.vserver.catalog.unknown_method_message(name))
        return method

    # -- virtual clocks ----------------------------------------------------------------------------

    def SetClock(self, request: Any) -> Message:
        scenario, session_id = request.scenario, request.session or DEFAULT_SESSION
        if not request.virtual:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "SetClock switches a session to virtual time (virtual: true); a session leaves it when "
                "dropped (ResetSession)",
            )
        self._require_scenario(scenario)
        clock = self.vserver.clock(scenario, session_id, switch=True)
        log.info("admin.clock.set", scenario=scenario, session=session_id)
        return _clock_state(clock)

    def AdvanceClock(self, request: Any) -> Message:
        scenario, session_id = request.scenario, request.session or DEFAULT_SESSION
        clock = self._virtual_clock(scenario, session_id)
        if request.run_until_idle:
            if request.HasField("duration"):
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT, "give either a duration or run_until_idle, not both"
                )
            moved = clock.run_until_idle()
        else:
            seconds = request.duration.ToNanoseconds() / 1e9
            if seconds < 0:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"duration: a virtual clock only moves forward; got {seconds:g} s",
                )
            before = clock.now()
            moved = clock.advance(seconds) - before
        return _clock_state(clock, moved)

    def GetClock(self, request: Any) -> Message:
        scenario, session_id = request.scenario, request.session or DEFAULT_SESSION
        self._require_scenario(scenario)
        return _clock_state(self.vserver.clock(scenario, session_id))

    def _virtual_clock(self, scenario: str, session_id: str) -> VirtualClock:
        self._require_scenario(scenario)
        clock = self.vserver.clock(scenario, session_id)
        if clock is None:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'session "{session_id}" of scenario "{scenario}" runs on wall time: switch it with '
                "SetClock(virtual: true), or give the scenario clock: virtual",
            )
        return clock

    # -- journal -------------------------------------------------------------------------------

    def GetJournal(self, request: Any) -> Message:
        wanted = self._filter(request)
        entries = self.vserver.journal.entries(*wanted, limit=request.limit or None)
        reply = messages.GetJournalResponse()
        for entry in entries:
            _fill_entry(reply.entries.add(), entry)
        return reply

    def WatchJournal(self, request: Any, context: grpc.ServicerContext) -> Iterator[Message]:
        wanted = self._filter(request)
        with self._lock:
            if self._watches >= self.watch_limit:
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._watches} journal watches are open, the most this server allows (each holds "
                    "one of its worker threads); end one, or start the server with more --max-workers",
                )
            self._watches += 1
        finished: queue.Queue[Any] = queue.Queue(maxsize=WATCH_BACKLOG)
        behind = threading.Event()

        def hear(entry: Entry) -> None:  # on the serving thread of each call: filter, hand over, return
            if wanted.admits(entry):
                try:
                    finished.put_nowait(entry)
                except queue.Full:
                    behind.set()

        journal = self.vserver.journal
        unsubscribe = journal.watch(hear)  # before reading the backlog, so no entry falls between
        context.add_callback(lambda: _wake(finished))
        log.info("admin.journal.watch", **wanted._asdict())
        try:
            sent: set[int] = set()
            if request.include_existing:
                for entry in journal.entries(*wanted):
                    sent.add(entry.seq)
                    yield _entry_message(entry)
            draining = self.vserver.draining
            while not draining.is_set() and context.is_active():
                if behind.is_set():
                    raise Refusal(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this watch fell {WATCH_BACKLOG} entries behind the calls it follows and was "
                        "ended; read faster, or narrow it by scenario, session or method",
                    )
                try:
                    item = finished.get(timeout=_WATCH_POLL)
                except queue.Empty:
                    continue
                if item is _GONE:
                    break
                if item.seq not in sent:
                    yield _entry_message(item)
        finally:
            unsubscribe()
            with self._lock:
                self._watches -= 1

    # -- messages ------------------------------------------------------------------------------

    def _filter(self, request: Any) -> JournalFilter:
        method = self._method(request.method) if request.method else None
        # Scenario names are not checked: calls naming an unknown scenario are journaled under that name.
        return JournalFilter(request.scenario or None, request.session or None, method)

    def _require_scenario(self, name: str) -> None:
        if name and name not in self.vserver.registry:
            raise Refusal(grpc.StatusCode.NOT_FOUND, self._unknown_scenario(name))

    def _loaded(self) -> str:
        return "loaded scenarios: " + (", ".join(self.vserver.registry.names()) or "none")

    def _unknown_scenario(self, name: str) -> str:
        return unknown_scenario_message(name, self.vserver.registry.names())


def compile_put(vserver: VirtualServer, text: str) -> list[CompiledScenario]:
    """The scenarios of a PutScenario text, compiled against those ``vserver`` has loaded (a cycle through
    them is refused too); ScenarioError with ``<admin>:LINE`` locations."""
    from virtsvc.scenarios.loader import compile_text

    # Names with their extends, so that a cycle through loaded scenarios is refused too.
    known = {s.name: s.extends for s in vserver.registry.scenarios()}
    return compile_text(text, vserver.catalog, origin=ORIGIN, known=known, upstreams=vserver.upstreams)


def install(registry: Registry, compiled: list[CompiledScenario]) -> None:
    """Puts the scenarios of one PutScenario in the registry at once: a call sees all of them or none."""
    if len(compiled) == 1:
        registry.put(compiled[0])
        return
    loaded = {s.name: s for s in registry.scenarios()}
    loaded.update((s.name, s) for s in compiled)
    registry.replace_all(loaded.values())


PYTHON_REFUSED = (
    f"{ORIGIN}: this text is Python: Python scenarios are accepted only from local paths (a .py file "
    "under --scenarios or [tool.virtsvc] scenarios), never through the admin API; send YAML or JSON here"
)

_PYTHON_MARKS = ("import virtsvc", "from virtsvc", "Scenario(")


def _looks_like_python(text: str) -> bool:
    """Whether text that the loader refused is a Python scenario script: it parses as Python and either
    names virtsvc or builds a Scenario, or is not YAML at all (``key: value`` lines parse as Python
    annotations, so parsing as Python alone proves nothing)."""
    import ast

    import yaml

    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes
        return False
    if any(mark in text for mark in _PYTHON_MARKS):
        return True
    try:
        list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return True
    return False


def _status_code(text: str) -> grpc.StatusCode:
    """EndStream's code: a name or a number; empty is OK."""
    name = text.strip().upper()
    if not name:
        return grpc.StatusCode.OK
    if name in grpc.StatusCode.__members__:
        return grpc.StatusCode[name]
    for member in grpc.StatusCode:
        if name.isdigit() and member.value[0] == int(name):
            return member
    hint = _text.did_you_mean(name, grpc.StatusCode.__members__, quote='"')
    raise Refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        f'EndStream: unknown status code "{text}"{hint or ";"} give a code\'s name (UNAVAILABLE) or '
        "number, or none for OK",
    )


def _clock_state(clock: VirtualClock | None, moved: float = 0.0) -> Message:
    out = messages.ClockState(virtual=clock is not None)
    now = time.time() if clock is None else clock.now()
    out.now.FromNanoseconds(round(now * 1e9))
    out.advanced.FromNanoseconds(round(moved * 1e9))
    for held in clock.pending() if clock is not None else ():
        call = out.pending.add(method=held.method)
        call.due.FromNanoseconds(round(held.due * 1e9))
        call.remaining.FromNanoseconds(max(0, round((held.due - now) * 1e9)))
    return out


def _wake(watch: queue.Queue[Any]) -> None:
    with contextlib.suppress(queue.Full):  # a full watch polls: it sees the cancel within _WATCH_POLL
        watch.put_nowait(_GONE)


def _entry_message(entry: Entry) -> Message:
    out = messages.JournalEntry()
    _fill_entry(out, entry)
    return out


def _fill_entry(out: Any, entry: Entry) -> None:
    out.seq = entry.seq
    out.scenario = entry.scenario
    version = entry.scenario_version
    if isinstance(version, bool) or not isinstance(version, (int, float)):
        if version is not None:
            out.scenario_version.string_value = str(version)
    else:  # a number stays a number: "scenarioVersion": 1
        out.scenario_version.number_value = version
    out.session = entry.session
    out.method = entry.method
    out.kind = entry.spec.kind
    out.metadata.update(dict(entry.metadata))
    requests = entry.requests()
    replies = entry.replies()
    for item in requests:
        out.requests.add().update(_as_object(item))
    for item in replies:
        out.replies.add().update(_as_object(item))
    if requests:
        out.request.CopyFrom(out.requests[0])
    if replies:
        out.reply.CopyFrom(out.replies[0])
    out.code = entry.code.name
    out.message = entry.message
    out.rule = entry.rule or ""
    out.near_miss = entry.near_miss or ""
    out.forwarded = entry.forwarded or ""
    out.started_at.FromNanoseconds(int(entry.started_at * 1e9))
    out.duration.FromNanoseconds(round(entry.duration * 1e9))
    out.matched = entry.matched
    out.headers.update(metadata_json(entry.headers))
    out.trailers.update(metadata_json(entry.trailers))
    for detail in entry.status_details():
        out.details.add().update(detail)
    out.delay.FromNanoseconds(round(entry.delay * 1e9))
    if entry.label:
        out.label = entry.label


def entry_json(entry: Entry) -> dict[str, Any]:
    """An entry as ``GetJournal`` sends it, in proto3 JSON (what ``virtsvc journal export`` writes)."""
    from virtsvc.observe.report import journal_json

    return journal_json(_entry_message(entry))


def _as_object(value: Any) -> dict[str, Any]:
    # A method taking or returning a well-known type (Timestamp, StringValue...) has a JSON form that is
    # not an object; a Struct holds it under "@value".
    return value if isinstance(value, dict) else {"@value": value}


# -- grpc wiring -------------------------------------------------------------------------------------


def _authorized(context: grpc.ServicerContext, token: str) -> bool:
    expected = token.encode()
    ok = False
    for key, value in context.invocation_metadata() or ():
        if key != "authorization" or not isinstance(value, str):
            continue
        scheme, _, credentials = value.strip().partition(" ")
        # Compare every candidate in constant time; the scheme name is case-insensitive (RFC 6750).
        ok |= scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), expected)
    return ok


def _admit(name: str, context: grpc.ServicerContext, token: str | None, closed: str | None) -> None:
    """Aborts a call to a closed admin API, or one without the token."""
    if closed is not None:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, closed)
    if token is not None and not _authorized(context, token):
        log.warning("admin.unauthenticated", method=name, peer=context.peer())
        context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_MESSAGE)


def _refusal(name: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status an admin call ends with after ``exc``: never UNKNOWN."""
    if isinstance(exc, Refusal):
        code, message = exc.code, exc.message
    elif isinstance(exc, VirtsvcError):  # ScenarioError: one located "<admin>:LINE: message" line per problem
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    else:  # a bug: say where rather than let grpc answer an opaque UNKNOWN
        log.exception("admin.failed", method=name)
        return grpc.StatusCode.INTERNAL, f"admin {name} failed: {type(exc).__name__}: {exc}"
    log.info("admin.refused", method=name, code=code.name, message=message)
    return code, message


def _guarded(name: str, behaviour: Behaviour, token: str | None, closed: str | None = None) -> GrpcBehaviour:
    def handle(request: Any, context: grpc.ServicerContext) -> Message:
        _admit(name, context, token, closed)
        try:
            return behaviour(request)
        except Exception as exc:
            code, message = _refusal(name, exc)
        context.abort(code, message)
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    return handle


def _guarded_stream(
    name: str, behaviour: WatchBehaviour, token: str | None, closed: str | None
) -> WatchBehaviour:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Message]:
        _admit(name, context, token, closed)
        try:
            yield from behaviour(request, context)
            return
        except Exception as exc:
            code, message = _refusal(name, exc)
        context.abort(code, message)

    return handle


def add_admin(server: grpc.Server, vserver: VirtualServer, token: str | None = None) -> str:
    """Serves the admin API for ``vserver`` on ``server``; returns its full service name.

    With a ``token`` (default: the server's ``admin_token``), every call must carry the metadata
    ``authorization: Bearer <token>``. Also adds the admin proto to the catalog's pool for reflection.
    """
    if token is None:
        # Secure by default: a server configured with a token never serves an open admin API.
        token = vserver.options.admin_token
    if token is not None and not token.strip():
        raise ConfigError("the admin token is empty: give a non-empty token, or none to leave admin open")
    closed = None
    host = vserver.host
    if token is None and not is_loopback(host):
        # Scenario text over the network is an attack surface: off loopback, only with a token.
        closed = (
            f"the admin API is closed: this server listens on {host}, reachable from other machines; "
            "start it with --admin-token (or VIRTSVC_ADMIN_TOKEN) to open it"
        )
    service = AdminService(vserver)
    handlers = {}
    for name, (request_class, response_class) in METHODS.items():
        if name in STREAMING:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _guarded_stream(name, getattr(service, name), token, closed),
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )
            continue
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _guarded(name, getattr(service, name), token, closed),
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ADMIN_SERVICE, handlers)])
    add_to_pool(vserver.catalog.pool)
    return ADMIN_SERVICE
