"""grpctestify ``.gctf`` cases: parsed with located errors, run by a client built from descriptors.

A case file is a list of ``--- SECTION options ---`` blocks. ``ENDPOINT`` starts a call (so one file can
chain several); ``ADDRESS``, ``REQUEST_HEADERS`` and ``REQUEST`` (JSON5) feed it; ``RESPONSE`` (one or more
JSON5 messages, options ``partial``, ``with_asserts``, ``tolerance=X``) and ``ERROR`` (``code``,
``message``, ``details``) say what must come back; ``ASSERTS`` adds one assertion a line to the block
before it; ``META`` is documentation. The steps run in file order, so a bidi call is a ping-pong: each
RESPONSE is awaited before the next REQUEST is sent.

Comparison follows grpctestify: both sides are read through the method's descriptors (proto or JSON field
names, numbers by value, enums by name, int64 as text), a strict RESPONSE fails on keys the server sent and
the case did not name (a key left out passes when its value is the proto3 default), ``partial`` asks for a
subset, messages past the last expectation are not looked at, and ERROR compares the code, the message and
the details (whenever either side has some).
"""

from __future__ import annotations

import difflib
import json
import math
import queue
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import json5
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2

__all__ = ["Assertion", "Call", "Case", "CaseError", "Expected", "ExpectedError", "Request", "parse", "run"]

SECTIONS = ("ADDRESS", "ENDPOINT", "REQUEST", "REQUEST_HEADERS", "RESPONSE", "ERROR", "ASSERTS", "META")
RESPONSE_OPTIONS = ("partial", "with_asserts", "tolerance")
TIMEOUT = 10.0  # one call's deadline: a server that never answers fails the case instead of hanging it

_HEADER = re.compile(r"^---\s*(?P<name>[A-Za-z_]+)(?P<options>[^-]*?)\s*---\s*$")
_OPERATORS = ("==", "!=", ">=", "<=", ">", "<")
_PATH_STEP = re.compile(r'\.(?P<name>[A-Za-z_]\w*)|\["(?P<key>[^"]*)"\]|\[(?P<index>\d+)\]')
_FUNCTION = re.compile(r"^@(?P<name>[a-z_.]+)\((?P<arg>[^)]*)\)")
_FUNCTIONS = (
    "has_value",
    "header",
    "trailer",
    "scope.message_count",
    "scope.index",
    "elapsed_ms",
    "total_elapsed_ms",
)


class CaseError(ValueError):
    """A case file that cannot be read: the message is ``file:line: what is wrong``."""


# --- the parsed form ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assertion:
    """One ASSERTS line: ``left [op right]``; ``left`` is a path (``.a["k"].b``) or an ``@function(arg)``."""

    text: str
    line: int
    left: tuple[str, Any]  # ("path", steps) or (function name, argument)
    op: str | None = None
    right: Any = None


@dataclass
class Request:
    message: dict[str, Any]
    line: int


@dataclass
class Expected:
    """A RESPONSE block: the messages it expects, in order."""

    messages: list[dict[str, Any]]
    line: int
    partial: bool = False
    tolerance: float | None = None
    asserts: list[Assertion] = field(default_factory=list)


@dataclass
class ExpectedError:
    """An ERROR block: the status the call must end with."""

    code: int | None
    message: str | None
    details: list[dict[str, Any]] | None
    line: int
    asserts: list[Assertion] = field(default_factory=list)


Step = Request | Expected | ExpectedError


@dataclass
class Call:
    endpoint: str
    line: int
    address: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


@dataclass
class Case:
    path: Path
    calls: list[Call]

    @property
    def name(self) -> str:
        return self.path.stem


# --- parsing ---------------------------------------------------------------------------------------


