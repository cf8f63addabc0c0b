"""The ``Scenario`` builder: scenarios written in Python instead of YAML.

A builder records plain data in exactly the shape of a YAML rule (``{"method": ..., "when": ..., "reply":
...}``), plus the ``file:line`` of the call that wrote it. That data is validated and compiled by the same
code as scenario files, so a mistake is reported at the script's line with the same message::

    from virtsvc import Scenario
    from virtsvc.scenarios.builder import fail

    scenario = Scenario("checkout-happy", version=3)
    scenario.on("shop.v1.Inventory/Reserve", when={"request": {"sku": "ABC-1"}}).reply(
        {"reservation_id": "r-{{ request.sku }}"}, delay="25ms"
    )
    scenario.on("shop.v1.Payments/Charge").sequence(
        [fail("UNAVAILABLE", "try later"), {"charge_id": "c-1"}]
    )

    @scenario.handler("shop.v1.Orders/GetOrder")
    def get_order(request, context):
        return {"order_id": request.order_id, "state": "SHIPPED"}

Nothing is validated when a rule is written: ``virtsvc check`` (or loading the scenario) reports every
problem at once, located at the ``scenario.on(...)`` line.
"""

from __future__ import annotations

import datetime
import enum
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from virtsvc.scenarios.model import Location
from virtsvc.scenarios.vocabulary import STEP_KEYS

__all__ = ["STEP_KEYS", "RuleBuilder", "Scenario", "fail", "rule", "status", "step"]

F = TypeVar("F", bound=Callable[..., Any])

#: The keys of a step. A dict made only of these keys is a step; any other dict is a reply body.

_MAX_DEPTH = 100
_HERE = __file__


