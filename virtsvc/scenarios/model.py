"""The compiled, run-time form of scenarios: what the router and handlers execute.

Scenario files and Python scripts are validated and compiled once, at load, into these immutable objects;
nothing here parses text per call. The parts that vary per call (matchers, templates) are small objects
behind the protocols below, so the loader, the matcher and the template engine can evolve apart.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, Protocol

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from virtsvc.scenarios.latency import Delay
from virtsvc.scenarios.protojson import message_to_json

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import MethodSpec
    from virtsvc.scenarios.answers import Answer, Plan
    from virtsvc.scenarios.data import DataSets

__all__ = [
    "After",
    "Call",
    "CompiledScenario",
    "Delay",
    "Effect",
    "Fault",
    "Location",
    "MatchResult",
    "Matcher",
    "MessageTemplate",
    "Rule",
    "Status",
    "Step",
    "TextTemplate",
]

After = Literal["repeat_last", "cycle", "fail"]


@dataclass(frozen=True, slots=True)
class Location:
    """Where a scenario element was written: ``file:line``."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The outcome of a rule's ``when``: how many conditions held, and why the others did not."""

    ok: bool
    passed: int = 0
    total: int = 0
    failures: tuple[str, ...] = ()  # e.g. 'request.sku: expected "ABC-1", got "XYZ"'


class Matcher(Protocol):
    """A compiled ``when`` block."""

    @property
    def needs_request(self) -> bool:
        """False when only metadata is inspected, so the request need not be decoded."""
        ...

    def check(self, call: Call) -> MatchResult: ...


class MessageTemplate(Protocol):
    """A compiled reply body for one output message type."""

    @property
    def static(self) -> bytes | None:
        """The serialised message when it has no template (computed once at load)."""
        ...

    @property
    def needs_request(self) -> bool: ...

    def render(self, call: Call, index: int) -> bytes: ...


class TextTemplate(Protocol):
    """A compiled string template (status messages, header and trailer values)."""

    @property
    def static(self) -> str | None: ...

    def render(self, call: Call, index: int) -> str: ...


class Fault(enum.Enum):
    DROP = "drop"  # never answer: the client's deadline decides
    GARBAGE = "garbage"  # bytes that no protobuf parser accepts
    RESET = "reset"  # end the call abruptly (RST_STREAM)


@dataclass(frozen=True, slots=True)
class Status:
    """A final gRPC status; ``details`` are packed ``google.protobuf.Any`` messages (rich errors)."""

    code: grpc.StatusCode
    message: TextTemplate | None = None
    details: tuple[bytes, ...] = ()  # serialised google.protobuf.Any, in order

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK


@dataclass(frozen=True, slots=True)
class Step:
    """One answer: a reply and/or a status, its latency, metadata and fault.

    For streaming methods ``stream`` lists the messages sent before the final status (``open``: then the
    stream is held open for the test to drive), and ``each_request`` answers every incoming message of a
    bidi call.
    """

    location: Location
    body: MessageTemplate | None = None
    status: Status | None = None
    delay: Delay | None = None
    headers: tuple[tuple[str, TextTemplate], ...] = ()
    trailers: tuple[tuple[str, TextTemplate], ...] = ()
    fault: Fault | None = None
    stream: tuple[Step, ...] | None = None
    each_request: Step | None = None
    passthrough: str | None = None  # forward the call to this upstream and relay its answer
    replies: tuple[Step, ...] | None = None  # per-message rules: message i is answered by replies[i]
    open: bool = False  # after its items, the stream is held open until the test ends it


Handler = Callable[..., Any]


@dataclass(frozen=True, eq=False)
class Effect:
    """What a rule changes in its call's session when it answers (``effects:``).

    ``put``: add the rule ``rule`` (or replace the session's rule with its ``id``); when the rule was written
    with templates, ``template`` renders its data from the triggering call and ``compile`` makes the rule.
    ``remove``: the rules named by ``ids`` stop answering in the session (``remove_self`` names the rule
    itself by :attr:`Rule.ref`).
    """

    kind: Literal["put", "remove"]
    location: Location
    ids: tuple[str, ...] = ()
    rule: Rule | None = None  # a put whose rule has no effect-time template: compiled once, at load
    data: Any = None  # the put rule as written (plain, JSON-able), kept for shared stores
    template: Any = None  # a put with effect-time templates: .render(call, index) -> the rule's data
    compile: Callable[[Any], Rule] | None = field(default=None, repr=False)  # rendered data -> the rule


