"""Reliability over real sockets: bad input gets a clear answer and changes nothing; faults are survived.

Over the wire: requests that do not parse (every RPC kind), messages over the size limit (both ways), odd
metadata, unknown methods and raw TCP garbage. Faults: cancellation at every stage, deadlines expiring in a
delay, slow consumers of a server stream, a client killed mid-stream, a scenario handler that raises, a
reload under load, and the concurrency limits (RESOURCE_EXHAUSTED at once instead of a collapse).
Files and admin text: every malformed input is a located ``file:line: message`` from ``virtsvc check`` and the
same text from the admin API, which never replaces a good scenario with a bad one.

Every server a test starts is stopped; every loop is bounded in count and time. The helpers at the top
(``serve_process``, ``run_cli``, ``wait_settled``) are shared with test_security.py and test_soak.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from virtsvc import cli
from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog
from virtsvc.scenarios import load_scenarios
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent

RESERVE = "/shop.v1.Inventory/Reserve"
PING = "/shop.v1.Inventory/Ping"
WATCH = "/shop.v1.Inventory/Watch"
BULK = "/shop.v1.Inventory/BulkUpdate"
TRACK = "/shop.v1.Orders/Track"

GARBAGE = b"\x08\x80"  # field 1, varint, continuation bit set and no next byte: no parser accepts it
MAX_BYTES = 64 * 1024  # the module server's --max-message-bytes
SLOW = (("x-slow", "1"),)

SCENARIO = """\
scenario: rel
rules:
  - method: shop.v1.Inventory/Reserve
    when: {metadata: {x-slow: "1"}}
    delay: 30s
    reply: {reservationId: slow}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: BIG}}
    reply: {reservationId: "{{ 'x' * 100000 }}"}
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: ok}
  - method: shop.v1.Inventory/Ping
    reply: {}
  - method: shop.v1.Inventory/Watch
    when: {metadata: {x-slow: "1"}}
    stream:
      - reply: {sku: first}
      - {delay: 30s, reply: {sku: never}}
  - method: shop.v1.Inventory/Watch
    when: {metadata: {x-big: "1"}}
    stream:
      - reply: {sku: small}
      - reply: {sku: "{{ 'y' * 100000 }}"}
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {sku: A}
      - reply: {sku: B}
  - method: shop.v1.Inventory/BulkUpdate
    reply: {accepted: "{{ requests | length }}"}
  - method: shop.v1.Orders/Track
    when: {metadata: {x-slow: "1"}}
    each_request: {delay: 30s, reply: {orderId: late}}
  - method: shop.v1.Orders/Track
    each_request: {reply: {orderId: "{{ request.order_id }}"}}
"""

SCRIPT = '''\
import grpc

from virtsvc import Scenario

scenario = Scenario("pyrel")
STATE = {"produced": 0, "closed": False}


@scenario.handler("shop.v1.Inventory/Reserve")
def reserve(request, context):
    if request.sku == "BOOM":
        raise ValueError("the stock ledger is on fire")
    if request.sku == "ABORT":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no stock today")
    if request.sku == "WRONG":
        return 42
    return {"reservationId": "py"}


@scenario.handler("shop.v1.Inventory/Watch")
def flood(request, context):
    """As many 60 KiB events as the client will take (at most 5,000): flow control must pace it."""
    try:
        for i in range(5000):
            STATE["produced"] += 1
            yield {"sku": "x" * 60000, "onHand": str(i)}
    finally:
        STATE["closed"] = True
'''


# ------------------------------------------------------------------------------------------------ helpers


def header(scenario: str, session: str = "default", *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session), *extra)


def encode(catalog: Catalog, method: str, **fields: Any) -> bytes:
    return catalog.method(method).input_class(**fields).SerializeToString()  # type: ignore[no-any-return]


def decode(catalog: Catalog, method: str, raw: bytes) -> Any:
    return catalog.method(method).output_class.FromString(raw)


def refused(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn()
        if not isinstance(result, (bytes, type(None))):
            list(result)  # a stream: its error comes while reading
    return info.value


def executor_idle(server: VirtualServer) -> bool:
    """No call running or queued on the server's worker pool."""
    ex = server.executor
    assert ex is not None
    idle = ex._idle_semaphore._value  # type: ignore[attr-defined]
    return ex._work_queue.qsize() == 0 and idle >= len(ex._threads)  # type: ignore[attr-defined]


def wait_settled(server: VirtualServer, threads: int | None = None, timeout: float = 10.0) -> None:
    """Waits until the server is idle: no busy worker, no admission counted, and (when given) no more
    threads in this process than ``threads``."""
    deadline = time.monotonic() + timeout
    while True:
        gauge = server.dispatcher.gauge
        inflight = sum(s.inflight for s in server.store)
        ok = (
            executor_idle(server)
            and (gauge is None or gauge.value == 0)
            and inflight == 0
            and (threads is None or threading.active_count() <= threads)
        )
        if ok:
            return
        if time.monotonic() > deadline:
            names = sorted(t.name for t in threading.enumerate())
            raise AssertionError(
                f"server not settled after {timeout}s: executor idle={executor_idle(server)}, "
                f"gauge={gauge.value if gauge else None}, session inflight={inflight}, "
                f"threads={threading.active_count()} (baseline {threads}): {names}"
            )
        time.sleep(0.02)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def healthy(
    address: str,
    timeout: float = 5.0,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> bool:
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return reply.status == health_pb2.HealthCheckResponse.SERVING  # type: ignore[no-any-return]


@dataclass
class Served:
    """A ``virtsvc serve`` subprocess: its address, pid and every line it wrote (stdout and stderr)."""

    proc: subprocess.Popen[str]
    address: str
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "".join(self.lines)


def serve_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "virtsvc.cli", "serve", "--log-format", "json", "--port", "0", *args]