class Scenario:
    """A scenario built in Python; module-level instances of a script are what the loader collects.

    ``name`` follows the file format's pattern (``[a-z0-9][a-z0-9._-]*``); ``extends`` names (or is) a
    scenario whose rules apply after this one's own; ``unmatched`` is the status of calls no rule answers
    (a code, or ``status(code, message)``); ``clock="virtual"`` runs its sessions on virtual time;
    ``data`` its data collections, as under ``data:`` in a file.
    """

    def __init__(
        self,
        name: str,
        *,
        version: int | str | None = None,
        description: str = "",
        extends: str | Scenario | None = None,
        unmatched: Any = None,
        clock: str = "wall",
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.clock = clock
        self.data = None if data is None else _plain(data)
        self.unmatched = None if unmatched is None else _status_value(unmatched)
        self.version = version
        self.description = description
        self.extends = extends.name if isinstance(extends, Scenario) else extends
        self.location = _caller()
        self._rules: list[RuleBuilder] = []

    def on(
        self,
        method: str,
        *,
        when: Mapping[str, Any] | None = None,
        times: int | None = None,
        priority: int = 0,
        per_message: bool = False,
        id: str | None = None,
    ) -> RuleBuilder:
        """Starts a rule for ``method`` (``pkg.Svc/Method``); finish it with ``.reply``, ``.fail``....

        ``per_message``: a bidi rule matched against, and answering, each incoming message on its own.
        ``id`` names the rule for effects (``.put`` replaces, ``.remove`` removes by id)."""
        built = RuleBuilder(_rule_data(method, id, when, times, priority, per_message), _caller())
        self._rules.append(built)
        return built

    def handler(
        self,
        method: str,
        *,
        when: Mapping[str, Any] | None = None,
        times: int | None = None,
        priority: int = 0,
    ) -> Callable[[F], F]:
        """A decorator: ``fn(request, context)`` answers the calls the rule matches.

        The function gets the decoded request message (for client-streaming and bidi methods, an iterator
        of them) and returns the reply as a message or a proto3 JSON dict; see the handler docs.
        """
        built = RuleBuilder(_rule_data(method, None, when, times, priority, False), _caller())
        self._rules.append(built)

        def register(fn: F) -> F:
            built.handler(fn)
            return fn

        return register

    @property
    def rules(self) -> tuple[RuleBuilder, ...]:
        return tuple(self._rules)

    def rules_data(self, *, handlers: bool = True, locations: bool = False) -> list[dict[str, Any]]:
        """The rules as YAML-shaped plain data (a copy), in the order they were written.

        ``locations`` adds ``"$location": "file:line"`` to each rule, so a remote server reports problems
        at the script's lines. With ``handlers=False`` (data meant for JSON), a handler rule raises
        ValueError: a Python function cannot run in another process.
        """
        out = []
        for rule in self._rules:
            data = dict(rule.data)
            if "handler" in data and not handlers:
                raise ValueError(
                    f"the rule at {rule.location} has a Python handler, which cannot be sent to a remote "
                    "server; use reply/fail/sequence there, or run the server in-process"
                )
            if locations:
                data["$location"] = str(rule.location)
            out.append(data)
        return out

    def to_data(self, *, handlers: bool = True, locations: bool = False) -> dict[str, Any]:
        """The whole scenario as a YAML-shaped document (``scenario:``, ``version:``, ``rules:``...)."""
        doc: dict[str, Any] = {"scenario": self.name}
        if self.version is not None:
            doc["version"] = self.version
        if self.description:
            doc["description"] = self.description
        if self.extends is not None:
            doc["extends"] = self.extends
        if self.unmatched is not None:
            doc["unmatched"] = self.unmatched
        if self.clock != "wall":
            doc["clock"] = self.clock
        if self.data is not None:
            doc["data"] = self.data
        if locations:
            doc["$location"] = str(self.location)
        doc["rules"] = self.rules_data(handlers=handlers, locations=locations)
        return doc

    def __repr__(self) -> str:
        return f"Scenario({self.name!r}, rules={len(self._rules)}, at {self.location})"


class RuleBuilder:
    """One rule being written. Each method sets one behaviour and returns the builder.

    Setting the same key twice raises ValueError (start another rule instead); conflicting behaviours
    (``.reply`` and ``.fail`` on one rule) are recorded and reported by validation, like in a YAML file.

    Items of ``.stream``, ``.sequence`` and ``.each_request``: a dict whose keys are all step keys
    (``reply``, ``status``, ``delay``, ``headers``, ``trailers``, ``fault``, ``stream``) is a step, as in
    YAML; any other dict, or a protobuf message, is a reply body (so ``{"sku": "A"}`` means
    ``{"reply": {"sku": "A"}}``). A body whose only fields are named like step keys must be wrapped:
    ``{"reply": {"status": "shipped"}}``. The helpers ``step()`` and ``fail()`` build steps.
    """

    def __init__(self, data: dict[str, Any], location: Location) -> None:
        self.data = data
        self.location = location

    def _set(self, key: str, value: Any) -> None:
        if key in self.data:
            raise ValueError(
                f"this rule already has {key!r} (set at {self.location}); start another rule with "
                "scenario.on(...) for another answer"
            )
        self.data[key] = value

    def _extras(self, headers: Any, trailers: Any, delay: Any) -> None:
        if headers is not None:
            self._set("headers", _plain(headers))
        if trailers is not None:
            self._set("trailers", _plain(trailers))
        if delay is not None:
            self._set("delay", _delay(delay))

    def reply(
        self,
        body: Mapping[str, Any] | Message | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        trailers: Mapping[str, str] | None = None,
        delay: Any = None,
    ) -> RuleBuilder:
        """Answers with ``body`` (proto3 JSON whose strings may be templates, or a message)."""
        self._set("reply", _body(body))
        self._extras(headers, trailers, delay)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def replies(self, bodies: Sequence[Mapping[str, Any] | Message], *, delay: Any = None) -> RuleBuilder:
        """A per-message rule's answers by position: message i of the bidi call gets ``bodies[i]``."""
        self._set("replies", [_body(b) for b in bodies])
        self._extras(None, None, delay)
        __tracebackhide__ = True
        return self._changed()

    def fail(
        self,
        code: str | int | grpc.StatusCode,
        message: str = "",
        details: Sequence[Mapping[str, Any] | Message] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        trailers: Mapping[str, str] | None = None,
        delay: Any = None,
    ) -> RuleBuilder:
        """Fails the call with a status; ``details`` are rich error messages (``{"@type": ...}`` dicts)."""
        self._set("status", _make_status(code, message, details))
        self._extras(headers, trailers, delay)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def stream(
        self,
        items: Iterable[Any] = (),
        status: Any = None,
        *,
        open: bool = False,  # the file format's word: stream: [..., {open: true}]
        headers: Mapping[str, str] | None = None,
        trailers: Mapping[str, str] | None = None,
        delay: Any = None,
    ) -> RuleBuilder:
        """Streams ``items`` (bodies or ``{"reply":..., "delay":...}`` steps), then ``status`` (OK); with
        ``open``, then holds the stream open for the test to drive (``virtual_service.streams(method)``)."""
        self._set("stream", [_item(i) for i in items] + ([{"open": True}] if open else []))
        if status is not None:
            self._set("status", _status_value(status))
        self._extras(headers, trailers, delay)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def sequence(
        self,
        items: Iterable[Any],
        after: str = "repeat_last",
        *,
        headers: Mapping[str, str] | None = None,
        trailers: Mapping[str, str] | None = None,
        delay: Any = None,
    ) -> RuleBuilder:
        """Answers successive calls of a session with successive items; ``after`` the last one:
        ``repeat_last``, ``cycle`` or ``fail``. Rule-level ``delay``/``headers``/``trailers`` are defaults.
        """
        self._set("sequence", [_item(i) for i in items])
        if after != "repeat_last":
            self._set("after", after)
        self._extras(headers, trailers, delay)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def each_request(
        self,
        reply_or_step: Any,
        *,
        status: Any = None,
        headers: Mapping[str, str] | None = None,
        trailers: Mapping[str, str] | None = None,
        delay: Any = None,
    ) -> RuleBuilder:
        """Answers every incoming message of a bidi call; ``status`` ends the call when the client does."""
        self._set("each_request", _item(reply_or_step))
        if status is not None:
            self._set("status", _status_value(status))
        self._extras(headers, trailers, delay)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def fault(self, kind: str | enum.Enum, *, delay: Any = None) -> RuleBuilder:
        """Misbehaves: ``drop`` (never answer), ``garbage`` (unparseable bytes) or ``reset`` the stream."""
        self._set("fault", kind.value if isinstance(kind, enum.Enum) else kind)
        self._extras(None, None, delay)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def handler(self, fn: Callable[..., Any]) -> RuleBuilder:
        """Answers with ``fn(request, context)``; see ``Scenario.handler`` for the decorator form."""
        self._set("handler", fn)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def put(self, rule: RuleBuilder | Mapping[str, Any]) -> RuleBuilder:
        """An effect: when this rule answers, ``rule`` (made with :func:`rule`, an id required) joins the
        call's session, replacing the session's rule with its id. Its templates render from the call that
        triggered it."""
        if isinstance(rule, RuleBuilder):
            data = {**_plain(rule.data), "$location": str(rule.location)}
        else:
            data = _plain(rule)
        return self._effect({"put": data})

    def remove(self, ids: str | Sequence[str]) -> RuleBuilder:
        """An effect: when this rule answers, the rules with these ids stop answering in the session."""
        return self._effect({"remove": ids if isinstance(ids, str) else list(ids)})

    def remove_self(self) -> RuleBuilder:
        """An effect: when this rule answers, it stops answering in the session."""
        return self._effect({"remove_self": True})

    def _effect(self, effect: dict[str, Any]) -> RuleBuilder:
        effects = self.data.setdefault("effects", [])
        effects.append(effect)
        __tracebackhide__ = True  # a failing change points at the user's line, not this one
        return self._changed()

    def _changed(self) -> RuleBuilder:
        """Called after every change; builders that act on changes (the pytest plugin's) override it."""
        return self

    def __repr__(self) -> str:
        return f"<rule {self.data.get('method')!r} at {self.location}>"


def rule(
    method: str,
    *,
    id: str,
    when: Mapping[str, Any] | None = None,
    times: int | None = None,
    priority: int = 0,
    per_message: bool = False,
) -> RuleBuilder:
    """A rule for an effect to put (``.put(rule(...).reply(...))``), in no scenario of its own."""
    return RuleBuilder(_rule_data(method, id, when, times, priority, per_message), _caller())


def _rule_data(
    method: str, id: str | None, when: Any, times: int | None, priority: int, per_message: bool
) -> dict[str, Any]:
    data: dict[str, Any] = {"method": method}
    if id is not None:
        data["id"] = id
    if when is not None:
        data["when"] = _plain(when)
    if times is not None:
        data["times"] = times
    if priority != 0:
        data["priority"] = priority
    if per_message:
        data["per_message"] = True
    return data


def step(
    reply: Mapping[str, Any] | Message | None = None,
    *,
    status: Any = None,
    delay: Any = None,
    headers: Mapping[str, str] | None = None,
    trailers: Mapping[str, str] | None = None,
    fault: str | enum.Enum | None = None,
) -> dict[str, Any]:
    """A step for ``.sequence`` / ``.stream`` / ``.each_request`` (only the given keys are set)."""
    out: dict[str, Any] = {}
    if reply is not None:
        out["reply"] = _body(reply)
    if status is not None:
        out["status"] = _status_value(status)
    if delay is not None:
        out["delay"] = _delay(delay)
    if headers is not None:
        out["headers"] = _plain(headers)
    if trailers is not None:
        out["trailers"] = _plain(trailers)
    if fault is not None:
        out["fault"] = fault.value if isinstance(fault, enum.Enum) else fault
    return out


def fail(
    code: str | int | grpc.StatusCode,
    message: str = "",
    details: Sequence[Mapping[str, Any] | Message] | None = None,
    *,
    delay: Any = None,
) -> dict[str, Any]:
    """A failing step: ``fail("UNAVAILABLE", "try later")`` in a sequence."""
    out: dict[str, Any] = {"status": _make_status(code, message, details)}
    if delay is not None:
        out["delay"] = _delay(delay)
    return out


def status(
    code: str | int | grpc.StatusCode,
    message: str = "",
    details: Sequence[Mapping[str, Any] | Message] | None = None,
) -> dict[str, Any]:
    """A status as YAML-shaped data: ``{"code": "UNAVAILABLE", "message": ..., "details": [...]}``."""
    return _make_status(code, message, details)


def _make_status(code: Any, message: Any, details: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"code": _code(code)}
    if message:
        out["message"] = message
    if details:
        out["details"] = [_detail(d) for d in details]
    return out


def _status_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        data = _plain(value)
        if "code" in data:
            data["code"] = _code(data["code"])
        return data
    return {"code": _code(value)}


def _code(code: Any) -> Any:
    """A status code by name; values that are no code are kept as written, for validation to report."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and not isinstance(code, bool):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
        return code
    if isinstance(code, str) and code.strip().upper() in grpc.StatusCode.__members__:
        return code.strip().upper()
    return code


def _detail(detail: Any) -> Any:
    if isinstance(detail, Message):
        packed = any_pb2.Any()
        packed.Pack(detail)
        return json_format.MessageToDict(packed)
    return _plain(detail)


def _body(body: Any) -> Any:
    if body is None:
        return {}
    if isinstance(body, Message):
        return json_format.MessageToDict(body, preserving_proto_field_name=True)
    return _plain(body)


def _item(item: Any) -> Any:
    """A step as written, or a body wrapped into ``{"reply": body}`` (see RuleBuilder)."""
    if isinstance(item, Mapping) and item and all(isinstance(k, str) and k in STEP_KEYS for k in item):
        data = _plain(item)
        if "reply" in data:
            data["reply"] = _body(item["reply"])
        if "status" in data:
            data["status"] = _status_value(item["status"])
        if "delay" in data:
            data["delay"] = _delay(item["delay"])
        if isinstance(data.get("stream"), list):
            data["stream"] = [_item(i) for i in item["stream"]]
        return data
    return {"reply": _body(item)}


def _delay(value: Any) -> Any:
    """Durations as the file format writes them: text (``"25ms"``) or seconds; timedeltas become seconds."""
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {k: _delay(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_delay(v) for v in value]
    return value


def _plain(value: Any, level: int = 0) -> Any:
    """A deep copy as plain dicts and lists, so later changes to the caller's data do not leak in."""
    if level > _MAX_DEPTH:
        raise ValueError(f"the data nests deeper than {_MAX_DEPTH} levels (does it contain itself?)")
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, Mapping):
        return {k: _plain(v, level + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, level + 1) for v in value]
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value


def _caller() -> Location:
    """The user's line that called into this module (skipping the builder's own frames)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename == _HERE:
        frame = frame.f_back
    return Location(frame.f_code.co_filename, frame.f_lineno)
