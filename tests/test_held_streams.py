"""Streams the test drives: a rule's ``stream`` ending with ``{open: true}`` holds the call open, and the test
sends, fails or closes it (``virtual_service.streams(method)`` in-process and against a sidecar; the admin
API's ListStreams, PushMessage and EndStream with a grpc client and with grpcurl), over real sockets."""

from __future__ import annotations

import datetime
import functools
import json
import queue
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from helpers import fails

from virtsvc.admin import ADMIN_SERVICE, AdminClient
from virtsvc.contracts import Catalog
from virtsvc.errors import ConversionError, Refusal, ScenarioError, StreamEnded
from virtsvc.scenarios import compile_text, load_scenarios
from virtsvc.server import VirtualServer
from virtsvc.testing import RemoteServer, VirtualService

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
README = (ROOT / "README.md").read_text()
METHODS = ("ListStreams", "PushMessage", "EndStream")
WATCH = "shop.v1.Inventory/Watch"
TRACK = "shop.v1.Orders/Track"

HELD = """\
scenario: held
rules:
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {sku: A, onHand: 5}
      - open: true
  - method: shop.v1.Orders/Track
    stream: {open: true}
"""


@pytest.fixture
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    srv = VirtualServer(catalog, compile_text(HELD, catalog, origin="held.yaml"), port=0, admin=True).start()
    yield srv
    srv.stop(0)


@pytest.fixture
def admin(server: VirtualServer) -> Iterator[AdminClient]:
    with grpc.insecure_channel(server.address) as channel:
        yield AdminClient(channel)


@pytest.fixture(params=["in-process", "sidecar"])
def service(request: pytest.FixtureRequest, server: VirtualServer) -> Iterator[VirtualService]:
    """One test's session, on the server itself or through its admin API as a sidecar's tests see it."""
    remote = RemoteServer(server.address) if request.param == "sidecar" else None
    svc = VirtualService(remote or server)
    try:
        yield svc
    finally:
        svc.close()
        if remote is not None:
            remote.close()


