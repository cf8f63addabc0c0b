"""Test helpers: one test's view of a virtual server (its session, inline rules, channels and journal).

The pytest plugin hands these out as the ``virtual_service`` fixture; they work without pytest too::

    from virtsvc.testing.service import VirtualService

    with serve_in_process(protos="protos", scenarios="scenarios") as server:
        with VirtualService(server) as service:      # a fresh session; verified and dropped on exit
            service.use("checkout-happy")
            service.on("shop.v1.Inventory/Reserve").fail("RESOURCE_EXHAUSTED", "short")
            run_checkout(service.channel())
            service.assert_called("shop.v1.Inventory/Reserve", times=1)

Inline rules become the session's session-scoped rules: they answer this session only and are tried before
the scenario's own. With an in-process ``VirtualServer`` they are compiled here and handed to its session
store; with a ``RemoteServer`` (a sidecar) they go through the admin API as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio
from google.protobuf import json_format

from virtsvc.contracts.catalog import normalize_method_name
from virtsvc.engine.router import NO_SCENARIO, SCENARIO_HEADER, SESSION_HEADER
from virtsvc.errors import ConfigError, Problem, ScenarioError, VirtsvcError
from virtsvc.scenarios.builder import RuleBuilder, Scenario
from virtsvc.scenarios.model import Location
from virtsvc.scenarios.vocabulary import RULE_ANSWER_KEYS
from virtsvc.testing.clock import SessionClock, local_clock, remote_clock
from virtsvc.testing.streams import LocalStreams, OpenStream, RemoteStreams, StreamDriver

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from virtsvc.contracts.catalog import Catalog
    from virtsvc.engine.journal import Entry
    from virtsvc.server.virtual_server import VirtualServer

__all__ = ["CallRecord", "InlineRule", "OpenStream", "RemoteServer", "VirtualService", "new_session_id"]

Metadata = tuple[tuple[str, str], ...]

_INTERNAL_FILES = {
    os.path.normcase(os.path.abspath(f))
    for f in (__file__, sys.modules[RuleBuilder.__module__].__file__ or "")
}
# Keys that give a rule its answer; a rule without one is unfinished (``.on(...)`` alone).
_LOCATED_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<message>.*)$")


def new_session_id(label: str = "") -> str:
    """A session id unique across processes: the xdist worker, a hash of ``label`` and a random part."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    digest = hashlib.blake2b(label.encode(), digest_size=4).hexdigest()
    return f"pytest-{worker}-{digest}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class CallRecord:
    """One call of the session, as the server's journal recorded it; messages as proto3 JSON dicts."""

    method: str
    request: Any
    requests: list[Any]
    reply: Any
    replies: list[Any]
    metadata: dict[str, str]
    code: grpc.StatusCode
    message: str = ""
    rule: str | None = None  # "file:line" of the rule that answered
    near_miss: str | None = None  # why no rule answered
    scenario: str = ""
    session: str = ""
    seq: int = 0
    delay: float = 0.0  # seconds of simulated latency the call waited (time scale applied)

    @property
    def matched(self) -> bool:
        return self.near_miss is None

    @classmethod
    def from_entry(cls, entry: Entry) -> CallRecord:
        requests, replies = entry.requests(), entry.replies()
        return cls(
            method=entry.method,
            request=requests[0] if requests else None,
            requests=requests,
            reply=replies[0] if replies else None,
            replies=replies,
            metadata=dict(entry.metadata),
            code=entry.code,
            message=entry.message,
            rule=entry.rule,
            near_miss=entry.near_miss,
            scenario=entry.scenario,
            session=entry.session,
            seq=entry.seq,
            delay=entry.delay,
        )


# -- servers ------------------------------------------------------------------------------------------


