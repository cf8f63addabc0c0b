"""Passthrough to real services: per rule, per scenario, and server-wide (--mode spy|passthrough), against a
real upstream (a hand-written grpcio servicer on loopback) and one that is down."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from _upstream import Upstream, every_kind, run_virtsvc, start_upstream
from google.protobuf import empty_pb2

from virtsvc.contracts import Catalog
from virtsvc.errors import ConfigError, ScenarioError
from virtsvc.scenarios.loader import check_paths, compile_text
from virtsvc.server import ServeOptions, VirtualServer


@pytest.fixture(scope="module")
def upstream(pb: SimpleNamespace) -> Iterator[Upstream]:
    up = start_upstream(pb)
    try:
        yield up
    finally:
        up.stop()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def down() -> str:
    return f"127.0.0.1:{free_port()}"


SCENARIO = """
scenario: mixed
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: SIM}}
    reply: {reservationId: simulated}
  - method: shop.v1.Inventory/Reserve
    passthrough: inventory
  - method: shop.v1.Inventory/GetItem
    sequence:
      - passthrough: inventory
      - status: {code: UNAVAILABLE, message: flaky}
---
scenario: real-rest
passthrough: inventory
rules:
  - method: shop.v1.Payments/Charge
    reply: {chargeId: simulated}
---
scenario: via-down
passthrough: down
rules: []
---
scenario: child
extends: real-rest
rules: []
"""


@pytest.fixture
def serve(catalog: Catalog, upstream: Upstream, down: str) -> Iterator[Any]:
    """``serve(mode=...)`` starts a virtual server with the upstreams ``inventory`` (real) and ``down``."""
    servers: list[VirtualServer] = []
    channels: list[grpc.Channel] = []

    def start(mode: str = "simulate", text: str = SCENARIO) -> SimpleNamespace:
        upstreams = {"inventory": upstream.address, "down": down}
        scenarios = compile_text(text, catalog, origin="mixed.yaml", upstreams=upstreams)
        server = VirtualServer(catalog, scenarios, port=0, upstreams=upstreams, mode=mode).start()
        servers.append(server)
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        return SimpleNamespace(server=server, channel=channel)

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(0)


def test_passthrough_mode_answers_every_kind_exactly_as_the_real_service(
    serve: Any, upstream: Upstream, pb: SimpleNamespace
) -> None:
    """--mode passthrough: messages, headers, trailers, status and rich details of all four kinds are the real
    service's, byte for byte, and each call is journaled as forwarded to the upstream."""
    proxy = serve("passthrough")
    with grpc.insecure_channel(upstream.address) as direct:
        expected = every_kind(pb, direct)
    got = every_kind(pb, proxy.channel)
    assert got == expected
    assert got[1][3] is grpc.StatusCode.RESOURCE_EXHAUSTED and got[2]  # the rich error and its details
    entries = proxy.server.journal.entries()
    assert [e.method.rpartition("/")[2] for e in entries] == [
        "Reserve",
        "Reserve",
        "Watch",
        "BulkUpdate",
        "Track",
    ]
    assert {e.forwarded for e in entries} == {"inventory"}
    assert {e.rule for e in entries} == {"--mode passthrough"}
    track = entries[-1].to_dict()
    assert track["requests"] == [{"orderId": "o1", "text": "hi"}, {"orderId": "o1", "text": "ho"}]
    assert [r["text"] for r in track["replies"]] == ["hi #0", "ho #1"]
    error = entries[1].to_dict()
    assert error["code"] == "RESOURCE_EXHAUSTED" and error["details"][0]["reason"] == "OUT_OF_STOCK"
    assert entries[0].to_dict()["trailers"] == {"x-trace": "t-A", "x-api-key": "k-12345"}