def _md(session: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", "held"), ("x-virtsvc-session", session))


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


class _Outgoing:
    """A bidi client's messages, put by the test as it goes; ``end()`` half-closes."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._queue.get, None)

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def end(self) -> None:
        self._queue.put(None)


# -- through the test's VirtualService (the pytest plugin's fixture), in-process and as a sidecar ---------


def test_a_server_stream_sends_what_the_test_pushes(service: VirtualService, pb: SimpleNamespace) -> None:
    """After the rule's own items, the stream sends what the test pushes, in order, each validated and
    journaled as sent; `.fail` ends it with that status, and the ended stream refuses more."""
    rule = service.on(WATCH).stream([{"sku": "A", "onHand": 5}], open=True)
    stub = pb.inv_grpc.InventoryStub(service.channel())
    events = stub.Watch(pb.inv.WatchRequest(skus=["A"]), timeout=20)
    assert next(events).on_hand == 5
    [stream] = service.streams(WATCH)
    assert stream.method == WATCH and stream.rule == str(rule.location) and stream.session == service.session
    stream.send({"sku": "A", "on_hand": 4})  # proto field names...
    stream.send(pb.inv.StockEvent(sku="A", on_hand=3))  # ...a message...
    stream.send({"sku": "A", "onHand": "2"})  # ...or JSON names
    assert [next(events).on_hand for _ in range(3)] == [4, 3, 2]
    with pytest.raises(ConversionError) as bad:
        stream.send({"skuu": "A"})
    assert 'message.skuu: unknown field "skuu" of shop.v1.StockEvent; did you mean "sku"?' in str(bad.value)
    stream.fail("UNAVAILABLE", "feed lost")
    err = fails(next, events)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "feed lost")
    [call] = service.calls(WATCH)
    assert call.code is grpc.StatusCode.UNAVAILABLE
    assert [r["onHand"] for r in call.replies] == ["5", "4", "3", "2"]
    with pytest.raises(StreamEnded):
        stream.send({"sku": "A"})
    assert service.streams(WATCH, at_least=0) == []


def test_a_bidi_stream_answers_when_the_test_says(service: VirtualService, pb: SimpleNamespace) -> None:
    """A bidi call held open reads the client's messages (journaled) while the test pushes; `.close()`
    ends it with OK."""
    service.on(TRACK).stream(open=True)
    outgoing = _Outgoing()
    stub = pb.orders_grpc.OrdersStub(service.channel())
    updates = stub.Track(iter(outgoing), timeout=20)
    try:
        outgoing.put(pb.orders.TrackRequest(order_id="o-1", text="where is it?"))
        _until(lambda: [s.received for s in service.streams(TRACK)] == [1], "the message was read")
        [stream] = service.streams(TRACK)
        stream.send({"orderId": "o-1", "state": "SHIPPED"})
        update = next(updates)
        assert (update.order_id, update.state) == ("o-1", pb.orders.Order.SHIPPED)
        stream.close()
        assert list(updates) == []
    finally:
        outgoing.end()
    [call] = service.calls(TRACK)
    assert call.code is grpc.StatusCode.OK
    assert call.requests == [{"orderId": "o-1", "text": "where is it?"}]
    assert call.replies == [{"orderId": "o-1", "state": "SHIPPED"}]


def test_the_session_s_end_ends_what_the_test_left_open(service: VirtualService, pb: SimpleNamespace) -> None:
    """A stream the test never ends is ended when its session is (the fixture's teardown): ABORTED,
    saying why."""
    service.use("held")
    # The service under test's own channel, carrying the session's metadata (the fixture's channels are
    # closed first at teardown).
    with grpc.insecure_channel(service.address) as channel:
        stub = pb.inv_grpc.InventoryStub(channel)
        events = stub.Watch(pb.inv.WatchRequest(), metadata=service.metadata, timeout=20)
        assert next(events).sku == "A"
        service.streams(WATCH)
        session = service.session
        service.close()
        err = fails(next, events)
    assert err.code() is grpc.StatusCode.ABORTED
    assert err.details() == (
        f'the session "{session}" of scenario "held" ended (reset or expired) while shop.v1.Inventory/Watch '
        "was held open for the test to drive; nothing more will be sent on this stream"
    )


def test_waiting_for_a_stream_that_never_opens_says_why(service: VirtualService, pb: SimpleNamespace) -> None:
    """`streams()` waits for the call to arrive; when none is held open in time, it says what the method's
    calls did instead."""
    service.on(WATCH).stream([{"sku": "A"}])  # not held open
    list(pb.inv_grpc.InventoryStub(service.channel()).Watch(pb.inv.WatchRequest(), timeout=20))
    with pytest.raises(AssertionError) as info:
        service.streams(WATCH, timeout=0.2)
    assert str(info.value).startswith(
        f"expected 1 open stream of {WATCH} within 0.2 s, found 0; its calls that have ended: OK. A stream "
        "is held open by a rule whose stream ends with {open: true} (.stream(items, open=True))"
    )
    with pytest.raises(ValueError, match=r'unknown method "shop\.v1\.Inventory/Wach"'):
        service.streams("shop.v1.Inventory/Wach", at_least=0)


# -- the admin API, with a grpc client --------------------------------------------------------------


def test_the_admin_api_drives_held_streams(
    server: VirtualServer, admin: AdminClient, pb: SimpleNamespace
) -> None:
    """ListStreams (waiting for the call with min_count), PushMessage (validated, journaled) and EndStream;
    refusals name what is wrong and the near miss."""
    with grpc.insecure_channel(server.address) as channel:
        events = pb.inv_grpc.InventoryStub(channel).Watch(
            pb.inv.WatchRequest(), metadata=_md("a"), timeout=20
        )
        assert next(events).on_hand == 5
        timeout = datetime.timedelta(seconds=10)
        [info] = admin.call("ListStreams", session="a", method=WATCH, min_count=1, timeout=timeout).streams
        assert (info.scenario, info.session, info.method, info.kind, info.rule) == (
            "held",
            "a",
            WATCH,
            "server_streaming",
            "held.yaml:3",
        )
        assert info.id.startswith(server.dispatcher.streams.holder + "-")
        assert admin.call("ListStreams", session="other").streams == []
        admin.call("PushMessage", id=info.id, message={"sku": "B", "onHand": 7})
        assert next(events).on_hand == 7
        err = fails(admin.call, "PushMessage", id=info.id, message={"sku": "B", "onHnd": 1})
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == (
            f'PushMessage {info.id} ({WATCH}): message.onHnd: unknown field "onHnd" of shop.v1.StockEvent; '
            'did you mean "onHand" or "on_hand"?'
        )
        err = fails(admin.call, "PushMessage", id=info.id, message={"onHand": "many"})
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "message.onHand: expected an integer" in (
            err.details() or ""
        )
        err = fails(admin.call, "EndStream", id=info.id, code="UNAVAILBLE")
        assert (err.code(), err.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            'EndStream: unknown status code "UNAVAILBLE"; did you mean "UNAVAILABLE"? give a code\'s name '
            "(UNAVAILABLE) or number, or none for OK",
        )
        [again] = admin.call("ListStreams", method="shop.v1.Inventory.Watch").streams
        assert again.sent == 1
        admin.call("EndStream", id=info.id, code="14", message="feed lost")
        err = fails(next, events)
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "feed lost")
    err = fails(admin.call, "PushMessage", id=info.id, message={})
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == (
        f'no open stream "{info.id}" here (it has ended, or never was); open streams: none (ListStreams '
        "lists them)"
    )
    [entry] = admin.call("GetJournal", session="a").entries
    assert [dict(r) for r in entry.replies] == [{"sku": "A", "onHand": "5"}, {"sku": "B", "onHand": "7"}]
    assert (entry.code, entry.message) == ("UNAVAILABLE", "feed lost")
    err = fails(admin.call, "ListStreams", method="shop.v1.Inventory/Wach")
    assert err.code() is grpc.StatusCode.NOT_FOUND and "shop.v1.Inventory/Watch" in (err.details() or "")
    err = fails(admin.call, "EndStream", id="")
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_bidi_stream_through_the_admin_api(
    server: VirtualServer, admin: AdminClient, pb: SimpleNamespace
) -> None:
    """The bidi method held open from its first moment (`stream: {open: true}`): pushed, counted, closed."""
    outgoing = _Outgoing()
    with grpc.insecure_channel(server.address) as channel:
        updates = pb.orders_grpc.OrdersStub(channel).Track(iter(outgoing), metadata=_md("b"), timeout=20)
        try:
            [info] = admin.call("ListStreams", session="b", min_count=1).streams
            assert info.kind == "bidi_streaming" and info.rule == "held.yaml:7"
            for text in ("one", "two"):
                outgoing.put(pb.orders.TrackRequest(text=text))
            _until(
                lambda: [s.received for s in admin.call("ListStreams", session="b").streams] == [2],
                "both messages were read",
            )
            admin.call("PushMessage", id=info.id, message={"text": "seen 2", "state": "CONFIRMED"})
            assert next(updates).text == "seen 2"
            admin.call("EndStream", id=info.id)
            assert list(updates) == []
        finally:
            outgoing.end()
    [entry] = admin.call("GetJournal", session="b").entries
    assert [dict(r)["text"] for r in entry.requests] == ["one", "two"]
    assert entry.code == "OK" and [dict(r) for r in entry.replies] == [
        {"text": "seen 2", "state": "CONFIRMED"}
    ]


def test_stopping_the_server_ends_held_streams_at_once(catalog: Catalog, pb: SimpleNamespace) -> None:
    """A server that stops does not wait out its grace for streams held open: UNAVAILABLE, saying why."""
    srv = VirtualServer(catalog, compile_text(HELD, catalog, origin="held.yaml"), port=0).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            events = pb.inv_grpc.InventoryStub(channel).Watch(pb.inv.WatchRequest(), metadata=_md("s"))
            next(events)
            srv.dispatcher.streams.wait(None, "s", WATCH, 1, 10)
            stopper = threading.Thread(target=srv.stop, args=(30,))
            stopper.start()
            err = fails(next, events)
            stopper.join(20)
            assert not stopper.is_alive()  # ended with the streams, not after the 30 s grace
    finally:
        srv.stop(0)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert err.details() == (
        "the virtual server is stopping: shop.v1.Inventory/Watch was held open for the test to drive and is "
        "ended; retry against a server that is serving"
    )


def test_a_client_that_goes_away_frees_its_stream(
    server: VirtualServer, admin: AdminClient, pb: SimpleNamespace
) -> None:
    """A cancelled call leaves the listing; pushing to it says it has ended."""
    with grpc.insecure_channel(server.address) as channel:
        events = pb.inv_grpc.InventoryStub(channel).Watch(pb.inv.WatchRequest(), metadata=_md("c"))
        next(events)
        [info] = admin.call("ListStreams", session="c", min_count=1).streams
        events.cancel()
        _until(lambda: not admin.call("ListStreams", session="c").streams, "the stream was let go")
    assert fails(admin.call, "PushMessage", id=info.id, message={}).code() is grpc.StatusCode.NOT_FOUND
    [entry] = admin.call("GetJournal", session="c").entries
    assert entry.code == "CANCELLED"


def test_a_client_deadline_ends_a_held_stream(
    server: VirtualServer, admin: AdminClient, pb: SimpleNamespace
) -> None:
    """Client deadlines stay real: a held stream the test never ends gets DEADLINE_EXCEEDED at the client's
    deadline, journaled so."""
    with grpc.insecure_channel(server.address) as channel:
        events = pb.inv_grpc.InventoryStub(channel).Watch(pb.inv.WatchRequest(), metadata=_md("d"), timeout=1)
        next(events)
        assert fails(next, events).code() is grpc.StatusCode.DEADLINE_EXCEEDED
    _until(lambda: bool(admin.call("GetJournal", session="d").entries), "the call was journaled")
    [entry] = admin.call("GetJournal", session="d").entries
    assert entry.code == "DEADLINE_EXCEEDED" and admin.call("ListStreams", session="d").streams == []


def test_a_push_over_the_size_limit_is_refused_to_the_pusher(catalog: Catalog, pb: SimpleNamespace) -> None:
    """The server's message size limit is checked when the test pushes, not left to end the client's call
    (through the admin API, grpc's own receive limit refuses such a request first)."""
    scenarios = compile_text(HELD, catalog, origin="held.yaml")
    srv = VirtualServer(catalog, scenarios, port=0, max_message_bytes=1024).start()
    try:
        service = VirtualService(srv)
        service.use("held")
        events = pb.inv_grpc.InventoryStub(service.channel()).Watch(pb.inv.WatchRequest(), timeout=20)
        next(events)
        [stream] = service.streams(WATCH)
        with pytest.raises(Refusal) as info:
            stream.send({"sku": "x" * 2000})
        assert (info.value.code, info.value.message) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the message pushed to shop.v1.Inventory/Watch is 2,003 bytes, over the maximum message size "
            "of 1,024 bytes; raise it with --max-message-bytes",
        )
        stream.send({"sku": "B"})
        assert next(events).sku == "B"  # the stream goes on
        stream.close()
        service.close()
    finally:
        srv.stop(0)


# -- grpcurl: the client and the admin calls ---------------------------------------------------------

needs_grpcurl = pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")


def _grpcurl(address: str, method: str, body: dict[str, Any]) -> Any:
    out = subprocess.run(
        ["grpcurl", "-plaintext", "-d", json.dumps(body), address, f"{ADMIN_SERVICE}/{method}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def _objects(process: subprocess.Popen[str]) -> queue.Queue[Any]:
    """The JSON objects grpcurl prints (pretty-printed, one after another), as they come."""
    found: queue.Queue[Any] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout

    def read() -> None:
        decoder, buffer = json.JSONDecoder(), ""
        for line in stdout:
            buffer += line
            try:
                obj, _ = decoder.raw_decode(buffer.strip())
            except json.JSONDecodeError:
                continue
            found.put(obj)
            buffer = ""

    threading.Thread(target=read, daemon=True).start()
    return found


def _readme_block(lang: str, after: str) -> str:
    start = README.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert match, f"no {lang} block after {after!r} in README.md"
    return match.group(1)


@needs_grpcurl
def test_the_readme_s_grpcurl_commands_drive_a_held_stream(catalog: Catalog) -> None:
    """The README's commands as written (its address and the id replaced): grpcurl watches, ListStreams
    names the stream, PushMessage's message is printed, EndStream's status is grpcurl's error."""
    block = _readme_block("sh", "With the server of command 1 and the scenario above")
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [c[-1] for c in commands] == ["&", *(f"{ADMIN_SERVICE}/{m}" for m in METHODS)]
    srv = VirtualServer(catalog, load_scenarios(SCENARIOS / "held-streams.yaml", catalog), port=0).start()

    def args(command: list[str], stream_id: str = "") -> list[str]:
        out = [a.replace("127.0.0.1:50051", srv.address) for a in command if a != "&"]
        return [a.replace('"ID"', json.dumps(stream_id)) for a in out]

    watch = subprocess.Popen(args(commands[0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = _objects(watch)
        assert printed.get(timeout=20) == {"sku": "ABC-1", "onHand": "10"}
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=30, check=True)
        [info] = json.loads(run(args(commands[1])).stdout)["streams"]
        assert (info["scenario"], info["session"], info["method"]) == ("held-streams", "s1", WATCH)
        assert info["rule"].endswith("held-streams.yaml:7")
        assert json.loads(run(args(commands[2], info["id"])).stdout) == {}
        assert printed.get(timeout=20) == {"sku": "ABC-1", "onHand": "9"}
        assert json.loads(run(args(commands[3], info["id"])).stdout) == {}
        code = watch.wait(timeout=20)
        assert watch.stderr is not None
        stderr = watch.stderr.read()
    finally:
        watch.kill()
        watch.wait()
        srv.stop(0)
    assert code != 0
    assert "Code: Unavailable" in stderr and "Message: feed lost" in stderr


@needs_grpcurl
def test_grpcurl_as_a_bidi_client(server: VirtualServer, admin: AdminClient) -> None:
    """grpcurl sending a bidi stream from its stdin while the test pushes the answers."""
    track = subprocess.Popen(
        ["grpcurl", "-plaintext", "-H", "x-virtsvc-scenario: held", "-H", "x-virtsvc-session: h",
         "-d", "@", server.address, TRACK],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        printed = _objects(track)
        assert track.stdin is not None
        track.stdin.write('{"orderId": "o-9", "text": "hello"}\n')
        track.stdin.flush()
        [info] = admin.call("ListStreams", session="h", min_count=1).streams
        _until(
            lambda: [s.received for s in admin.call("ListStreams", session="h").streams] == [1],
            "grpcurl's message was read",
        )
        admin.call("PushMessage", id=info.id, message={"orderId": "o-9", "state": "PENDING"})
        assert printed.get(timeout=20) == {"orderId": "o-9", "state": "PENDING"}
        track.stdin.close()  # half-closes: the stream stays open until the test ends it
        admin.call("PushMessage", id=info.id, message={"text": "after"})
        assert printed.get(timeout=20) == {"text": "after"}
        admin.call("EndStream", id=info.id)
        code = track.wait(timeout=20)
    finally:
        track.kill()
        track.wait()
    assert code == 0
    [entry] = admin.call("GetJournal", session="h").entries
    assert [dict(r) for r in entry.requests] == [{"orderId": "o-9", "text": "hello"}]


# -- scale-out: a stream lives on the replica serving its call -------------------------------------------


def test_replicas_say_which_one_holds_a_stream(redis_url: str, catalog: Catalog, pb: SimpleNamespace) -> None:
    """Two replicas on one Redis: a push sent to the one that does not hold the stream is NOT_FOUND naming
    the holder; a reset through either ends the stream (the holder sees its session gone)."""
    from virtsvc.engine.redis_store import RedisStore

    scenarios = compile_text(HELD, catalog, origin="held.yaml")
    first, second = (
        VirtualServer(catalog, scenarios, port=0, admin=True, store=RedisStore(redis_url)).start()
        for _ in range(2)
    )
    try:
        with grpc.insecure_channel(first.address) as one, grpc.insecure_channel(second.address) as two:
            events = pb.inv_grpc.InventoryStub(one).Watch(
                pb.inv.WatchRequest(), metadata=_md("r"), timeout=30
            )
            next(events)
            [info] = AdminClient(one).call("ListStreams", session="r", min_count=1).streams
            assert AdminClient(two).call("ListStreams", session="r").streams == []
            err = fails(AdminClient(two).call, "PushMessage", id=info.id, message={"sku": "B"})
            holders = [first.dispatcher.streams.holder, second.dispatcher.streams.holder]
            assert err.code() is grpc.StatusCode.NOT_FOUND
            assert err.details() == (
                f"the stream {info.id} is held by another replica or worker ({holders[0]}), not by this one "
                f"({holders[1]}): a stream is driven through the server whose call holds it; send this call "
                "to that server's own address"
            )
            assert AdminClient(two).call("ResetSession", scenario="held", session="r").existed
            err = fails(next, events)
            assert err.code() is grpc.StatusCode.ABORTED and 'session "r" of scenario "held" ended' in (
                err.details() or ""
            )
    finally:
        first.stop(0)
        second.stop(0)


# -- what `virtsvc check` says --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "{method: shop.v1.Inventory/Reserve, stream: [{open: true}]}",
            "x.yaml:3: stream: shop.v1.Inventory/Reserve is unary; a stream held open needs a "
            "server-streaming or bidi method",
        ),
        (
            "{method: shop.v1.Inventory/Watch, stream: [{open: true}, {reply: {sku: A}}]}",
            "x.yaml:3: stream[0]: {open: true} holds the stream open after the items before it, so it comes "
            "last; move the items after it before it",
        ),
        (
            "{method: shop.v1.Inventory/Watch, stream: {open: yes please}}",
            'x.yaml:3: stream.open: expected true (hold the stream open for the test), got "yes please"; '
            "without it, remove the key",
        ),
        (
            "{method: shop.v1.Inventory/Watch, stream: [{open: true, reply: {sku: A}}]}",
            "x.yaml:3: stream[0].reply: {open: true} stands alone: the messages the test pushes come later; "
            "move reply to an item of its own before it",
        ),
        (
            "{method: shop.v1.Inventory/Watch, stream: [{open: true}], status: UNAVAILABLE}",
            "x.yaml:3: status: a stream held open ends when the test ends it (.close() or "
            ".fail(code, message); EndStream through the admin API); remove status",
        ),
        (
            "{method: shop.v1.Orders/Track, per_message: true, stream: [{open: true}]}",
            "x.yaml:3: stream: a per-message rule answers one message at a time and cannot hold the call "
            "open; hold it open from a rule without per_message",
        ),
        (
            "{method: shop.v1.Inventory/Watch, stream: [{opne: true}]}",
            'x.yaml:3: unknown stream item key "opne"; did you mean "open"?',
        ),
    ],
)
def test_check_locates_misuse_of_open(catalog: Catalog, rule: str, message: str) -> None:
    """Each misuse of `{open: true}` is one located line saying what to do."""
    with pytest.raises(ScenarioError) as info:
        compile_text(f"scenario: x\nrules:\n  - {rule}\n", catalog, origin="x.yaml")
    assert any(line.startswith(message) for line in str(info.value).splitlines()), str(info.value)


# -- the README's pytest example ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["in-process", "sidecar"])
def test_the_readme_example_passes(pytester: pytest.Pytester, catalog: Catalog, where: str) -> None:
    """The README's pytest block, as a project of its own with the README's configuration: on the plugin's
    in-process server, and against a sidecar (--virtsvc-address) through the admin API."""
    from virtsvc.contracts import protoc

    for folder in ("protos", "scenarios"):
        shutil.copytree(ROOT / folder, pytester.path / folder)
    protoc.generate(pytester.path / "protos", pytester.path / "generated")
    pytester.makefile(".toml", pyproject=_readme_block("toml", "Configure it once"))
    pytester.makepyfile(test_held=_readme_block("python", "runs this block as a pytest project, in-process"))
    if where == "in-process":
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    else:
        sidecar = VirtualServer(catalog, port=0, admin=True).start()
        try:
            result = pytester.runpytest_subprocess(
                "-p", "no:cacheprovider", "--virtsvc-address", sidecar.address
            )
        finally:
            sidecar.stop(0)
    result.assert_outcomes(passed=2)


def test_the_readme_s_rules_compile(catalog: Catalog) -> None:
    """The README's two rules are valid as written, and hold their streams open."""
    import textwrap

    block = _readme_block("yaml", "holds it open from the start")
    [scenario] = compile_text("scenario: x\nrules:\n" + textwrap.indent(block, "  "), catalog, origin="x")
    assert [(r.method, r.steps[0].open, len(r.steps[0].stream or ())) for r in scenario.rules] == [
        (WATCH, True, 1),
        (TRACK, True, 0),
    ]
