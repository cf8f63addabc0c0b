"""Bidi calls answered message by message (``per_message: true``): each incoming message matched on its own
against the method's per-message rules, answered with one reply, several, none or an error; ``replies``
by position; ``times`` and priority per message; real grpc clients in ping-pong; misuse located."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from helpers import fails

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.scenarios import Scenario, load_scenarios
from virtsvc.scenarios.loader import check_paths
from virtsvc.testing import VirtualService

TIMEOUT = 5.0
TRACK = "shop.v1.Orders/Track"

CHAT_YAML = """\
scenario: chat
rules:
  - method: shop.v1.Orders/Track                     # rule: hello
    per_message: true
    when: {request: {text: hi}}
    reply: {text: "hello {{ index }} {{ request.order_id }}"}
  - method: shop.v1.Orders/Track                     # rule: many
    per_message: true
    when: {request: {text: many}}
    stream:
      - reply: {text: one}
      - reply: {text: two}
      - reply: {text: three}
  - method: shop.v1.Orders/Track                     # rule: quiet
    per_message: true
    when: {request: {text: quiet}}
    stream: []
  - method: shop.v1.Orders/Track                     # rule: first-vip
    per_message: true
    priority: 5
    times: 1
    when: {request: {order_id: vip}}
    reply: {text: "welcome"}
  - method: shop.v1.Orders/Track                     # rule: bye
    per_message: true
    when: {request: {text: bye}}
    status: {code: ABORTED, message: "bye at {{ index }}"}
  - method: shop.v1.Orders/Track                     # rule: by-index
    per_message: true
    when:
      requests: [{text: a}, {text: b}]
    replies:
      - {text: A}
      - {text: B}
"""


def at(path: Path, marker: str) -> str:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.rstrip().endswith(f"# rule: {marker}"):
            return f"{path}:{number}"
    raise AssertionError(marker)


MD = (("x-virtsvc-scenario", "chat"),)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bidi") / "chat.yaml"
    path.write_text(CHAT_YAML)
    return path


@pytest.fixture(scope="module")
def server(catalog: Catalog, chat_file: Path) -> Iterator[VirtualServer]:
    with VirtualServer(catalog, load_scenarios(chat_file, catalog)) as srv:
        yield srv


def texts(orders: Any, pb: SimpleNamespace, *messages: tuple[str, str]) -> list[str]:
    requests = (pb.orders.TrackRequest(order_id=o, text=t) for o, t in messages)
    return [u.text for u in orders.Track(requests, metadata=MD, timeout=TIMEOUT)]


def test_each_message_is_answered_by_the_rule_it_matches(orders: Any, pb: SimpleNamespace) -> None:
    """One reply, several, or none per message, with ``index`` the message's position."""
    got = texts(orders, pb, ("o-1", "hi"), ("o-2", "many"), ("o-3", "quiet"), ("o-4", "hi"))
    assert got == ["hello 0 o-1", "one", "two", "three", "hello 3 o-4"]


def test_replies_by_position(orders: Any, pb: SimpleNamespace, chat_file: Path) -> None:
    """``when.requests`` + ``replies``: message i meets condition i and is answered by reply i."""
    assert texts(orders, pb, ("o", "a"), ("o", "b")) == ["A", "B"]
    # "b" first: the condition on message 0 is "a", so no rule answers it
    err = fails(texts, orders, pb, ("o", "b"))
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    err = fails(texts, orders, pb, ("o", "a"), ("o", "b"), ("o", "a"))
    assert err.details().startswith("no rule matched shop.v1.Orders/Track (message 2)")


def test_times_and_priority_apply_per_message(
    orders: Any, pb: SimpleNamespace, server: VirtualServer
) -> None:
    """The priority rule answers the first vip message; used up, the next one falls to the other rules."""
    sid = (("x-virtsvc-session", "vip"),)
    requests = (pb.orders.TrackRequest(order_id="vip", text="hi") for _ in range(2))
    got = [u.text for u in orders.Track(requests, metadata=MD + sid, timeout=TIMEOUT)]
    assert got == ["welcome", "hello 1 vip"]


def test_an_error_or_an_unmatched_message_ends_the_call(
    orders: Any, pb: SimpleNamespace, chat_file: Path, server: VirtualServer
) -> None:
    """Replies already sent arrive; then the rule's status, or the near miss for a message none matches."""
    call = orders.Track(
        iter([pb.orders.TrackRequest(text="hi"), pb.orders.TrackRequest(text="bye")]), metadata=MD
    )
    assert next(call).text == "hello 0 "
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.ABORTED, "bye at 1")

    call = orders.Track(
        iter([pb.orders.TrackRequest(text="hi"), pb.orders.TrackRequest(text="what")]), metadata=MD
    )
    assert next(call).text == "hello 0 "
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    details = info.value.details()
    assert details.startswith(
        'no rule matched shop.v1.Orders/Track (message 1) in scenario "chat", session "default"\n'
    )
    assert (
        f'rule at {at(chat_file, "hello")} (0 of 1 conditions held): request.text: expected "hi", got "what"'
    ) in details
    entry = server.journal.entries()[-1]
    assert entry.code is grpc.StatusCode.UNIMPLEMENTED and entry.rule == at(chat_file, "hello")