def test_the_callers_metadata_is_forwarded_without_virtsvcs_routing(
    serve: Any, upstream: Upstream, pb: SimpleNamespace
) -> None:
    """The caller's headers reach the upstream; x-virtsvc-* headers and virtsvc-* baggage members do not,
    other baggage members do; the caller's deadline becomes the upstream call's."""
    proxy = serve("passthrough")
    inv = pb.inv_grpc.InventoryStub(proxy.channel)
    metadata = (
        ("x-tenant", "acme"),
        ("x-virtsvc-scenario", "mixed"),
        ("x-virtsvc-session", "s1"),
        ("baggage", "virtsvc-scenario=mixed,tenant=acme"),
    )
    before = len(upstream.seen)
    inv.Reserve(pb.inv.ReserveRequest(sku="A", qty=1), metadata=metadata, timeout=4)
    seen = upstream.seen[before]
    assert seen["metadata"]["x-tenant"] == "acme"
    assert not [k for k in seen["metadata"] if k.startswith("x-virtsvc-")]
    assert seen["metadata"]["baggage"] == "tenant=acme"
    # gRPC writes the grpc-timeout header rounded up to a coarser unit, so the upstream may see a little more
    # than the caller's 4 s, never the unbounded call a dropped deadline would give.
    assert 2.0 < seen["timeout"] <= 4.5
    entry = proxy.server.journal.entries(scenario="mixed", session="s1")[-1]  # filed under the names sent
    assert entry.forwarded == "inventory"


def test_a_cancelled_call_cancels_the_upstream_call(
    serve: Any, upstream: Upstream, pb: SimpleNamespace
) -> None:
    """The caller cancelling (or its deadline passing) ends the forwarded call at the upstream too."""
    proxy = serve("passthrough")
    inv = pb.inv_grpc.InventoryStub(proxy.channel)
    before = len(upstream.seen)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        inv.Ping(empty_pb2.Empty(), metadata=(("x-wait", "5"),), timeout=0.5)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    deadline = time.monotonic() + 3
    while "cancelled" not in upstream.seen[before] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.seen[before]["cancelled"] is True


def test_a_rule_forwards_its_calls_and_the_others_stay_simulated(
    serve: Any, upstream: Upstream, pb: SimpleNamespace
) -> None:
    """`passthrough: NAME` on a rule forwards only the calls that rule answers; a sequence can mix real and
    simulated answers; the journal names the rule and the upstream."""
    proxy = serve()
    inv = pb.inv_grpc.InventoryStub(proxy.channel)
    md = (("x-virtsvc-scenario", "mixed"),)
    assert inv.Reserve(pb.inv.ReserveRequest(sku="SIM"), metadata=md).reservation_id == "simulated"
    real, call = inv.Reserve.with_call(pb.inv.ReserveRequest(sku="B", qty=4), metadata=md)
    assert real.reservation_id == "real-B-4"
    assert ("x-trace", "t-B") in tuple(call.trailing_metadata())
    assert inv.GetItem(pb.inv.GetItemRequest(sku="X"), metadata=md).title == "Widget"
    with pytest.raises(grpc.RpcError) as info:
        inv.GetItem(pb.inv.GetItemRequest(sku="X"), metadata=md)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, "flaky")
    entries = proxy.server.journal.entries(scenario="mixed")
    assert [e.forwarded for e in entries] == [None, "inventory", "inventory", None]
    assert entries[1].rule == "mixed.yaml:7"


def test_a_scenario_passthrough_answers_what_no_rule_matches(
    serve: Any, upstream: Upstream, pb: SimpleNamespace
) -> None:
    """A scenario's `passthrough:` is its fallback: its rules answer first, the rest is real, and a scenario
    extending it inherits the fallback."""
    proxy = serve()
    pay = pb.pay_grpc.PaymentsStub(proxy.channel)
    inv = pb.inv_grpc.InventoryStub(proxy.channel)
    for scenario in ("real-rest", "child"):
        md = (("x-virtsvc-scenario", scenario),)
        assert pay.Charge(pb.pay.ChargeRequest(account="a"), metadata=md).charge_id == "simulated"
        assert inv.Reserve(pb.inv.ReserveRequest(sku="C", qty=1), metadata=md).reservation_id == "real-C-1"
    entry = proxy.server.journal.entries(scenario="real-rest")[-1]
    assert (entry.forwarded, entry.rule) == ("inventory", "mixed.yaml:15")