@dataclass(frozen=True, eq=False)
class Rule:
    """A compiled rule: which calls it answers (method, ``when``, ``times``) and how (steps or handler)."""

    scenario: str
    key: str  # stable within its scenario; names the rule's counters in session state
    method: str  # "pkg.Svc/Method"
    location: Location
    steps: tuple[Step, ...] = ()  # one for a plain rule, several for a `sequence`
    after: After = "repeat_last"
    when: Matcher | None = None
    times: int | None = None
    priority: int = 0
    handler: Handler | None = None
    # The fingerprint of the method's contract the rule was recorded against (``contract:``), if any.
    contract: str | None = None
    # Requests `virtsvc verify` replays against the real service (``examples:``): each a serialised stream
    # of input messages (one message but for client-streaming methods).
    examples: tuple[tuple[bytes, ...], ...] = ()
    verify: Literal["shape", "exact"] = "shape"  # compare the real answer's shape only, or its values too
    source: Mapping[str, Any] | None = field(default=None, repr=False)  # the rule as written (with lines)
    # A bidi rule matched and answering each incoming message on its own (``per_message: true``).
    per_message: bool = False
    id: str | None = None  # names the rule for effects (``id:``)
    effects: tuple[Effect, ...] = ()  # what answering changes in the session's rules

    @cached_property
    def ref(self) -> str:
        """How effects name the rule in a session: its ``id``, else its scenario and key."""
        return self.id if self.id is not None else f"{self.scenario}#{self.key}"

    @cached_property
    def where(self) -> str:
        """``file:line``, made once (the journal records it with every call)."""
        return str(self.location)

    @property
    def is_sequence(self) -> bool:
        return len(self.steps) > 1 or (len(self.steps) == 1 and self.after == "fail")

    @property
    def needs_request(self) -> bool:
        return self.when is not None and self.when.needs_request

    @cached_property
    def answers(self) -> tuple[Answer, ...]:
        """One answer strategy per step, chosen once."""
        from virtsvc.scenarios.answers import answer_for

        return tuple(answer_for(step) for step in self.steps)

    @cached_property
    def plan(self) -> Plan | None:
        """This rule's answer as fixed data, when every call gets the same one at once: no condition,
        count, sequence or handler, and an answer that is fixed itself (``Answer.plan``)."""
        if (
            self.when is not None
            or self.times is not None
            or self.handler is not None
            or self.is_sequence
            or self.per_message
            or self.effects
        ):
            return None
        return self.answers[0].plan() if self.answers else None

    @cached_property
    def times_key(self) -> str:
        """Names the session counter of this rule's ``times``."""
        return f"times:{self.scenario}:{self.key}"

    @cached_property
    def sequence_key(self) -> str:
        """Names the session counter of this rule's position in its ``sequence``."""
        return f"seq:{self.scenario}:{self.key}"

    @cached_property
    def attempt_key(self) -> str:
        """Names the session counter of this rule's calls, when a delay grows with them (``backoff``)."""
        return f"calls:{self.scenario}:{self.key}"

    @cached_property
    def counts_attempts(self) -> bool:
        """Whether a delay of this rule depends on the call's attempt: the n-th call of the rule."""

        def grows(step: Step | None) -> bool:
            if step is None:
                return False
            if step.delay is not None and step.delay.by_attempt:
                return True
            return any(grows(s) for s in (*(step.stream or ()), *(step.replies or ()), step.each_request))

        return any(grows(step) for step in self.steps)