def parse(path: Path, text: str | None = None) -> Case:
    """Reads one case file; raises CaseError located at the offending line."""
    path = Path(path)
    text = path.read_text() if text is None else text
    sections = _sections(path, text)
    calls: list[Call] = []
    address: str | None = None
    last: Expected | ExpectedError | None = None
    for name, options, body, line, body_line in sections:
        where = f"{path}:{line}"
        if name == "META":
            continue
        if name == "ADDRESS":
            address = _single_line(path, body, body_line, "ADDRESS", "host:port")
            continue
        if name == "ENDPOINT":
            endpoint = _single_line(path, body, body_line, "ENDPOINT", "package.Service/Method")
            if "/" not in endpoint:
                raise CaseError(f"{where}: ENDPOINT {endpoint!r} is not package.Service/Method")
            calls.append(Call(endpoint=endpoint, line=line, address=address))
            last = None
            continue
        if not calls:
            raise CaseError(f"{where}: {name} before any ENDPOINT")
        call = calls[-1]
        if name != "RESPONSE" and options:
            raise CaseError(f"{where}: {name} takes no options (got {' '.join(options)!r})")
        if name == "REQUEST_HEADERS":
            call.headers.extend(_headers(path, body, body_line))
        elif name == "REQUEST":
            values = _json_values(path, body, body_line)
            if len(values) > 1:
                raise CaseError(f"{path}:{values[1][1]}: one message per REQUEST (start another REQUEST)")
            message = values[0][0] if values else {}
            if not isinstance(message, dict):
                raise CaseError(f"{path}:{values[0][1]}: REQUEST must be a JSON object")
            call.steps.append(Request(message, line))
        elif name == "RESPONSE":
            last = _expected(path, options, body, line, body_line)
            call.steps.append(last)
        elif name == "ERROR":
            last = _expected_error(path, body, line, body_line)
            call.steps.append(last)
        elif name == "ASSERTS":
            if last is None:
                raise CaseError(f"{where}: ASSERTS must follow a RESPONSE or an ERROR")
            last.asserts.extend(_assertions(path, body, body_line))
    if not calls:
        raise CaseError(f"{path}:1: no ENDPOINT section")
    for call in calls:
        if not any(isinstance(s, Expected | ExpectedError) for s in call.steps):
            raise CaseError(f"{path}:{call.line}: the call to {call.endpoint} has no RESPONSE or ERROR")
    return Case(path=path, calls=calls)


def _sections(path: Path, text: str) -> list[tuple[str, list[str], str, int, int]]:
    """(name, options, body, header line, first body line) of every section, comments kept in bodies."""
    out: list[tuple[str, list[str], str, int, int]] = []
    lines = text.splitlines()
    body: list[str] = []
    for number, raw in enumerate(lines, 1):
        match = _HEADER.match(raw.strip())
        if match is None:
            if not out and raw.strip() and not raw.strip().startswith("//"):
                raise CaseError(
                    f"{path}:{number}: text before the first section (expected '--- ENDPOINT ---')"
                )
            body.append(raw)
            continue
        if out:
            out[-1] = (*out[-1][:2], "\n".join(body), *out[-1][3:])
        body = []
        name = match["name"].upper()
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the sections are {', '.join(SECTIONS)}"
            raise CaseError(f"{path}:{number}: unknown section {match['name']!r}{hint}")
        out.append((name, match["options"].split(), "", number, number + 1))
    if out:
        out[-1] = (*out[-1][:2], "\n".join(body), *out[-1][3:])
    return out


def _single_line(path: Path, body: str, body_line: int, section: str, form: str) -> str:
    lines = [(n, s.strip()) for n, s in enumerate(body.splitlines(), body_line) if _code(s)]
    if len(lines) != 1:
        where = lines[1][0] if len(lines) > 1 else body_line - 1
        raise CaseError(f"{path}:{where}: {section} holds one line, {form}")
    return lines[0][1]