def test_spy_mode_forwards_what_no_rule_answers(serve: Any, upstream: Upstream, pb: SimpleNamespace) -> None:
    """--mode spy: scenario rules first; calls no rule matches, and calls naming no scenario, go to the first
    upstream; an unknown scenario is still refused."""
    proxy = serve(
        "spy",
        "scenario: only\nrules:\n"
        + "  - {method: shop.v1.Inventory/Reserve, when: {request: {sku: S}}, reply: {reservationId: sim}}\n",
    )
    inv = pb.inv_grpc.InventoryStub(proxy.channel)
    md = (("x-virtsvc-scenario", "only"),)
    assert inv.Reserve(pb.inv.ReserveRequest(sku="S"), metadata=md).reservation_id == "sim"
    assert inv.Reserve(pb.inv.ReserveRequest(sku="R", qty=2), metadata=md).reservation_id == "real-R-2"
    assert inv.Reserve(pb.inv.ReserveRequest(sku="R", qty=3)).reservation_id == "real-R-3"
    with pytest.raises(grpc.RpcError) as info:
        inv.Reserve(pb.inv.ReserveRequest(sku="R"), metadata=(("x-virtsvc-scenario", "onyl"),))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert [e.forwarded for e in proxy.server.journal.entries()] == [None, "inventory", "inventory", None]
    assert proxy.server.journal.entries()[1].rule == "--mode spy"


@pytest.mark.parametrize("mode", ["passthrough", "scenario"])
def test_an_unreachable_upstream_answers_unavailable_naming_it(
    serve: Any, down: str, pb: SimpleNamespace, mode: str
) -> None:
    """An upstream that is down: UNAVAILABLE naming the upstream and its address, well within the deadline,
    for unary and streaming calls alike."""
    if mode == "passthrough":
        proxy = serve("simulate", "scenario: x\nrules: []\npassthrough: down\n")
        md: tuple[tuple[str, str], ...] = (("x-virtsvc-scenario", "x"),)
    else:
        proxy = serve()
        md = (("x-virtsvc-scenario", "via-down"),)
    inv = pb.inv_grpc.InventoryStub(proxy.channel)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=md, timeout=3)
    with pytest.raises(grpc.RpcError) as streamed:
        list(inv.Watch(pb.inv.WatchRequest(skus=["a"]), metadata=md, timeout=3))
    assert time.monotonic() - started < 3
    for err in (info.value, streamed.value):
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert err.details().startswith(f'upstream "down" at {down} is unavailable: ')
    entry = proxy.server.journal.entries()[-1]
    assert (entry.forwarded, entry.code) == ("down", grpc.StatusCode.UNAVAILABLE)


def test_a_slow_upstream_never_holds_the_caller_past_its_deadline(serve: Any, pb: SimpleNamespace) -> None:
    """A forwarded call ends at the caller's deadline even when the upstream takes longer."""
    proxy = serve("passthrough")
    inv = pb.inv_grpc.InventoryStub(proxy.channel)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        inv.Ping(empty_pb2.Empty(), metadata=(("x-sleep", "2"),), timeout=0.4)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5