def test_ping_pong(orders: Any, pb: SimpleNamespace) -> None:
    """Each reply arrives before the client sends its next message: messages are answered as they come."""
    outbox: queue.Queue[Any] = queue.Queue()
    call = orders.Track(iter(outbox.get, None), metadata=MD, timeout=TIMEOUT)
    for i in range(3):
        outbox.put(pb.orders.TrackRequest(order_id=f"p{i}", text="hi"))
        assert next(call).text == f"hello {i} p{i}"
    outbox.put(None)
    assert list(call) == []
    assert call.code() is grpc.StatusCode.OK


def test_python_builder_and_inline_rules(catalog: Catalog, pb: SimpleNamespace, tmp_path: Path) -> None:
    """``Scenario.on(per_message=True)`` and ``virtual_service.on(per_message=True)`` with ``.replies``."""
    built = Scenario("py-chat")
    built.on(TRACK, per_message=True, when={"request": {"text": "hi"}}).reply({"text": "py {{ index }}"})
    (tmp_path / "built.json").write_text(json.dumps(built.to_data(handlers=False)))
    scenarios = load_scenarios(tmp_path / "built.json", catalog)
    with VirtualServer(catalog, scenarios) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb.orders_grpc.OrdersStub(channel)
            requests = iter([pb.orders.TrackRequest(text="hi")] * 2)
            md = (("x-virtsvc-scenario", "py-chat"),)
            assert [u.text for u in stub.Track(requests, metadata=md, timeout=TIMEOUT)] == ["py 0", "py 1"]
        with VirtualService(server) as service:
            service.on(TRACK, per_message=True, when={"requests": [{}, {"text": "b"}]}).replies(
                [{"text": "first"}, {"text": "second"}]
            )
            stub = pb.orders_grpc.OrdersStub(service.channel())
            requests = iter([pb.orders.TrackRequest(text="x"), pb.orders.TrackRequest(text="b")])
            assert [u.text for u in stub.Track(requests, timeout=TIMEOUT)] == ["first", "second"]
            requests = iter([pb.orders.TrackRequest(text="x"), pb.orders.TrackRequest(text="b")] * 2)
            err = fails(lambda: list(stub.Track(requests, timeout=TIMEOUT)))
            assert err.details().endswith(
                "(0 of 1 conditions held): replies: message 2 is past its 2 replies"
            )
            service.fail_on_unmatched = False  # the unmatched message above was the point


MISUSE_YAML = """\
scenario: bidi-misuse
rules:
  - method: shop.v1.Inventory/Reserve
    per_message: true
    reply: {}
  - method: shop.v1.Orders/Track
    per_message: yes please
    when: {request: {text: q}}
    reply: {}
  - method: shop.v1.Orders/Track
    per_message: true
    when: {request: {text: e}}
    each_request: {reply: {}}
    headers: {x: y}
  - method: shop.v1.Orders/Track
    per_message: true
    when: {any_request: {text: a}}
    replies: [{text: 1}]
  - method: shop.v1.Orders/Track
    when: {request: {text: r}}
    replies: [{text: x}]
  - method: shop.v1.Orders/Track
    per_message: true
    reply: {text: ok}
  - method: shop.v1.Orders/Track
    when: {request: {text: whole}}
    reply: {}
"""


def test_check_reports_misuse(catalog: Catalog, tmp_path: Path) -> None:
    """``virtsvc check`` locates every misuse of per-message rules."""
    path = tmp_path / "misuse.yaml"
    path.write_text(MISUSE_YAML)
    assert [str(p).replace(str(path), "P") for p in check_paths([path], catalog)] == [
        "P:4: per_message: shop.v1.Inventory/Reserve is unary; per_message answers the messages of a bidi "
        "call one by one",
        'P:7: per_message: expected true or false, got "yes please"',
        "P:13: each_request: a per-message rule answers each message with reply, replies, stream or status "
        "(and delay); remove each_request",
        "P:14: headers: a per-message rule answers each message with reply, replies, stream or status "
        "(and delay); remove headers",
        "P:17: when.any_request: a per-message rule sees one message at a time; use when.request for it, "
        "or when.requests for message i",
        "P:18: replies[0].text: expected a string, got 1",
        "P:21: replies: only a per-message rule (per_message: true) answers message i with replies[i]",
        "P:25: rule is never used: shop.v1.Orders/Track is answered message by message (the per-message "
        "rule at P:22); make this rule per_message: true too",
    ]