class RemoteServer:
    """A virtual server running elsewhere (a sidecar), driven through its admin API.

    ``catalog`` (or a function loading it on first use) gives the message classes of its services, for
    tests that build requests from them; the admin API itself needs none.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        default_scenario: str | None = None,
        catalog: Catalog | Callable[[], Catalog] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.address = address
        self.default_scenario = default_scenario
        self.timeout = timeout
        self._token = token
        self._catalog = catalog
        self._channel: grpc.Channel | None = None
        self._admin: Any = None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise ConfigError(
                f"no protos are configured for the virtual server at {self.address}: set virtsvc_protos "
                "(or virtsvc_descriptors, or [tool.virtsvc] protos) to get its message classes"
            )
        if callable(self._catalog):
            self._catalog = self._catalog()
        return self._catalog

    @property
    def admin(self) -> Any:
        """An ``AdminClient`` on a channel to the server (opened on first use)."""
        if self._admin is None:
            try:
                from virtsvc.admin import AdminClient
            except ImportError as exc:  # pragma: no cover - only while the admin package is missing
                raise ConfigError(f"this virtsvc has no admin client ({exc})") from None
            self._channel = grpc.insecure_channel(self.address)
            self._admin = AdminClient(self._channel, self._token, timeout=self.timeout)
        return self._admin

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the server answers its admin API; ConfigError saying why when it does not."""
        self.admin  # noqa: B018 - opens the channel
        assert self._channel is not None
        wait = self.timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise ConfigError(
                f"cannot reach the virtual server at {self.address} within {wait:g} s: is it running "
                "(`virtsvc serve`) and listening there?"
            ) from None
        try:
            self.admin.call("ListScenarios")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ConfigError(
                    f"the server at {self.address} does not serve the virtsvc admin API "
                    "(virtsvc.admin.v1.Admin), which the tests need to manage their sessions"
                ) from None
            raise ConfigError(f"the virtual server at {self.address}: {_rpc_text(exc)}") from None

    def close(self) -> None:
        channel, self._channel, self._admin = self._channel, None, None
        if channel is not None:
            channel.close()

    def __repr__(self) -> str:
        return f"RemoteServer({self.address!r})"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); ValueError for anything else."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:50051), got {address!r}")
    return host.strip("[]"), int(port)