def test_unknown_upstreams_are_located_problems_with_did_you_mean(catalog: Catalog, tmp_path: Path) -> None:
    """A `passthrough:` naming an upstream that is not declared is a file:line problem, with the closest name
    and the declared ones; without any upstream declared it says how to declare one."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "scenario: s\npassthrough: inventroy\nrules:\n"
        "  - method: shop.v1.Inventory/Reserve\n    passthrough: paymnets\n"
        "  - method: shop.v1.Inventory/GetItem\n    passthrough: inventory\n    reply: {}\n",
        encoding="utf-8",
    )
    messages = [str(p) for p in check_paths([path], catalog, ["inventory", "payments"])]
    assert messages == [
        f'{path}:2: passthrough: unknown upstream "inventroy"; did you mean "inventory"?; '
        "declared upstreams: inventory, payments",
        f'{path}:5: passthrough: unknown upstream "paymnets"; '
        'did you mean "payments"?; declared upstreams: inventory, payments',
        f"{path}:8: reply: a passthrough relays the upstream's own answer; "
        + "remove the reply or the passthrough",
    ]
    none = [str(p) for p in check_paths([path], catalog)]
    assert (
        f'{path}:2: passthrough: unknown upstream "inventroy"; '
        + "no upstream is declared (serve --upstream NAME=HOST:PORT)"
        in none
    )
    with pytest.raises(ScenarioError):
        compile_text("scenario: t\npassthrough: nope\n", catalog, upstreams=["inventory"])


def test_modes_that_forward_need_an_upstream() -> None:
    """--mode spy|passthrough without --upstream, or an unknown mode, is one clear configuration error."""
    with pytest.raises(ConfigError, match="--mode spy forwards calls to a real service: declare it with"):
        ServeOptions(mode="spy")
    with pytest.raises(
        ConfigError, match="mode must be one of simulate, spy, passthrough, not 'spi'; did you mean 'spy'"
    ):
        ServeOptions(mode="spi", upstreams={"a": "127.0.0.1:1"})


def test_serve_forwards_with_upstream_and_mode_flags(
    spawn: Any, upstream: Upstream, pb: SimpleNamespace, tmp_path: Path
) -> None:
    """`virtsvc serve --upstream NAME=HOST:PORT --mode spy` as a real process: the serving event lists the
    mode and upstreams; a scenario rule answers first and the rest goes to the real service."""
    (tmp_path / "s.yaml").write_text(
        "scenario: s\nrules:\n  - method: shop.v1.Inventory/Reserve\n    when: {request: {sku: S}}\n"
        "    reply: {reservationId: sim}\n"
        "  - method: shop.v1.Inventory/GetItem\n    passthrough: inventory\n",
        encoding="utf-8",
    )
    protos = Path(__file__).resolve().parent.parent / "protos"
    serve = spawn(
        "serve", "--protos", str(protos), "--scenarios", "s.yaml", "--port", "0",
        "--upstream", f"inventory={upstream.address}", "--mode", "spy", "--default-scenario", "s",
    )  # fmt: skip
    ready = serve.wait_serving()
    assert (ready["mode"], ready["upstreams"]) == ("spy", {"inventory": upstream.address})
    with grpc.insecure_channel(serve.address) as channel:
        inv = pb.inv_grpc.InventoryStub(channel)
        assert inv.Reserve(pb.inv.ReserveRequest(sku="S"), timeout=5).reservation_id == "sim"
        assert inv.Reserve(pb.inv.ReserveRequest(sku="Q", qty=1), timeout=5).reservation_id == "real-Q-1"
        assert inv.GetItem(pb.inv.GetItemRequest(sku="Q"), timeout=5).title == "Widget"
    assert serve.stop() == 0


def test_serve_refuses_an_unknown_upstream_in_a_scenario(upstream: Upstream, tmp_path: Path) -> None:
    """A scenario naming an undeclared upstream: serve and check exit 1 with the file:line problem."""
    (tmp_path / "s.yaml").write_text(
        "scenario: s\nrules:\n  - method: shop.v1.Inventory/GetItem\n    passthrough: invetory\n",
        encoding="utf-8",
    )
    protos = str(Path(__file__).resolve().parent.parent / "protos")
    for command in ("serve", "check"):
        args = [command, "--protos", protos, "--upstream", f"inventory={upstream.address}"]
        args += ["--scenarios", "s.yaml"] if command == "serve" else ["s.yaml"]
        done = run_virtsvc(*args, cwd=tmp_path)
        assert done.returncode == 1, done
        assert (
            's.yaml:4: passthrough: unknown upstream "invetory"; did you mean "inventory"?; '
            "declared upstreams: inventory"
        ) in done.stderr