@dataclass(eq=False)
class CompiledScenario:
    """A validated scenario. ``rules`` are its own; the registry resolves ``extends`` into method indexes."""

    name: str
    location: Location
    rules: tuple[Rule, ...] = ()
    version: int | str | None = None
    description: str = ""
    extends: str | None = None
    from_script: bool = False  # loaded from a Python script (may hold handlers)
    passthrough: str | None = None  # the upstream answering calls that no rule matches
    passthrough_at: Location | None = None  # where ``passthrough:`` was written
    # The status of calls no rule answers (``unmatched:``); None: UNIMPLEMENTED with the near-miss text.
    unmatched: Status | None = None
    clock: Literal["wall", "virtual"] = "wall"  # ``clock: virtual``: its sessions run on virtual time
    data: DataSets | None = None  # its own ``data:`` collections (the registry adds an extended one's)

    @cached_property
    def fallback(self) -> Rule | None:
        """The scenario's ``passthrough`` as a rule of its own, tried after every other: it answers any
        method, and the journal names its ``file:line`` as the rule that answered."""
        if self.passthrough is None:
            return None
        at = self.passthrough_at or self.location
        return Rule(self.name, "passthrough", "*", at, (Step(at, passthrough=self.passthrough),))

    def methods(self) -> set[str]:
        return {r.method for r in self.rules}


@dataclass(eq=False)
class Call:
    """One incoming call as the matchers, templates and journal see it.

    The handlers parse every request as it arrives (bytes that do not parse are refused with
    INVALID_ARGUMENT before any rule runs) and hand the parsed messages over with ``set_messages`` /
    ``add_request(raw, message)``, so nothing is parsed twice. A Call built from raw bytes alone (unit tests,
    tools) still decodes lazily, on first use.
    """

    method: MethodSpec
    scenario: str
    session: Any  # the engine's session state (virtsvc.engine.store.SessionState)
    metadata: Mapping[str, str]
    raw_requests: list[bytes] = field(default_factory=list)
    position: int | None = None  # one message of a bidi stream answered on its own: its index
    datasets: Any = None  # the scenario's data collections (virtsvc.scenarios.data.DataSets), if any

    @cached_property
    def request_messages(self) -> list[Message]:
        out = []
        for raw in self.raw_requests:
            msg = self.method.input_class()
            msg.ParseFromString(raw)
            out.append(msg)
        return out

    @property
    def request_message(self) -> Message:
        """The first request (the only one for unary and server-streaming calls)."""
        msgs = self.request_messages
        return msgs[0] if msgs else self.method.input_class()

    # Cached in the instance dict by hand: functools.cached_property takes a lock on every first access,
    # i.e. on every call here.
    @property
    def request_json(self) -> dict[str, Any]:
        """The first request as proto3 JSON with proto field names, defaults omitted (presence)."""
        d = self.__dict__
        value: dict[str, Any] | None = d.get("request_json")
        if value is None:
            value = d["request_json"] = to_json(self.request_message)
        return value

    @property
    def requests_json(self) -> list[dict[str, Any]]:
        d = self.__dict__
        value: list[dict[str, Any]] | None = d.get("requests_json")
        if value is None:
            value = d["requests_json"] = [to_json(m) for m in self.request_messages]
        return value

    def set_messages(self, messages: list[Message]) -> None:
        """The parsed forms of ``raw_requests``, in order (the handlers parse up front)."""
        self.__dict__["request_messages"] = messages

    def add_request(self, raw: bytes, message: Message | None = None) -> None:
        """Appends a request; ``message`` is its parsed form when the caller has it already."""
        self.raw_requests.append(raw)
        d = self.__dict__
        parsed = d.get("request_messages")
        if message is not None and parsed is not None and len(parsed) == len(self.raw_requests) - 1:
            parsed.append(message)
        else:
            d.pop("request_messages", None)
        d.pop("request_json", None)
        d.pop("requests_json", None)


def to_json(message: Message, *, defaults: bool = False) -> dict[str, Any]:
    """proto3 JSON with proto field names; ``defaults`` adds fields left at their default value."""
    if not defaults:
        return message_to_json(message)
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=defaults,
        descriptor_pool=message.DESCRIPTOR.file.pool,
    )