def _rpc_text(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"


class _Backend(Protocol):
    address: str
    supports_handlers: bool

    @property
    def default_scenario(self) -> str | None: ...

    def scenario_names(self) -> list[str]: ...

    def put_rules(self, scenario: str, session: str, rules: list[dict[str, Any]]) -> None: ...

    def clear_rules(self, scenario: str, session: str) -> None: ...

    def records(self, session: str, method: str | None) -> list[CallRecord]: ...

    def reset(self, scenario: str, session: str) -> None: ...

    def end(self, scenario: str, session: str, label: str) -> None:
        """Drops the session's state and rules but keeps its journal, labelled, until the session's TTL."""
        ...

    @property
    def streams(self) -> StreamDriver:
        """The streams held open for the test (``stream: [..., {open: true}]``)."""
        ...

    def known_method(self, method: str) -> str:
        """The full name of a method the server serves; ValueError naming the closest ones."""
        ...

    def clock(self, scenario: str, session: str) -> SessionClock:
        """Switches the session to virtual time; its clock."""
        ...


class _InProcess:
    """Inline rules compiled here and assigned to the session in the server's store."""

    supports_handlers = True

    def __init__(self, server: VirtualServer) -> None:
        self.server = server
        self.address = server.address
        self.streams: StreamDriver = LocalStreams(server)

    def known_method(self, method: str) -> str:
        return _known_method(self.server.catalog, method)

    @property
    def default_scenario(self) -> str | None:
        return self.server.default_scenario

    def scenario_names(self) -> list[str]:
        return self.server.registry.names()

    def put_rules(self, scenario: str, session: str, rules: list[dict[str, Any]]) -> None:
        from virtsvc.engine.store import RuleSet
        from virtsvc.scenarios.loader import compile_rules

        # A stable key prefix: re-putting the whole list keeps the times/sequence counters of the rules
        # already there (their index does not change, rules are only ever appended).
        compiled = compile_rules(
            rules, self.server.catalog, scenario=scenario, origin="<inline>", key_prefix="inline:"
        )
        self.server.store.put_rules(scenario, session, RuleSet(compiled, source=rules))

    def clear_rules(self, scenario: str, session: str) -> None:
        self.server.store.clear_rules(scenario, session)

    def records(self, session: str, method: str | None) -> list[CallRecord]:
        if method is not None:
            method = _known_method(self.server.catalog, method)
        return [CallRecord.from_entry(e) for e in self.server.journal.entries(session=session, method=method)]

    def reset(self, scenario: str, session: str) -> None:
        self.server.store.reset(scenario, session)
        self.server.journal.clear(scenario, session)  # calls refused before a session existed

    def end(self, scenario: str, session: str, label: str) -> None:
        # Kept before the drop, whose event would otherwise clear it.
        self.server.journal.keep(scenario, session, label, self.server.options.session_ttl)
        self.server.store.reset(scenario, session)

    def clock(self, scenario: str, session: str) -> SessionClock:
        return local_clock(self.server, scenario, session)


class _Remote:
    """Inline rules sent as JSON through the admin API of a server in another process."""

    supports_handlers = False

    def __init__(self, server: RemoteServer) -> None:
        self.server = server
        self.address = server.address
        # "file:line in the JSON text" -> "file:line in the test", per session; see put_rules.
        self._text_lines: dict[str, dict[str, str]] = {}
        self.streams: StreamDriver = RemoteStreams(lambda: server.admin, server.address, self._relocated)

    def _relocated(self, session: str, text: str) -> str:
        mapping = self._text_lines.get(session)
        return _relocate(text, mapping) if mapping else text

    def known_method(self, method: str) -> str:
        # The server says which methods it serves (ListStreams answers NOT_FOUND naming the closest).
        return normalize_method_name(method)

    @property
    def default_scenario(self) -> str | None:
        return self.server.default_scenario

    def _call(self, method: str, **fields: Any) -> Any:
        try:
            return self.server.admin.call(method, **fields)
        except grpc.RpcError as exc:
            raise VirtsvcError(
                f"the virtual server at {self.address} refused {method}: {_rpc_text(exc)}"
            ) from None

    def scenario_names(self) -> list[str]:
        return sorted(s.name for s in self._call("ListScenarios").scenarios)

    def put_rules(self, scenario: str, session: str, rules: list[dict[str, Any]]) -> None:
        # One rule per line, rule i on line i + 2, sent without its "$location": the server locates rule i
        # at "<admin>:{i + 2}" in everything it says (the rule that answered, near misses, problems), a
        # place no test file can be confused with, which `_relocate` maps back to the test's line.
        from virtsvc.admin.api import ORIGIN

        lines = [
            json.dumps({k: v for k, v in rule.items() if k != "$location"}, default=_json_default)
            for rule in rules
        ]
        text = '{"rules": [\n' + ",\n".join(lines) + "\n]}"
        positions = {f"{ORIGIN}:{index + 2}": str(rule["$location"]) for index, rule in enumerate(rules)}
        try:
            self.server.admin.call("PutSessionRules", scenario=scenario, session=session, text=text)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ScenarioError(_problems(exc.details() or "", positions)) from None
            raise VirtsvcError(
                f"the virtual server at {self.address} refused the inline rules: {_rpc_text(exc)}"
            ) from None
        self._text_lines[session] = positions

    def clear_rules(self, scenario: str, session: str) -> None:
        self._call("ClearSessionRules", scenario=scenario, session=session)

    def records(self, session: str, method: str | None) -> list[CallRecord]:
        try:
            reply = self.server.admin.call("GetJournal", session=session, method=method or "")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and method:
                raise ValueError(exc.details()) from None
            raise VirtsvcError(
                f"the virtual server at {self.address} refused GetJournal: {_rpc_text(exc)}"
            ) from None
        records = [_record(e) for e in reply.entries]
        mapping = self._text_lines.get(session)
        if mapping:
            records = [
                dataclasses.replace(
                    r,
                    rule=_relocate(r.rule, mapping) if r.rule is not None else None,
                    near_miss=_relocate(r.near_miss, mapping) if r.near_miss is not None else None,
                    message=_relocate(r.message, mapping),
                )
                for r in records
            ]
        return records

    def reset(self, scenario: str, session: str) -> None:
        self._reset(scenario, session)

    def clock(self, scenario: str, session: str) -> SessionClock:
        return remote_clock(self.server.admin, self.address, scenario, session)

    def end(self, scenario: str, session: str, label: str) -> None:
        self._reset(scenario, session, keep_journal=True, label=label)

    def _reset(self, scenario: str, session: str, **keep: Any) -> None:
        self._text_lines.pop(session, None)
        try:
            self.server.admin.call("ResetSession", scenario=scenario, session=session, **keep)
        except grpc.RpcError as exc:
            # NOT_FOUND: a scenario deleted meanwhile; INVALID_ARGUMENT for the empty scenario: it held no
            # session rules. Either way there is nothing to drop.
            nothing = exc.code() == grpc.StatusCode.NOT_FOUND or (
                not scenario and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            )
            if not nothing:
                raise VirtsvcError(
                    f"the virtual server at {self.address} refused ResetSession: {_rpc_text(exc)}"
                ) from None


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()  # proto3 JSON writes bytes as base64
    if callable(value):
        raise TypeError("a Python handler cannot be sent to a server in another process")
    raise TypeError(f"{type(value).__name__} is not JSON data")


def _relocate(text: str, positions: Mapping[str, str]) -> str:
    """``text`` with the places of the rules in the sent text ("<admin>:3") replaced by the tests' lines."""
    from virtsvc.admin.api import ORIGIN

    if f"{ORIGIN}:" not in text:
        return text
    return re.sub(re.escape(ORIGIN) + r":\d+", lambda m: positions.get(m[0], m[0]), text)


def _problems(text: str, positions: Mapping[str, str]) -> list[Problem]:
    """The server's "file:line: message" lines as problems, text lines mapped back to the test's."""
    out = []
    for line in text.splitlines():
        match = _LOCATED_LINE.match(line)
        if match:
            where = positions.get(f"{match['file']}:{match['line']}", f"{match['file']}:{match['line']}")
            file, _, number = where.rpartition(":")
            out.append(Problem(file, int(number), _relocate(match["message"], positions)))
        elif line.strip():
            out.append(Problem("<inline>", 0, line.strip()))
    return out or [Problem("<inline>", 0, "the server refused the rules")]


def _plain_json(value: Any) -> Any:
    """Struct numbers are doubles: give integral ones back as ints, as proto3 JSON writes int32 fields."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _struct(message: Message) -> Any:
    data = _plain_json(json_format.MessageToDict(message))
    # Non-object JSON forms (well-known types) travel as {"@value": ...}.
    return data["@value"] if isinstance(data, dict) and set(data) == {"@value"} else data


def _record(entry: Any) -> CallRecord:
    requests = [_struct(r) for r in entry.requests]
    replies = [_struct(r) for r in entry.replies]
    return CallRecord(
        method=entry.method,
        request=requests[0] if requests else None,
        requests=requests,
        reply=replies[0] if replies else None,
        replies=replies,
        metadata=dict(entry.metadata),
        code=grpc.StatusCode.__members__.get(entry.code, grpc.StatusCode.UNKNOWN),
        message=entry.message,
        rule=entry.rule or None,
        near_miss=entry.near_miss or None,
        scenario=entry.scenario,
        session=entry.session,
        seq=entry.seq,
        delay=entry.delay.ToNanoseconds() / 1e9,
    )


def _known_method(catalog: Catalog, method: str) -> str:
    try:
        return catalog.method(method).full_name
    except KeyError:
        raise ValueError(catalog.unknown_method_message(method)) from None


# -- inline rules -------------------------------------------------------------------------------------


class InlineRule(RuleBuilder):
    """A rule of one test's session: the ``Scenario`` rule builder, sent to the server on every change."""

    def __init__(self, data: dict[str, Any], location: Location, owner: VirtualService) -> None:
        super().__init__(data, location)
        self._owner = owner

    @property
    def method(self) -> str:
        return str(self.data.get("method", ""))

    @property
    def finished(self) -> bool:
        return any(k in self.data for k in RULE_ANSWER_KEYS)

    def handler(self, fn: Callable[..., Any]) -> InlineRule:
        __tracebackhide__ = True
        backend = self._owner._backend
        if not backend.supports_handlers:
            self._owner._rules.remove(self)
            raise ConfigError(
                f"inline rule at {self.location}: .handler() runs a Python function inside the virtual "
                f"server, but this test talks to a server in another process ({backend.address}, "
                "--virtsvc-address) that cannot run it; answer with .reply(), .fail(), .sequence() or "
                ".stream() there, or run the tests with the in-process server"
            )
        super().handler(fn)  # which calls _changed
        return self

    def _changed(self) -> InlineRule:
        __tracebackhide__ = True
        try:
            self._owner._sync()
        except BaseException as exc:
            # The server kept the previous rules; forget this one so teardown does not report it again.
            if self in self._owner._rules:
                self._owner._rules.remove(self)
            if isinstance(exc, VirtsvcError):
                # The message says what is wrong and where; the frames inside virtsvc would only hide it.
                raise exc.with_traceback(None) from None
            raise
        return self

    def __repr__(self) -> str:
        return f"<inline rule {self.method!r} at {self.location}>"


# -- the service ----------------------------------------------------------------------------------------


class VirtualService:
    """One test's session on a virtual server: scenario choice, inline rules, channels and its calls.

    ``server`` is an in-process ``VirtualServer``, a ``RemoteServer`` or the ``HOST:PORT`` of a server
    with the admin API. ``root``: file paths in messages are shown relative to it (default: the cwd).
    ``fixture``: the name the test knows this service by (the pytest plugin's ``virtual_service``); messages
    then say what to do in the test rather than how to call or start the server.
    """

    def __init__(
        self,
        server: VirtualServer | RemoteServer | str,
        session: str | None = None,
        *,
        fail_on_unmatched: bool = True,
        root: str | Path | None = None,
        fixture: str | None = None,
    ) -> None:
        if isinstance(server, str):
            server = RemoteServer(server)
        self.server = server
        self._backend: _Backend = _Remote(server) if isinstance(server, RemoteServer) else _InProcess(server)
        self.session = session or new_session_id()
        self.scenario: str | None = None
        self.fail_on_unmatched = fail_on_unmatched
        self._root = Path(root) if root is not None else Path.cwd()
        self._fixture = fixture
        self._builder = Scenario("inline")  # reused for its rule normalisation only
        self._rules: list[InlineRule] = []
        self._homes: set[str] = {self._home}
        self._seen: set[int] = set()  # journal seqs already checked for unmatched calls
        self._channels: list[grpc.Channel] = []
        self._aio_channels: list[tuple[grpc.aio.Channel, asyncio.AbstractEventLoop | None]] = []
        self._clocks: dict[str, SessionClock] = {}  # by scenario: the clock of the session there
        self._closed = False

    # -- choosing what answers ---------------------------------------------------------------------

    @property
    def _home(self) -> str:
        """The scenario whose session holds the inline rules."""
        return self.scenario or self._backend.default_scenario or NO_SCENARIO

    @property
    def address(self) -> str:
        return self._backend.address

    @property
    def clock(self) -> SessionClock:
        """The session's virtual clock; the first use switches the session to virtual time (see
        ``virtsvc.testing.clock``). Choose the scenario (``use``) first: the clock is that session's."""
        home = self._home
        clock = self._clocks.get(home)
        if clock is None:
            clock = self._clocks[home] = self._backend.clock(home, self.session)
        return clock

    def use(self, name: str) -> VirtualService:
        """Answers this session's calls from scenario ``name``; inline rules declared so far follow it."""
        __tracebackhide__ = True
        names = self._backend.scenario_names()
        if name not in names:
            from virtsvc.engine.router import unknown_scenario_message

            raise ConfigError(unknown_scenario_message(name, names))
        old = self._home
        self.scenario = name
        new = self._home
        self._homes.add(new)
        if old != new and any(r.finished for r in self._rules):
            self._backend.clear_rules(old, self.session)
            self._sync()
        return self

    def on(
        self,
        method: str,
        when: Mapping[str, Any] | None = None,
        times: int | None = None,
        priority: int = 0,
        per_message: bool = False,
        id: str | None = None,
    ) -> InlineRule:
        """Starts an inline rule for ``method``; finish it with ``.reply``, ``.fail``, ``.stream``...

        Inline rules answer this session only, before the scenario's rules (``when``, ``times``,
        ``priority``, ``per_message``, ``id`` as in scenario files).
        """
        data = self._builder.on(
            method, when=when, times=times, priority=priority, per_message=per_message, id=id
        ).data
        rule = InlineRule(data, self._caller(), self)
        self._rules.append(rule)
        return rule

    @property
    def rules(self) -> tuple[InlineRule, ...]:
        return tuple(self._rules)

    def _sync(self) -> None:
        __tracebackhide__ = True
        data = [{**r.data, "$location": str(r.location)} for r in self._rules if r.finished]
        if data:
            self._backend.put_rules(self._home, self.session, data)
        else:
            self._backend.clear_rules(self._home, self.session)

    def _caller(self) -> Location:
        frame = sys._getframe(1)
        while frame.f_back is not None and os.path.normcase(frame.f_code.co_filename) in _INTERNAL_FILES:
            frame = frame.f_back
        path = Path(frame.f_code.co_filename)
        try:
            shown = path.resolve().relative_to(self._root.resolve()).as_posix()
        except ValueError:
            shown = str(path)
        return Location(shown, frame.f_lineno)

    # -- calling ------------------------------------------------------------------------------------

    @property
    def metadata(self) -> Metadata:
        """The pairs that route a call to this session (and its scenario): attach them, or hand them to
        the service under test to propagate."""
        pairs: list[tuple[str, str]] = [(SESSION_HEADER, self.session)]
        if self._home:
            pairs.append((SCENARIO_HEADER, self._home))
        return tuple(pairs)

    def channel(self) -> grpc.Channel:
        """A channel to the server adding ``metadata`` to every call; closed by ``close()``."""
        base = grpc.insecure_channel(self.address)
        self._channels.append(base)
        return grpc.intercept_channel(base, _Interceptor(self))

    def aio_channel(self) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel adding ``metadata`` to calls of all four kinds.

        Closed by ``close()`` while its event loop is still open; ``async with`` closes it sooner.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        interceptors: list[grpc.aio.ClientInterceptor] = [
            _AioUnaryUnary(self),
            _AioUnaryStream(self),
            _AioStreamUnary(self),
            _AioStreamStream(self),
        ]
        channel = grpc.aio.insecure_channel(self.address, interceptors=interceptors)
        self._aio_channels.append((channel, loop))
        return channel

    def _merged(self, metadata: Any) -> list[tuple[str, Any]]:
        pairs = list(metadata or ())
        present = {k for k, _ in pairs}
        # Metadata the caller set explicitly wins (a test may aim one call at another session).
        return pairs + [(k, v) for k, v in self.metadata if k not in present]

    # -- what happened ------------------------------------------------------------------------------

    def calls(self, method: str | None = None) -> list[CallRecord]:
        """The calls of this session (of ``method`` only, if given), oldest first."""
        return self._backend.records(self.session, method)

    def streams(self, method: str, *, at_least: int = 1, timeout: float = 5.0) -> list[OpenStream]:
        """This session's calls of ``method`` held open for the test (``stream: [..., {open: true}]``),
        oldest first, each an ``OpenStream`` with ``.send(message)``, ``.fail(code, message)`` and
        ``.close()``. Waits up to ``timeout`` seconds for ``at_least`` of them (a client's call may still be
        on its way); AssertionError, saying what the method's calls did, when fewer are open by then."""
        __tracebackhide__ = True
        wanted = self._backend.known_method(method)
        found = self._backend.streams.listed(self.session, wanted, at_least, timeout)
        if len(found) >= at_least:
            return found
        made = self.calls(wanted)
        ended = ", ".join(f"{c.code.name}" + (f" ({c.message})" if c.message else "") for c in made)
        history = f"its calls that have ended: {ended}" if made else "none of its calls has ended"
        raise AssertionError(
            f"expected {_count(at_least, 'open stream')} of {wanted} within {timeout:g} s, found "
            f"{len(found)}; {history}. A stream is held open by a rule whose stream ends with "
            f"{{open: true}} (.stream(items, open=True)), from the moment its call arrives "
            f"(session {self.session})"
        )

    def assert_called(self, method: str, times: int | None = None) -> None:
        """AssertionError unless ``method`` was called (exactly ``times`` times, if given)."""
        __tracebackhide__ = True
        wanted = normalize_method_name(method)
        made = self.calls(method)
        if (times is None and made) or (times is not None and len(made) == times):
            return
        expected = "at least once" if times is None else _count(times, "time")
        everything = self.calls()
        if everything:
            counts = collections.Counter(c.method for c in everything)
            listed = ", ".join(f"{m} ({n})" for m, n in counts.items())
            seen = f"calls in this session: {listed}"
        else:
            seen = "no calls were made in this session"
        raise AssertionError(
            f"expected {wanted} to be called {expected}, but it was called {_count(len(made), 'time')}; "
            f"{seen} (session {self.session})"
        )

    def unmatched(self, *, new_only: bool = False) -> list[CallRecord]:
        """Calls that no rule answered; ``new_only``: only those not returned by an earlier check."""
        out = [c for c in self.calls() if not c.matched and not (new_only and c.seq in self._seen)]
        self._seen.update(c.seq for c in out)
        return out

    def unmatched_text(self, call: CallRecord) -> str:
        """Why ``call`` matched no rule, in the words of this service's user."""
        near_miss = call.near_miss or ""
        if self._fixture and near_miss.startswith(_NO_SCENARIO_PREFIX):
            _, sep, loaded = near_miss.partition(_LOADED_PREFIX)
            near_miss = (
                f"no scenario selected for this test's session: call {self._fixture}.use(NAME), declare "
                f"inline rules with {self._fixture}.on(METHOD), or set virtsvc_default_scenario"
                + (f"; {_LOADED_PREFIX}{loaded}" if sep else "")
            )
        return _unmatched_text(dataclasses.replace(call, near_miss=near_miss))

    def rule_problems(self) -> list[str]:
        """Unfinished inline rules, and those declared with ``times=`` that did not answer that often."""
        out = []
        records = None
        declared: dict[str, list[InlineRule]] = {}
        for rule in self._rules:
            if not rule.finished:
                out.append(
                    f"inline rule at {rule.location} for {rule.method} has no answer: finish it with "
                    ".reply(), .fail(), .stream(), .sequence() or .handler()"
                )
            elif isinstance(rule.data.get("times"), int):
                declared.setdefault(str(rule.location), []).append(rule)
        for location, rules in declared.items():
            records = self.calls() if records is None else records
            answered = sum(1 for c in records if c.rule == location)
            times = sum(int(r.data["times"]) for r in rules)
            if answered < times:
                methods = ", ".join(dict.fromkeys(r.method for r in rules))
                out.append(
                    f"inline rule at {location} for {methods} was declared times={times} but answered "
                    f"{_count(answered, 'call')}"
                )
        return out

    def problems(self, *, new_only: bool = False, rules: bool = True) -> list[str]:
        """Everything ``verify`` would report, one text per problem."""
        out = []
        if self.fail_on_unmatched:
            for call in self.unmatched(new_only=new_only):
                out.append(self.unmatched_text(call))
        if rules:
            out.extend(self.rule_problems())
        return out

    def verify(self) -> None:
        """AssertionError listing unmatched calls and unused ``times=`` rules."""
        __tracebackhide__ = True
        problems = self.problems()
        if problems:
            raise AssertionError(self.format_problems(problems))

    def format_problems(self, problems: Sequence[str], hint: str = "") -> str:
        head = (
            f"virtsvc: {problems[0]}"
            if len(problems) == 1
            else f"virtsvc: {len(problems)} problems in this test's session:\n"
            + "\n".join("- " + p.replace("\n", "\n  ") for p in problems)
        )
        return head + (f"\n{hint}" if hint else "") + f"\n(session {self.session})"

    # -- ending -------------------------------------------------------------------------------------

    def close(self, *, keep_journal: bool = False, label: str = "") -> None:
        """Closes the channels and drops the session (its state, rules and journal) from the server.

        With ``keep_journal``, its journal stays readable, each entry labelled ``label`` (the pytest plugin:
        the test's node id), until the session's TTL has passed or the journal's bound drops it: so that a
        report at the end of a run (``virtsvc report``, ``--virtsvc-report``) sees every test's calls.
        """
        if self._closed:
            return
        self._closed = True
        for channel in self._channels:
            channel.close()
        for aio_channel, loop in self._aio_channels:
            if loop is not None and not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(aio_channel.close())
            else:
                # Its event loop is gone (pytest-asyncio closes it before sync fixtures tear down): close
                # the core channel directly, as grpc.aio.Channel.__del__ would.
                core = getattr(aio_channel, "_channel", None)
                if core is not None and not core.closed():
                    core.close()
        homes = set(self._homes)
        try:
            homes.update(c.scenario for c in self.calls())
        finally:
            for scenario in homes:
                if keep_journal:
                    self._backend.end(scenario, self.session, label)
                else:
                    self._backend.reset(scenario, self.session)

    def __enter__(self) -> VirtualService:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        __tracebackhide__ = True
        try:
            if exc_type is None:
                self.verify()
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"<VirtualService session={self.session!r} scenario={self.scenario!r} at {self.address}>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


_NO_SCENARIO_PREFIX = "no scenario selected:"  # the router's FAILED_PRECONDITION, when a call names none
_LOADED_PREFIX = "loaded scenarios: "


def _unmatched_text(call: CallRecord) -> str:
    return f"a call to {call.method} matched no rule (answered {call.code.name}):\n  " + (
        call.near_miss or ""
    ).replace("\n", "\n  ")


# -- interceptors ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any = field(default=None)


class _Interceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the service's metadata, read at call time so a later ``.use()`` applies to open channels."""

    def __init__(self, service: VirtualService) -> None:
        self._service = service

    def _details(self, details: Any) -> _Details:
        return _Details(
            details.method,
            details.timeout,
            self._service._merged(details.metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return continuation(self._details(client_call_details), requests)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return continuation(self._details(client_call_details), requests)


class _AioBase:
    def __init__(self, service: VirtualService) -> None:
        self._service = service

    def _details(self, details: Any) -> grpc.aio.ClientCallDetails:
        merged = self._service._merged(details.metadata)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*merged),
            details.credentials,
            details.wait_for_ready,
        )


class _AioUnaryUnary(_AioBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)