def _code(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("//")


def _headers(path: Path, body: str, body_line: int) -> list[tuple[str, str]]:
    out = []
    for number, raw in enumerate(body.splitlines(), body_line):
        if not _code(raw):
            continue
        key, sep, value = raw.partition(":")
        if not sep or not key.strip():
            raise CaseError(f"{path}:{number}: a header is 'name: value', got {raw.strip()!r}")
        out.append((key.strip().lower(), value.strip()))
    return out


def _json_values(path: Path, body: str, body_line: int) -> list[tuple[Any, int]]:
    """The JSON5 values of a body, one after another (a RESPONSE may hold several messages)."""
    values = []
    for chunk, offset in _split_values(body):
        try:
            values.append((json5.loads(chunk), body_line + offset))
        except ValueError as exc:
            text = str(exc)
            located = re.match(r"<string>:(\d+) (.*)", text)
            if located:
                line = body_line + offset + int(located[1]) - 1
                raise CaseError(f"{path}:{line}: invalid JSON: {located[2]}") from None
            raise CaseError(f"{path}:{body_line + offset}: invalid JSON: {text}") from None
    return values


def _split_values(body: str) -> Iterator[tuple[str, int]]:
    """Cuts a body at the end of each top-level JSON value, minding strings and comments."""
    depth, start, quote, i = 0, None, "", 0
    while i < len(body):
        char = body[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif body.startswith("//", i):
            end = body.find("\n", i)
            i = len(body) if end < 0 else end
            continue
        elif body.startswith("/*", i):
            end = body.find("*/", i + 2)
            i = len(body) if end < 0 else end + 2
            continue
        elif char in "\"'":
            quote = char
        elif char in "{[":
            if depth == 0:
                start = i
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0 and start is not None:
                yield body[start : i + 1], body.count("\n", 0, start)
                start = None
        elif not char.isspace() and depth == 0:
            # a bare scalar or stray text: let the JSON5 parser say what is wrong with the rest
            yield body[i:], body.count("\n", 0, i)
            return
        i += 1
    if depth > 0 and start is not None:
        yield body[start:], body.count("\n", 0, start)


def _expected(path: Path, options: list[str], body: str, line: int, body_line: int) -> Expected:
    expected = Expected(messages=[], line=line)
    for option in options:
        key, _, value = option.partition("=")
        if key == "partial":
            expected.partial = True
        elif key == "with_asserts":
            pass  # the ASSERTS block that follows applies either way
        elif key == "tolerance":
            try:
                expected.tolerance = float(value)
            except ValueError:
                raise CaseError(f"{path}:{line}: tolerance={value!r} is not a number") from None
        else:
            close = difflib.get_close_matches(key, RESPONSE_OPTIONS, n=1)
            hint = (
                f"; did you mean {close[0]}?" if close else f"; the options are {', '.join(RESPONSE_OPTIONS)}"
            )
            raise CaseError(f"{path}:{line}: unknown RESPONSE option {option!r}{hint}")
    for value, at in _json_values(path, body, body_line):
        if not isinstance(value, dict):
            raise CaseError(f"{path}:{at}: a RESPONSE message must be a JSON object")
        expected.messages.append(value)
    return expected


def _expected_error(path: Path, body: str, line: int, body_line: int) -> ExpectedError:
    values = _json_values(path, body, body_line)
    if len(values) != 1 or not isinstance(values[0][0], dict):
        raise CaseError(f"{path}:{line}: ERROR holds one object with code, message and details")
    value, at = values[0]
    unknown = sorted(set(value) - {"code", "message", "details"})
    if unknown:
        raise CaseError(f"{path}:{at}: ERROR keys are code, message and details, not {', '.join(unknown)}")
    code = value.get("code")
    if isinstance(code, str):
        try:
            code = grpc.StatusCode[code.upper()].value[0]
        except KeyError:
            raise CaseError(f"{path}:{at}: unknown status code {code!r}") from None
    elif code is not None and not isinstance(code, int):
        raise CaseError(f"{path}:{at}: code must be a number or a status name")
    details = value.get("details")
    if details is not None and not (isinstance(details, list) and all(isinstance(d, dict) for d in details)):
        raise CaseError(f"{path}:{at}: details must be a list of objects with @type")
    return ExpectedError(code=code, message=value.get("message"), details=details, line=line)


def _assertions(path: Path, body: str, body_line: int) -> list[Assertion]:
    out = []
    for number, raw in enumerate(body.splitlines(), body_line):
        if _code(raw):
            out.append(_assertion(path, raw.strip(), number))
    return out


def _assertion(path: Path, text: str, line: int) -> Assertion:
    where = f"{path}:{line}"
    if text.startswith("@"):
        match = _FUNCTION.match(text)
        if match is None:
            raise CaseError(f"{where}: {text!r}: expected @function(argument)")
        name = match["name"]
        if name not in _FUNCTIONS:
            close = difflib.get_close_matches(name, _FUNCTIONS, n=1)
            hint = f"; did you mean @{close[0]}?" if close else ""
            raise CaseError(f"{where}: unknown assertion function @{name}{hint}")
        argument: Any = match["arg"].strip()
        if name == "has_value":
            argument = _path(where, argument)
        elif name in ("header", "trailer"):
            argument = _literal(argument)
            if not isinstance(argument, str):
                raise CaseError(f"{where}: @{name} takes a quoted header name")
        left: tuple[str, Any] = (name, argument)
        rest = text[match.end() :].strip()
    elif text.startswith("."):
        end = len(text)
        for operator in _OPERATORS:
            at = text.find(f" {operator}")
            end = min(end, at) if at >= 0 else end
        try:
            left = ("path", _path(where, text[:end].strip()))
        except CaseError:
            raise CaseError(f"{where}: {text!r}: expected '.path [{' | '.join(_OPERATORS)} value]'") from None
        rest = text[end:].strip()
    else:
        raise CaseError(f"{where}: {text!r}: an assertion starts with a field path (.name) or @function")
    if not rest:
        return Assertion(text=text, line=line, left=left)
    op = next((o for o in _OPERATORS if rest.startswith(o)), None)
    right = rest[len(op) :].strip() if op is not None else ""
    if op is None or not right:
        raise CaseError(f"{where}: {text!r}: expected 'left {' | '.join(_OPERATORS)} value'")
    return Assertion(text=text, line=line, left=left, op=op, right=_literal(right))


def _path(where: str, text: str) -> tuple[str | int, ...]:
    steps: list[str | int] = []
    pos = 0
    while pos < len(text):
        match = _PATH_STEP.match(text, pos)
        if match is None:
            raise CaseError(f'{where}: {text!r} is not a field path (.name, ["key"], [0])')
        steps.append(match["name"] or match["key"] if match["index"] is None else int(match["index"]))
        pos = match.end()
    if not steps:
        raise CaseError(f"{where}: an empty field path")
    return tuple(steps)


def _literal(text: str) -> Any:
    """A JSON value; anything else (a bare word) is read as text, as grpctestify does."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- running --------------------------------------------------------------------------------------


@dataclass
class _Scope:
    """What the assertions of one RESPONSE or ERROR block see."""

    messages: list[dict[str, Any]]
    index: int
    elapsed_ms: float
    total_elapsed_ms: float
    headers: dict[str, str]
    trailers: dict[str, str]


def run(
    case: Case,
    pool: descriptor_pool.DescriptorPool,
    address: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Runs the case's calls in order; returns the failures (``file:line: message``), empty if it passes.

    ``address`` overrides the case's ADDRESS; ``headers`` go with every call, before the case's own; the
    method and message types come from ``pool`` (a ``Catalog.pool``, which also holds health and
    google.rpc's error details).
    """
    failures: list[str] = []
    for call in case.calls:
        target = address or call.address
        if target is None:
            return [f"{case.path}:{call.line}: no address: the case has no ADDRESS and none was given"]
        failures += _run_call(case.path, call, pool, target, [*headers, *call.headers])
        if failures:
            break  # a chain's later calls depend on the earlier ones
    return failures


def _method(pool: descriptor_pool.DescriptorPool, endpoint: str) -> MethodDescriptor:
    service_name, _, method_name = endpoint.strip("/").rpartition("/")
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError:
        raise LookupError(f"unknown service {service_name!r}") from None
    method = service.methods_by_name.get(method_name)
    if method is None:
        close = difflib.get_close_matches(method_name, list(service.methods_by_name), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise LookupError(f"{service_name} has no method {method_name!r}{hint}")
    return method


def _run_call(
    path: Path, call: Call, pool: descriptor_pool.DescriptorPool, address: str, headers: list[tuple[str, str]]
) -> list[str]:
    try:
        method = _method(pool, call.endpoint)
    except LookupError as exc:
        return [f"{path}:{call.line}: {exc}"]
    input_class = message_factory.GetMessageClass(method.input_type)
    output_class = message_factory.GetMessageClass(method.output_type)
    requests: list[Message] = []
    for step in call.steps:
        if isinstance(step, Request):
            try:
                requests.append(json_format.ParseDict(step.message, input_class(), descriptor_pool=pool))
            except json_format.ParseError as exc:
                return [f"{path}:{step.line}: REQUEST is not a {method.input_type.full_name}: {exc}"]
    channel = grpc.insecure_channel(address)
    try:
        exchange = _Exchange(channel, method, output_class, headers, pool)
        return _Runner(path, call, method, exchange, requests, pool).run()
    finally:
        channel.close()


class _Exchange:
    """One call of any kind seen as a sequence of events: send, receive next, finish."""

    def __init__(
        self,
        channel: grpc.Channel,
        method: MethodDescriptor,
        output_class: type[Message],
        headers: list[tuple[str, str]],
        pool: descriptor_pool.DescriptorPool,
    ) -> None:
        path = f"/{method.containing_service.full_name}/{method.name}"
        self.pool = pool
        self.client_streaming = method.client_streaming
        self.server_streaming = method.server_streaming
        self.headers = headers
        self._outbox: queue.Queue[Message | None] = queue.Queue()
        serialize, parse = (lambda m: m.SerializeToString()), output_class.FromString
        kind = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        self._multicallable = kind(path, request_serializer=serialize, response_deserializer=parse)
        self._call: Any = None  # the grpc call (future or response iterator) once started
        self._error: grpc.RpcError | None = None
        self._done = False
        self.started = time.monotonic()

    def _requests(self) -> Iterator[Message]:
        while (message := self._outbox.get()) is not None:
            yield message

    def start(self, first: Message | None) -> None:
        """Starts the call: a unary request goes as is, streamed ones follow through send()."""
        self.started = time.monotonic()
        metadata = self.headers or None
        request: Any = self._requests() if self.client_streaming else first
        if self.server_streaming:
            self._call = self._multicallable(request, metadata=metadata, timeout=TIMEOUT)
        else:
            self._call = self._multicallable.future(request, metadata=metadata, timeout=TIMEOUT)

    def send(self, message: Message) -> None:
        self._outbox.put(message)

    def close(self) -> None:
        self._outbox.put(None)

    def receive(self) -> Message | None:
        """The next message, or None when the call ended (its status then in ``error``)."""
        if self._done:
            return None
        try:
            if self.server_streaming:
                return next(self._call)
            self._done = True
            return self._call.result()
        except StopIteration:
            self._done = True
            return None
        except grpc.RpcError as exc:
            self._done = True
            self._error = exc
            return None

    @property
    def error(self) -> grpc.RpcError | None:
        return self._error

    def metadata(self) -> tuple[dict[str, str], dict[str, str]]:
        """Initial and trailing metadata (waits for the end of the call when it has not ended)."""
        call = self._error or self._call
        initial = call.initial_metadata() if call is not None else None
        trailing = call.trailing_metadata() if call is not None else None
        return _flat(initial), _flat(trailing)

    def cancel(self) -> None:
        if self._call is not None and not self._done:
            self._call.cancel()


def _flat(metadata: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue
        out[key] = f"{out[key]};{value}" if key in out else value
    return out


class _Runner:
    def __init__(
        self,
        path: Path,
        call: Call,
        method: MethodDescriptor,
        exchange: _Exchange,
        requests: list[Message],
        pool: descriptor_pool.DescriptorPool,
    ) -> None:
        self.path, self.call, self.method, self.exchange, self.pool = path, call, method, exchange, pool
        self.requests = requests
        self.failures: list[str] = []

    def at(self, line: int, message: str) -> None:
        self.failures.append(f"{self.path}:{line}: {message}")

    def run(self) -> list[str]:
        exchange, steps = self.exchange, self.call.steps
        requests = iter(self.requests)
        if not exchange.client_streaming:
            count = sum(isinstance(s, Request) for s in steps)
            if count > 1:
                line = [s for s in steps if isinstance(s, Request)][1].line
                self.at(line, f"{self.call.endpoint} takes one request, the case sends {count}")
                return self.failures
            exchange.start(next(requests, None) or message_factory.GetMessageClass(self.method.input_type)())
        else:
            exchange.start(None)
        scope_start, scope_index = exchange.started, 0
        try:
            for position, step in enumerate(steps):
                if isinstance(step, Request):
                    if not exchange.client_streaming:
                        continue
                    if any(isinstance(s, Expected | ExpectedError) for s in steps[:position]) and not (
                        exchange.server_streaming
                    ):
                        self.at(
                            step.line, f"REQUEST after the answer of {self.call.endpoint}, a client stream"
                        )
                        return self.failures
                    exchange.send(next(requests))
                    continue
                if exchange.client_streaming and not any(isinstance(s, Request) for s in steps[position:]):
                    exchange.close()  # nothing more to send: half-close so the server can finish
                scope_index += 1
                if isinstance(step, Expected):
                    received = self.expect_messages(step)
                    if received is None:
                        return self.failures
                    now = time.monotonic()
                    self.check_asserts(step.asserts, received, scope_index, scope_start, now)
                    scope_start = now
                else:
                    self.expect_error(step, scope_index, scope_start)
                if self.failures:
                    return self.failures
        finally:
            if exchange.client_streaming:
                exchange.close()
            exchange.cancel()
        return self.failures

    def expect_messages(self, step: Expected) -> list[dict[str, Any]] | None:
        received = []
        for index, expected in enumerate(step.messages):
            message = self.exchange.receive()
            if message is None:
                error = self.exchange.error
                got = f"{_code_name(error.code())}: {error.details()}" if error else "the end of the stream"
                nth = f"message {index + 1} of " if len(step.messages) > 1 else ""
                self.at(step.line, f"expected {nth}the response, got {got}")
                return None
            actual = self.as_dict(message)
            try:
                wanted = self.normalize(expected, self.method.output_type.full_name)
            except json_format.ParseError as exc:
                self.at(
                    step.line, f"the expected response is not a {self.method.output_type.full_name}: {exc}"
                )
                return None
            differences = _compare(wanted, actual, partial=step.partial, tolerance=step.tolerance)
            if differences:
                label = f"message {index + 1}: " if len(step.messages) > 1 else ""
                self.at(step.line, f"{label}{'; '.join(differences)}")
                return None
            received.append(actual)
        if not step.messages and not self.exchange.server_streaming:
            self.exchange.receive()  # an empty RESPONSE of a unary call: it must answer, whatever it says
            if self.exchange.error is not None:
                error = self.exchange.error
                self.at(step.line, f"expected a response, got {_code_name(error.code())}: {error.details()}")
                return None
        return received

    def expect_error(self, step: ExpectedError, scope_index: int, scope_start: float) -> None:
        exchange = self.exchange
        while (message := exchange.receive()) is not None:
            self.at(step.line, f"expected an error, got a message: {json.dumps(self.as_dict(message))}")
            return
        error = exchange.error
        if error is None:
            self.at(step.line, "expected an error, the call ended OK")
            return
        code = error.code().value[0]
        if step.code is not None and code != step.code:
            self.at(
                step.line,
                f"code: expected {step.code} ({_code_name(step.code)}), got {code} "
                f"({_code_name(code)}): {error.details()!r}",
            )
        if step.message is not None and error.details() != step.message:
            self.at(step.line, f"message: expected {step.message!r}, got {error.details()!r}")
        actual_details = self.details(error)
        if step.details is not None or actual_details:
            try:
                wanted = [self.normalize_any(d) for d in step.details or []]
            except (json_format.ParseError, TypeError, KeyError) as exc:
                self.at(step.line, f"details: cannot read the expected details: {exc}")
                return
            for difference in _compare(wanted, actual_details, partial=False, tolerance=None, path="details"):
                self.at(step.line, difference)
        now = time.monotonic()
        error_view = {"code": code, "message": error.details(), "details": actual_details}
        self.check_asserts(step.asserts, [error_view], scope_index, scope_start, now)

    def check_asserts(
        self, asserts: list[Assertion], messages: list[dict[str, Any]], index: int, start: float, now: float
    ) -> None:
        if not asserts:
            return
        headers, trailers = self.exchange.metadata() if self.needs_metadata(asserts) else ({}, {})
        scope = _Scope(
            messages=messages,
            index=index,
            elapsed_ms=(now - start) * 1000,
            total_elapsed_ms=(now - self.exchange.started) * 1000,
            headers=headers,
            trailers=trailers,
        )
        for assertion in asserts:
            problem = _check(assertion, scope)
            if problem:
                self.at(assertion.line, f"{assertion.text}: {problem}")

    @staticmethod
    def needs_metadata(asserts: list[Assertion]) -> bool:
        return any(a.left[0] in ("header", "trailer") for a in asserts)

    def as_dict(self, message: Message) -> dict[str, Any]:
        return json_format.MessageToDict(message, preserving_proto_field_name=True, descriptor_pool=self.pool)

    def normalize(self, value: dict[str, Any], type_name: str) -> dict[str, Any]:
        """The expected message read through its type: JSON or proto names, numbers and enums as protojson."""
        cls = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(type_name))
        return self.as_dict(json_format.ParseDict(value, cls(), descriptor_pool=self.pool))

    def normalize_any(self, value: dict[str, Any]) -> dict[str, Any]:
        detail = dict(value)
        if "type" in detail and "@type" not in detail:
            detail["@type"] = detail.pop("type")
        return self.as_dict(json_format.ParseDict(detail, any_pb2.Any(), descriptor_pool=self.pool))

    def details(self, error: grpc.RpcError) -> list[dict[str, Any]]:
        for key, value in error.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                status = status_pb2.Status.FromString(value)
                return [self.as_dict(detail) for detail in status.details]
        return []


def _code_name(code: int | grpc.StatusCode) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


# --- comparing ------------------------------------------------------------------------------------


def _compare(
    expected: Any, actual: Any, *, partial: bool, tolerance: float | None, path: str = ""
) -> list[str]:
    """Differences as ``path: expected X, got Y``; ``partial`` ignores what the expectation leaves out."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key, value in expected.items():
            where = _join(path, key)
            if key not in actual:
                out.append(f"{where}: expected {_show(value)}, got nothing")
            else:
                out += _compare(value, actual[key], partial=partial, tolerance=tolerance, path=where)
        if not partial:
            out += [
                f"{_join(path, k)}: not expected, got {_show(v)}"
                for k, v in actual.items()
                if k not in expected
            ]
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path or '.'}: expected {len(expected)} elements, got {len(actual)}: {_show(actual)}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += _compare(e, a, partial=partial, tolerance=tolerance, path=f"{path}[{i}]")
        return out
    if _number(expected) and _number(actual):
        if tolerance is not None and isinstance(expected, float | int) and isinstance(actual, float | int):
            equal = math.isclose(expected, actual, abs_tol=tolerance)
        else:
            equal = expected == actual
        return [] if equal else [f"{path or '.'}: expected {_show(expected)}, got {_show(actual)}"]
    if expected == actual and type(expected) is type(actual):
        return []
    return [f"{path or '.'}: expected {_show(expected)}, got {_show(actual)}"]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_@][\w@]*", key) else f'{path}["{key}"]'


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _lookup(value: Any, steps: tuple[str | int, ...]) -> tuple[bool, Any]:
    for step in steps:
        by_index = isinstance(step, int) and isinstance(value, list) and step < len(value)
        if by_index or (isinstance(step, str) and isinstance(value, dict) and step in value):
            value = value[step]
        else:
            return False, None
    return True, value


def _check(assertion: Assertion, scope: _Scope) -> str | None:
    """None when the assertion holds, else why not."""
    kind, argument = assertion.left
    subjects: list[tuple[bool, Any]]
    if kind == "path":
        subjects = [_lookup(m, argument) for m in scope.messages] or [(False, None)]
    elif kind == "has_value":
        for message in scope.messages or [{}]:
            found, value = _lookup(message, argument)
            if not found or value in (None, "", [], {}):
                return "no value"
        return None
    elif kind in ("header", "trailer"):
        source = scope.headers if kind == "header" else scope.trailers
        subjects = [(argument in source, source.get(argument))]
    else:
        value = {
            "scope.message_count": len(scope.messages),
            "scope.index": scope.index,
            "elapsed_ms": scope.elapsed_ms,
            "total_elapsed_ms": scope.total_elapsed_ms,
        }[kind]
        subjects = [(True, value)]
    for found, value in subjects:
        if assertion.op is None:
            if not found or not value:
                return f"got {_show(value) if found else 'nothing'}"
            continue
        if not found:
            return "got nothing"
        if not _holds(value, assertion.op, assertion.right):
            return f"got {_show(value)}"
    return None


def _holds(value: Any, op: str, right: Any) -> bool:
    if _number(right) and isinstance(value, str):
        try:
            value = float(value)  # int64 travel as text in protojson
        except ValueError:
            return op == "!="
    if op in ("==", "!="):
        equal = value == right if not (_number(value) and _number(right)) else float(value) == float(right)
        return equal if op == "==" else not equal
    if not (_number(value) and _number(right)) and not (isinstance(value, str) and isinstance(right, str)):
        return False
    return {">": value > right, ">=": value >= right, "<": value < right, "<=": value <= right}[op]


def case_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.gctf"))