@contextlib.contextmanager
def serve_process(
    args: Sequence[str], *, env: dict[str, str] | None = None, ready_timeout: float = 60.0
) -> Iterator[Served]:
    """Runs ``virtsvc serve ARGS --port 0`` until the block ends (SIGTERM, then SIGKILL after 10 s).

    Its output is read continuously by a thread (so it never blocks on a full pipe) and kept in ``lines``;
    the address comes from its ``serving`` event.
    """
    proc = subprocess.Popen(
        serve_command(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()
    found: dict[str, Any] = {}

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not ready.is_set() and '"serving"' in line:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "serving":
                        found.update(event)
                        ready.set()
        ready.set()

    reader = threading.Thread(target=pump, name="serve-output", daemon=True)
    reader.start()
    try:
        if not ready.wait(ready_timeout) or "port" not in found:
            raise AssertionError(f"virtsvc serve did not start (exit {proc.poll()}):\n{''.join(lines)}")
        yield Served(proc, f"127.0.0.1:{found['port']}", lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        reader.join(10)


def run_cli(*args: str, timeout: float = 120.0) -> tuple[int, str]:
    """``virtsvc ARGS`` in a subprocess: (exit status, stdout+stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "virtsvc.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reliability")
    (path / "rel.yaml").write_text(SCENARIO)
    (path / "pyrel.py").write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def server(catalog: Catalog, scenario_dir: Path) -> Iterator[VirtualServer]:
    scenarios = load_scenarios([scenario_dir], catalog)
    with VirtualServer(
        catalog,
        scenarios,
        default_scenario="rel",
        max_message_bytes=MAX_BYTES,
        max_concurrency=48,
        max_concurrency_per_session=24,
    ) as srv:
        yield srv


@pytest.fixture
def channel(server: VirtualServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def script_state(server: VirtualServer) -> dict[str, Any]:
    """The STATE dict of the pyrel script, as its handlers see it."""
    rule = server.registry.rules_for("pyrel", "shop.v1.Inventory/Watch")[0]
    assert rule.handler is not None
    return rule.handler.__globals__["STATE"]  # type: ignore[no-any-return]


def good_call(catalog: Catalog, channel: grpc.Channel, timeout: float = 5.0) -> None:
    """The server still answers an ordinary call as its scenario says."""
    raw = channel.unary_unary(RESERVE)(encode(catalog, RESERVE, sku="ok"), timeout=timeout)
    assert decode(catalog, RESERVE, raw).reservation_id == "ok"


# ------------------------------------------------------------------------------- bad input over the wire


@pytest.mark.parametrize("kind", ["unary", "unary-empty", "server_streaming", "client_streaming", "bidi"])
def test_unparsable_request_is_invalid_argument(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel, kind: str
) -> None:
    """Bytes that are not the method's input type: INVALID_ARGUMENT naming the method, for every kind, even
    when the rule answers with a static reply that never looks at the request."""
    session = f"garbage-{kind}"
    md = header("rel", session)
    if kind == "unary":
        method, call = RESERVE, lambda: channel.unary_unary(RESERVE)(GARBAGE, metadata=md, timeout=5)
    elif kind == "unary-empty":
        method, call = PING, lambda: channel.unary_unary(PING)(GARBAGE, metadata=md, timeout=5)
    elif kind == "server_streaming":
        method, call = WATCH, lambda: channel.unary_stream(WATCH)(GARBAGE, metadata=md, timeout=5)
    elif kind == "client_streaming":
        good = encode(catalog, BULK, sku="S1", count=1)
        method, call = (
            BULK,
            lambda: channel.stream_unary(BULK)(iter([good, GARBAGE, good]), metadata=md, timeout=5),
        )
    else:
        good = encode(catalog, TRACK, order_id="o-1")
        method, call = (
            TRACK,
            lambda: channel.stream_stream(TRACK)(iter([good, GARBAGE]), metadata=md, timeout=5),
        )
    error = refused(call)
    spec = catalog.method(method)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(
        f"the request to {spec.full_name} is not a valid {spec.input.full_name} message"
    ), error.details()
    entries = server.journal.entries("rel", session)
    assert [e.code for e in entries] == [grpc.StatusCode.INVALID_ARGUMENT]
    good_call(catalog, channel)


def test_oversized_request_is_resource_exhausted(catalog: Catalog, channel: grpc.Channel) -> None:
    """A request over --max-message-bytes is refused by grpc itself with RESOURCE_EXHAUSTED."""
    big = encode(catalog, RESERVE, sku="s" * (MAX_BYTES + 1))
    error = refused(lambda: channel.unary_unary(RESERVE)(big, timeout=5))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert str(MAX_BYTES) in error.details()
    good_call(catalog, channel)


def test_oversized_reply_is_resource_exhausted(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel
) -> None:
    """A reply template producing more than --max-message-bytes: RESOURCE_EXHAUSTED naming the limit and the
    flag, for a unary reply and for an item of a server stream (the items before it are delivered)."""
    md = header("rel", "big")
    error = refused(
        lambda: channel.unary_unary(RESERVE)(encode(catalog, RESERVE, sku="BIG"), metadata=md, timeout=5)
    )
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "is 100," in error.details() and f"maximum message size of {MAX_BYTES:,} bytes" in error.details()
    assert "--max-message-bytes" in error.details()

    stream = channel.unary_stream(WATCH)(b"", metadata=(*md, ("x-big", "1")), timeout=5)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for raw in stream:
            received.append(decode(catalog, WATCH, raw).sku)
    assert received == ["small"]
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-message-bytes" in info.value.details()
    codes = [e.code for e in server.journal.entries("rel", "big")]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    good_call(catalog, channel)


def test_odd_metadata_and_unknown_methods_leave_the_server_serving(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel
) -> None:
    """Oversized metadata, thousands of headers, binary headers, odd routing values and unknown methods are
    each answered with an error status (never a hang); everyone else is served throughout."""
    ok = encode(catalog, RESERVE, sku="ok")
    unary = channel.unary_unary(RESERVE)
    cases: list[tuple[tuple[str, str | bytes], ...]] = [
        (("x-huge", "v" * 200_000),),  # beyond grpc's metadata limit
        tuple((f"x-h{i}", "v" * 10) for i in range(2000)),
        (("x-virtsvc-scenario", "\u00e9t\u00e9".encode().decode("latin-1")),),  # not a scenario name
        (("x-virtsvc-scenario", "rel"), ("x-virtsvc-session", "s" * 4000)),
        (("baggage", "virtsvc-scenario=%ZZ%, ;;;==, virtsvc-session"),),
        (("x-blob-bin", bytes(range(256))), ("x-virtsvc-scenario-bin", b"\xff\x00")),
    ]
    for md in cases:
        try:
            raw = unary(ok, metadata=md, timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() is not grpc.StatusCode.UNKNOWN, exc.details()
            assert exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED, "metadata made the server hang"
        else:
            assert decode(catalog, RESERVE, raw).reservation_id == "ok"
        good_call(catalog, channel)
    for method in ("/shop.v1.Inventory/Nope", "/nope.Service/Method", "/", "/shop.v1.Inventory/"):
        error = refused(lambda m=method: channel.unary_unary(m)(ok, timeout=5))
        assert error.code() is grpc.StatusCode.UNIMPLEMENTED, (method, error.details())
    good_call(catalog, channel)


def test_raw_tcp_garbage_leaves_the_server_serving(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel
) -> None:
    """Random bytes, a bare HTTP/2 preface followed by junk frames, a half-sent frame and an HTTP/1 request
    on the serving port: grpc drops those connections, and other clients are served throughout."""
    rng = random.Random(7)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payloads = [
        bytes(rng.randrange(256) for _ in range(4096)),
        preface + bytes(rng.randrange(256) for _ in range(4096)),
        preface
        + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        + b"\x00\xff\xff\x01\x05\x00\x00\x00\x01"
        + b"\x00" * 10,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        preface,
    ]
    host, port = server.address.rsplit(":", 1)
    for payload in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(payload)
            sock.settimeout(2)
            with contextlib.suppress(OSError):
                sock.recv(65536)
        good_call(catalog, channel)
    # Connections left open half-way do not block anyone either.
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(20)]
    try:
        for sock in held:
            sock.sendall(preface[:10])
        good_call(catalog, channel)
    finally:
        for sock in held:
            sock.close()
    good_call(catalog, channel)


# --------------------------------------------------------------------------------------- faults survived


def _cancel_everywhere(catalog: Catalog, channel: grpc.Channel, session: str) -> None:
    """One call of each kind cancelled at a different stage; returns once every cancel was issued."""
    md = header("rel", session, *SLOW)

    # 1. unary, during its 30 s delay
    unary = channel.unary_unary(RESERVE).future(encode(catalog, RESERVE, sku="x"), metadata=md, timeout=60)
    # 2. server stream, after its first message, during the delay before the second
    stream = channel.unary_stream(WATCH)(b"", metadata=md, timeout=60)
    assert decode(catalog, WATCH, next(stream)).sku == "first"
    # 3. client stream, while the server waits for the next request message
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        yield encode(catalog, BULK, sku="S1", count=1)
        release.wait(30)

    upload = channel.stream_unary(BULK).future(requests(), metadata=md, timeout=60)
    # 4. bidi, while the server delays its answer to the first message
    bidi_release = threading.Event()

    def track_requests() -> Iterator[bytes]:
        yield encode(catalog, TRACK, order_id="o-1")
        bidi_release.wait(30)

    bidi = channel.stream_stream(TRACK)(track_requests(), metadata=md, timeout=60)
    # 5. a unary call cancelled as soon as it is sent
    early = channel.unary_unary(RESERVE).future(encode(catalog, RESERVE, sku="x"), metadata=md, timeout=60)
    early.cancel()

    time.sleep(0.3)  # every call reached its waiting point on the server
    unary.cancel()
    stream.cancel()
    upload.cancel()
    bidi.cancel()
    release.set()
    bidi_release.set()
    for call in (unary, upload, early):
        assert call.cancelled() or call.exception() is not None


def test_cancellation_at_every_stage_frees_everything(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel
) -> None:
    """Calls cancelled during a delay, mid server stream, mid client stream, mid bidi stream and at once:
    each handler stops (journaled CANCELLED), its worker is freed at once (not after the 30 s delays), the
    thread count returns to its baseline, the admission counters to zero, and the server keeps serving."""
    _cancel_everywhere(catalog, channel, "warm-up")  # the worker pool grows to what this needs
    wait_settled(server)
    baseline = threading.active_count()
    t0 = time.monotonic()
    for round_ in range(3):
        _cancel_everywhere(catalog, channel, f"cancel-{round_}")
        wait_settled(server, threads=baseline)
        good_call(catalog, channel)
    assert time.monotonic() - t0 < 20, "cancelled delays held their workers"
    assert threading.active_count() <= baseline
    codes = {e.method: e.code for e in server.journal.entries("rel", "cancel-0")}
    # grpc's server may see a client stream cancelled right after its last message as a normal end of
    # stream (the end of the receive comes before the cancellation): then the handler finishes at once.
    assert codes.pop("shop.v1.Inventory/BulkUpdate") in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK)
    assert codes == {
        "shop.v1.Inventory/Reserve": grpc.StatusCode.CANCELLED,
        "shop.v1.Inventory/Watch": grpc.StatusCode.CANCELLED,
        "shop.v1.Orders/Track": grpc.StatusCode.CANCELLED,
    }


def test_deadline_during_a_delay_frees_the_worker(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel
) -> None:
    """A deadline expiring during a 30 s delay ends the call with DEADLINE_EXCEEDED and wakes the worker at
    once; the journal says the deadline expired."""
    wait_settled(server)
    t0 = time.monotonic()
    calls = [
        channel.unary_unary(RESERVE).future(b"", metadata=header("rel", "deadline", *SLOW), timeout=0.3)
        for _ in range(8)
    ]
    for call in calls:
        assert call.exception(timeout=10).code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_settled(server, timeout=5)
    assert time.monotonic() - t0 < 5
    entries = server.journal.entries("rel", "deadline")
    assert [e.code for e in entries] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 8
    assert {e.message for e in entries} == {"the deadline expired"}


def test_slow_consumer_is_paced_by_flow_control(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel
) -> None:
    """A client that reads a server stream slowly: the handler produces only as fast as the client consumes
    (HTTP/2 flow control), so memory stays bounded; cancelling closes the handler's generator."""
    state = script_state(server)
    state.update(produced=0, closed=False)
    stream = channel.unary_stream(WATCH)(b"", metadata=header("pyrel", "slow-reader"), timeout=60)
    for _ in range(3):
        next(stream)
    time.sleep(1.0)  # a producer without back-pressure would have made all 5,000 (300 MB) by now
    ahead = state["produced"] - 3
    print(f"producer ahead of a stalled reader: {ahead} messages")
    assert ahead < 400, f"the producer ran {ahead} messages (60 KB each) ahead of a stalled reader"
    for _ in range(20):  # reading on lets it go on
        next(stream)
    assert state["produced"] >= 23
    stream.cancel()
    wait_for(lambda: state["closed"], 5, "the handler's generator to be closed")
    produced = state["produced"]
    time.sleep(0.3)
    assert state["produced"] == produced
    wait_settled(server)
    good_call(catalog, channel)


CLIENT = """\
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
md = (("x-virtsvc-scenario", sys.argv[2]), ("x-virtsvc-session", "killed"), ("x-slow", "1"))
stream = channel.unary_stream("/shop.v1.Inventory/Watch")(b"", metadata=md)
next(stream)
print("streaming", flush=True)
for _ in stream:
    pass
"""


@pytest.mark.parametrize("scenario", ["rel", "pyrel"])
def test_client_killed_mid_stream(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel, scenario: str
) -> None:
    """A client process killed (SIGKILL) in the middle of a server stream (waiting in a delay, or being fed
    by a handler): the server notices, frees the worker and its threads, and serves everyone else."""
    wait_settled(server)
    baseline = threading.active_count()
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, server.address, scenario], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "streaming"
        time.sleep(0.2)
        client.kill()
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    wait_settled(server, threads=baseline, timeout=15)
    entries = server.journal.entries(scenario, "killed")
    assert [e.code for e in entries] == [grpc.StatusCode.CANCELLED]
    good_call(catalog, channel)


def test_raising_handler_is_internal_and_harmless(
    catalog: Catalog, server: VirtualServer, channel: grpc.Channel
) -> None:
    """A scenario handler that raises: INTERNAL with the error's summary and the rule's location; one that
    returns the wrong type: INTERNAL saying what it should return; its own abort keeps its status. The
    server is unharmed."""
    md = header("pyrel", "raise")
    reserve = channel.unary_unary(RESERVE)
    error = refused(lambda: reserve(encode(catalog, RESERVE, sku="BOOM"), metadata=md, timeout=5))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert re.fullmatch(
        r"the scenario handler reserve \(rule at .*pyrel\.py:\d+\) raised ValueError: "
        r"the stock ledger is on fire",
        error.details(),
    ), error.details()
    error = refused(lambda: reserve(encode(catalog, RESERVE, sku="WRONG"), metadata=md, timeout=5))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert "raised TypeError: returned int; return a dict (proto3 JSON) or a shop.v1.ReserveResponse" in (
        error.details()
    )
    error = refused(lambda: reserve(encode(catalog, RESERVE, sku="ABORT"), metadata=md, timeout=5))
    assert (error.code(), error.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "no stock today")
    assert (
        decode(
            catalog, RESERVE, reserve(encode(catalog, RESERVE, sku="x"), metadata=md, timeout=5)
        ).reservation_id
        == "py"
    )
    codes = [e.code for e in server.journal.entries("pyrel", "raise")]
    assert codes == [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OK,
    ]
    wait_settled(server)
    good_call(catalog, channel)


RELOAD = """\
scenario: reload
version: {n}
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {{reservationId: "v{n}"}}
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {{sku: "v{n}"}}
      - reply: {{sku: "v{n}"}}
"""


def test_reload_under_load(catalog: Catalog, tmp_path: Path) -> None:
    """VirtualServer.reload while 6 threads call: every call is answered OK by one version or the other
    (a stream never mixes two), none fails, and the last version wins."""
    from virtsvc.scenarios import compile_text

    versions = [compile_text(RELOAD.format(n=n), catalog, origin=f"v{n}.yaml") for n in range(2)]
    with (
        VirtualServer(catalog, versions[0], default_scenario="reload") as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stop = threading.Event()
        errors: list[str] = []
        answers: list[str] = []

        def caller(i: int) -> None:
            unary = ch.unary_unary(RESERVE)
            stream = ch.unary_stream(WATCH)
            for n in range(2000):
                if stop.is_set():
                    return
                try:
                    if n % 4 == 3:
                        skus = {decode(catalog, WATCH, r).sku for r in stream(b"", timeout=10)}
                        if len(skus) != 1:
                            errors.append(f"a stream mixed versions: {skus}")
                        answers.extend(skus)
                    else:
                        answers.append(decode(catalog, RESERVE, unary(b"", timeout=10)).reservation_id)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code()}: {exc.details()}")

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        try:
            for n in range(40):
                srv.reload(versions[n % 2])
                time.sleep(0.02)
            srv.reload(versions[1])
        finally:
            time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors[:5]
        assert set(answers) == {"v0", "v1"} and len(answers) > 50
        assert decode(catalog, RESERVE, ch.unary_unary(RESERVE)(b"", timeout=5)).reservation_id == "v1"


def test_server_concurrency_limit(catalog: Catalog, scenario_dir: Path) -> None:
    """--max-concurrency: beyond N calls in flight, RESOURCE_EXHAUSTED at once naming the limit and how to
    raise it; health and admin still answer; once calls finish, new ones are admitted."""
    scenarios = load_scenarios([scenario_dir], catalog)
    with (
        VirtualServer(catalog, scenarios, default_scenario="rel", max_concurrency=2) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        gauge = srv.dispatcher.gauge
        assert gauge is not None
        slow = [ch.unary_unary(RESERVE).future(b"", metadata=SLOW, timeout=60) for _ in range(2)]
        wait_for(lambda: gauge.value == 2, 5, "two calls in flight")
        t0 = time.monotonic()
        error = refused(lambda: ch.unary_unary(RESERVE)(b"", timeout=5))
        assert time.monotonic() - t0 < 2
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "too many concurrent calls: this virtual server answers at most 2 at a time "
            "(--max-concurrency 2); "
            "retry later, or raise the limit with --max-concurrency (VirtualServer(max_concurrency=...))"
        )
        assert healthy(srv.address)
        assert AdminClient(ch).call("ListScenarios").scenarios
        for call in slow:
            call.cancel()
        wait_settled(srv)
        assert gauge.value == 0
        good_call(catalog, ch)


def test_session_concurrency_limit(catalog: Catalog, scenario_dir: Path) -> None:
    """--max-concurrency-per-session: a session at its limit gets RESOURCE_EXHAUSTED naming the session and
    the flag (journaled in that session); other sessions are served meanwhile."""
    scenarios = load_scenarios([scenario_dir], catalog)
    with (
        VirtualServer(catalog, scenarios, max_concurrency_per_session=1) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        busy = ch.unary_unary(RESERVE).future(b"", metadata=header("rel", "busy", *SLOW), timeout=60)
        wait_for(lambda: getattr(srv.store.find("rel", "busy"), "inflight", 0) == 1, 5, "the slow call")
        error = refused(lambda: ch.unary_unary(RESERVE)(b"", metadata=header("rel", "busy"), timeout=5))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            'too many concurrent calls in session "busy" of scenario "rel": at most 1 at a time per session '
            "(--max-concurrency-per-session 1); retry later, or raise the limit with "
            "--max-concurrency-per-session (VirtualServer(max_concurrency_per_session=...))"
        )
        raw = ch.unary_unary(RESERVE)(b"", metadata=header("rel", "other"), timeout=5)
        assert decode(catalog, RESERVE, raw).reservation_id == "ok"
        assert [e.code for e in srv.journal.entries("rel", "busy")] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        busy.cancel()
        wait_settled(srv)
        raw = ch.unary_unary(RESERVE)(b"", metadata=header("rel", "busy"), timeout=5)
        assert decode(catalog, RESERVE, raw).reservation_id == "ok"


def test_flood_beyond_the_limit_is_refused_not_queued(catalog: Catalog, scenario_dir: Path) -> None:
    """50 slow calls at once on a server with --max-concurrency 4 and 4 workers: 4 are admitted and the 46
    others are refused within a second or two, instead of queueing until their deadlines expire."""
    scenarios = load_scenarios([scenario_dir], catalog)
    with (
        VirtualServer(catalog, scenarios, default_scenario="rel", max_workers=4, max_concurrency=4) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        t0 = time.monotonic()
        calls = [ch.unary_unary(RESERVE).future(b"", metadata=SLOW, timeout=8) for _ in range(50)]
        refusals = 0
        for call in calls:
            try:
                exc = call.exception(timeout=0.05 + max(0.0, t0 + 3 - time.monotonic()))
            except grpc.FutureTimeoutError:
                continue  # admitted: still in its delay
            assert exc is not None and exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            refusals += 1
        assert refusals == 46
        assert good_call_refused_or_ok(catalog, ch) is grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            call.cancel()
        wait_settled(srv)
        good_call(catalog, ch)


def good_call_refused_or_ok(catalog: Catalog, channel: grpc.Channel) -> grpc.StatusCode:
    try:
        good_call(catalog, channel)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_serve_flags_for_limits(generated: Path, scenario_dir: Path, catalog: Catalog) -> None:
    """virtsvc serve --max-concurrency / --max-concurrency-per-session / --max-message-bytes reach the
    server."""
    args = [
        "--descriptors", str(generated / "descriptors.binpb"), "--scenarios", str(scenario_dir / "rel.yaml"),
        "--default-scenario", "rel", "--max-concurrency", "3", "--max-concurrency-per-session", "1",
        "--max-message-bytes", "70000",
    ]  # fmt: skip
    with serve_process(args) as served, grpc.insecure_channel(served.address) as ch:
        serving = json.loads(next(line for line in served.lines if '"serving"' in line))
        assert (serving["max_concurrency"], serving["max_concurrency_per_session"]) == (3, 1)
        slow = ch.unary_unary(RESERVE).future(b"", metadata=header("rel", "a", *SLOW), timeout=60)
        error = first_refusal(lambda: ch.unary_unary(RESERVE)(b"", metadata=header("rel", "a"), timeout=5))
        assert "--max-concurrency-per-session 1" in error.details()
        others = [
            ch.unary_unary(RESERVE).future(b"", metadata=header("rel", f"b{i}", *SLOW), timeout=60)
            for i in range(2)
        ]
        error = first_refusal(lambda: ch.unary_unary(RESERVE)(b"", metadata=header("rel", "c"), timeout=5))
        assert "--max-concurrency 3" in error.details()
        for call in (slow, *others):
            call.cancel()
        until_admitted(lambda: good_call(catalog, ch))
        big = encode(catalog, RESERVE, sku="s" * 70_001)
        assert (
            refused(lambda: ch.unary_unary(RESERVE)(big, timeout=5)).code()
            is grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        error = refused(lambda: ch.unary_unary(RESERVE)(encode(catalog, RESERVE, sku="BIG"), timeout=5))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "70,000 bytes" in error.details()
        good_call(catalog, ch)


def first_refusal(fn: Callable[[], Any], timeout: float = 10.0) -> grpc.RpcError:
    """Calls ``fn`` until it is refused RESOURCE_EXHAUSTED: the calls meant to fill a limit may still be on
    their way to the server when the first tries arrive (those are admitted and answered)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                return exc
            raise
        if time.monotonic() > deadline:
            raise AssertionError(f"no RESOURCE_EXHAUSTED within {timeout}s")
        time.sleep(0.05)


def until_admitted(fn: Callable[[], Any], timeout: float = 10.0) -> None:
    """Calls ``fn`` until it is not refused RESOURCE_EXHAUSTED (cancelled calls free their places as the
    server notices)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_limit_flags_refuse_bad_values() -> None:
    """Limits must be whole numbers of at least 1: a usage error (exit 2) naming the flag."""
    for flag in ("--max-concurrency", "--max-concurrency-per-session", "--max-message-bytes"):
        parser = cli.build_parser()
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["serve", flag, "0"])
        assert info.value.code == 2
    options = cli.build_parser().parse_args(
        ["serve", "--max-concurrency", "5", "--max-concurrency-per-session", "2"]
    )
    assert (options.max_concurrency, options.max_concurrency_per_session) == (5, 2)


# ------------------------------------------------------------------------ bad input in files and admin text

GOOD = """\
scenario: keep
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: good}
"""

BAD_FILES: dict[str, str | bytes] = {
    "yaml-syntax": (
        "scenario: keep\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: [\n"
    ),
    "json-syntax": '{"scenario": "keep", "rules": [}',
    "wrong-types": textwrap.dedent("""\
        scenario: keep
        rules:
          - method: shop.v1.Inventory/Reserve
            delay: []
            times: many
            reply: {qtyReserved: "lots"}
          - method: 42
          - 7
        """),
    "rules-not-a-list": "scenario: keep\nrules: 5\n",
    "not-a-mapping": "- just\n- a list\n",
    "deep-nesting": (
        "scenario: keep\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply: "
        + "{a: " * 150
        + "1"
        + "}" * 150
        + "\n"
    ),
    "alias-bomb": "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(7)
    ),
    "bad-regex": textwrap.dedent("""\
        scenario: keep
        rules:
          - method: shop.v1.Inventory/Reserve
            when: {request: {sku: {$regex: "(unclosed"}}}
            reply: {reservationId: x}
        """),
    "long-regex": textwrap.dedent(f"""\
        scenario: keep
        rules:
          - method: shop.v1.Inventory/Reserve
            when: {{request: {{sku: {{$regex: "{"a" * 5000}"}}}}}}
            reply: {{reservationId: x}}
        """),
    "bad-template": textwrap.dedent("""\
        scenario: keep
        rules:
          - method: shop.v1.Inventory/Reserve
            reply: {reservationId: "{{ request.sku | nosuchfilter }}"}
        """),
    "unknown-method": "scenario: keep\nrules:\n  - method: shop.v1.Inventory/Reserv\n    reply: {}\n",
    "duplicate-keys": "scenario: keep\nscenario: again\nrules: []\n",
    "python-tag": "scenario: !!python/object/apply:os.system ['true']\nrules: []\n",
    "not-utf8": b"scenario: keep\nrules: []\n# \xff\xfe\n",
    "nul-character": "scenario: keep\x00\nrules: []\n",
}


def _file(tmp_path: Path, case: str) -> Path:
    content = BAD_FILES[case]
    suffix = ".json" if case.startswith("json") else ".yaml"
    path = tmp_path / f"{case}{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _check(path: Path, descriptors: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = cli.main(["check", "--descriptors", str(descriptors), str(path)])
    captured = capsys.readouterr()
    return rc, captured.err.splitlines()


LOCATED = r"(?P<file>[^:]+?)(?::(?P<line>\d+))?: (?P<message>.+)"


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_check_locates_every_bad_file(
    case: str, tmp_path: Path, generated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`virtsvc check` on malformed YAML/JSON, wrong types, deep nesting, alias bombs, bad regexes and
    templates, unknown methods, refused tags and bad encodings: exit 1 and only ``file:line: message``
    lines."""
    path = _file(tmp_path, case)
    rc, lines = _check(path, generated / "descriptors.binpb", capsys)
    assert rc == 1
    assert lines
    for line in lines:
        match = re.fullmatch(LOCATED, line)
        assert match and match["file"] == str(path), line
        assert "Traceback" not in line


def test_check_refuses_a_huge_file(
    tmp_path: Path, generated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as out:
        out.write("scenario: keep\nrules: []\n")
        line = "# " + "x" * 1022 + "\n"
        for _ in range(16 * 1024 + 1):
            out.write(line)
    rc, lines = _check(path, generated / "descriptors.binpb", capsys)
    assert rc == 1
    assert len(lines) == 1 and re.fullmatch(
        rf"{re.escape(str(path))}: file is too large \(.* bytes; .*\)", lines[0]
    )


@pytest.fixture(scope="module")
def admin_server(catalog: Catalog) -> Iterator[VirtualServer]:
    from virtsvc.scenarios import compile_text

    with VirtualServer(
        catalog, compile_text(GOOD, catalog, origin="keep.yaml"), default_scenario="keep"
    ) as srv:
        yield srv


@pytest.mark.parametrize("case", sorted(c for c in BAD_FILES if not isinstance(BAD_FILES[c], bytes)))
def test_admin_refuses_bad_text_like_check_and_keeps_the_good_scenario(
    case: str,
    tmp_path: Path,
    generated: Path,
    catalog: Catalog,
    admin_server: VirtualServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """PutScenario with the same bad text: INVALID_ARGUMENT whose lines are check's, located at
    ``<admin>:line``; the scenario "keep" it would have replaced still answers."""
    path = _file(tmp_path, case)
    _, expected = _check(path, generated / "descriptors.binpb", capsys)
    with grpc.insecure_channel(admin_server.address) as ch:
        error = refused(lambda: AdminClient(ch).call("PutScenario", text=BAD_FILES[case]))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        got = error.details().splitlines()
        assert got == [line.replace(str(path), "<admin>", 1) for line in expected]
        raw = ch.unary_unary(RESERVE)(b"", timeout=5)
        assert decode(catalog, RESERVE, raw).reservation_id == "good"
        assert [s.name for s in AdminClient(ch).call("ListScenarios").scenarios] == ["keep"]


def test_admin_refuses_huge_text(catalog: Catalog, admin_server: VirtualServer) -> None:
    """A PutScenario text over the loader's size bound (and over grpc's default 4 MiB message limit) is
    refused without replacing anything."""
    with grpc.insecure_channel(admin_server.address) as ch:
        text = GOOD + "#" + "x" * (5 * 1024 * 1024)
        error = refused(lambda: AdminClient(ch).call("PutScenario", text=text))
        assert error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
        assert decode(catalog, RESERVE, ch.unary_unary(RESERVE)(b"", timeout=5)).reservation_id == "good"


CATASTROPHIC = """\
scenario: redos
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: {$regex: "^(a+)+$"}}}
    reply: {reservationId: matched}
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: other}
"""


def test_catastrophic_regex_is_bounded(generated: Path, tmp_path: Path, catalog: Catalog) -> None:
    """A catastrophic-backtracking pattern is either refused at load with a located error, or a call that
    would trigger it is answered within seconds and the server keeps serving. Run in a subprocess, which is
    killed at the end, because a runaway regex holds the GIL."""
    path = tmp_path / "redos.yaml"
    path.write_text(CATASTROPHIC)
    rc, output = run_cli("check", "--descriptors", str(generated / "descriptors.binpb"), str(path))
    if rc == 1:
        assert re.search(rf"{re.escape(str(path))}:4: .*regular expression", output), output
        return
    assert rc == 0, output
    args = [
        "--descriptors",
        str(generated / "descriptors.binpb"),
        "--scenarios",
        str(path),
        "--default-scenario",
        "redos",
    ]
    with serve_process(args) as served, grpc.insecure_channel(served.address) as ch:
        evil = encode(catalog, RESERVE, sku="a" * 40 + "!")
        t0 = time.monotonic()
        try:
            raw = ch.unary_unary(RESERVE)(evil, timeout=10)
            assert decode(catalog, RESERVE, raw).reservation_id == "other"
        except grpc.RpcError as exc:
            assert exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED, "the regex ran past the deadline"
        assert time.monotonic() - t0 < 10
        assert healthy(served.address, timeout=5)


# Found by the property tests (test_fuzz.py); these inputs are kept out of their strategies until fixed.
LOADER_CRASHES = {
    # matching.py: _canonical().literal -> to_json raises ValueError for a Duration past protobuf's range
    "duration-out-of-range": textwrap.dedent("""\
        scenario: keep
        rules:
          - method: shop.v1.Inventory/Reserve
            when: {request: {holdFor: 315576000001}}
            reply: {reservationId: x}
        """),
    # _yaml.py keeps JSON's surrogate-pair escape (how json.dumps writes any emoji) as two lone surrogates;
    # templates._enum passes them to upb's values_by_name.get, which fails with SystemError
    "json-surrogate-pair": json.dumps(
        {
            "scenario": "keep",
            "rules": [
                {
                    "method": "shop.v1.Inventory/Reserve",
                    "when": {"request": {"region": "\U0001f600"}},
                    "reply": {"reservationId": "\U0001f600"},
                }
            ],
        }
    ),
}


@pytest.mark.parametrize("case", sorted(LOADER_CRASHES))
def test_check_survives_known_loader_crashes(
    case: str,
    tmp_path: Path,
    generated: Path,
    catalog: Catalog,
    admin_server: VirtualServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Inputs that crashed the loader: `virtsvc check` answers with located lines (exit 1) and the admin API
    with INVALID_ARGUMENT, the same text."""
    text = LOADER_CRASHES[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    with _ascii_failures():
        rc, lines = _check(path, generated / "descriptors.binpb", capsys)
        assert rc == 1 and lines
        assert all(re.fullmatch(LOCATED, line) for line in lines), lines
        with grpc.insecure_channel(admin_server.address) as ch:
            error = refused(lambda: AdminClient(ch).call("PutScenario", text=text))
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert error.details().splitlines() == [line.replace(str(path), "<admin>", 1) for line in lines]


@contextlib.contextmanager
def _ascii_failures() -> Iterator[None]:
    """Failures as ASCII text: lone surrogates in a report would crash pytest-xdist's transport."""
    try:
        yield
    except BaseException as exc:
        raise AssertionError(ascii(f"{type(exc).__name__}: {exc}")) from None


def test_json_escaped_emoji_loads(catalog: Catalog) -> None:
    from virtsvc.scenarios import compile_text

    text = json.dumps(
        {
            "scenario": "emoji",
            "rules": [{"method": "shop.v1.Inventory/Reserve", "reply": {"reservationId": "\U0001f600"}}],
        }
    )
    assert "\\ud83d\\ude00" in text
    with _ascii_failures():
        (scenario,) = compile_text(text, catalog, origin="emoji.json")
        body = scenario.rules[0].steps[0].body
        assert body is not None and body.static is not None
        assert decode(catalog, RESERVE, body.static).reservation_id == "\U0001f600"
