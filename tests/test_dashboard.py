"""The dashboard over HTTP: its event stream, a call's details, the token, loopback, the hub's bounds."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from _upstream import start_upstream

from virtsvc.contracts import Catalog
from virtsvc.engine.journal import Entry, Journal
from virtsvc.engine.router import Registry
from virtsvc.errors import ConfigError
from virtsvc.observe.dashboard import Hub
from virtsvc.observe.dashboard.web import COOKIE, cookie_value
from virtsvc.scenarios.loader import compile_text, load_scenarios
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
TOKEN = "s3cret-token"
RESERVE_RULE = f"{SCENARIOS / 'checkout-happy.yaml'}:7"  # locations are paths as given


def _scenario(name: str, session: str) -> list[tuple[str, str]]:
    return [("x-virtsvc-scenario", name), ("x-virtsvc-session", session)]


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    with VirtualServer(catalog, load_scenarios([SCENARIOS], catalog), port=0, dashboard_port=0) as vs:
        yield vs


@pytest.fixture(scope="module")
def guarded(catalog: Catalog) -> Iterator[VirtualServer]:
    scenarios = load_scenarios([SCENARIOS / "checkout-happy.yaml"], catalog)
    with VirtualServer(catalog, scenarios, port=0, dashboard_port=0, admin_token=TOKEN) as vs:
        yield vs


def _get(vs: VirtualServer, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    assert vs.dashboard is not None
    conn = http.client.HTTPConnection("127.0.0.1", vs.dashboard.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        body = reply.read()
        kind = reply.getheader("Content-Type", "")
        return reply.status, reply.headers, json.loads(body) if kind.startswith("application/json") else body
    finally:
        conn.close()


class Stream:
    """An /api/events connection read event by event."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", "/api/events", headers=headers or {})
        self.reply = self.conn.getresponse()
        self._buffer = b""

    def next(self, name: str, timeout: float = 10.0) -> Any:
        """The data of the next event called ``name`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n\n" in self._buffer:
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                fields = dict(
                    line.split(": ", 1)
                    for line in block.decode().splitlines()
                    if ": " in line and line[0] != ":"
                )
                if fields.get("event") == name:
                    return json.loads(fields["data"])
            chunk = self.reply.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                raise AssertionError(f"the stream ended before a {name!r} event")
            self._buffer += chunk
        raise AssertionError(f"no {name!r} event within {timeout} s")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def stream(server: VirtualServer) -> Iterator[Stream]:
    assert server.dashboard is not None
    s = Stream(server.dashboard.port)
    try:
        yield s
    finally:
        s.close()


def test_the_stream_delivers_a_call_as_it_finishes(
    server: VirtualServer, stream: Stream, channel_to: Any, pb: SimpleNamespace, sid: str
) -> None:
    """A snapshot first, then each finished call as a `calls` event, and the figures that count it."""
    assert stream.reply.status == 200
    assert stream.reply.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    snapshot = stream.next("snapshot")
    assert snapshot["server"]["address"] == server.address
    assert "checkout-happy" in [s["name"] for s in snapshot["scenarios"]["list"]]
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    inv.Reserve(pb.inv.ReserveRequest(sku="ABC-1", qty=3), metadata=_scenario("checkout-happy", sid))
    calls = stream.next("calls")
    mine = [c for c in calls if c["session"] == sid]
    assert len(mine) == 1
    call = mine[0]
    assert call["method"] == "shop.v1.Inventory/Reserve"
    assert call["scenario"] == "checkout-happy"
    assert call["code"] == "OK"
    assert call["rule"] == RESERVE_RULE
    assert call["near_miss"] is None
    assert call["duration_ms"] > 0
    figures = stream.next("figures")
    assert {"scenario": "checkout-happy", "session": sid, "calls": 1} in figures["sessions"]
    reserve = [
        m for m in figures["methods"] if m["scenario"] == "checkout-happy" and m["method"] == call["method"]
    ]
    assert reserve and reserve[0]["calls"] >= 1 and sum(reserve[0]["buckets"]) == reserve[0]["calls"]
    assert figures["rules"][RESERVE_RULE] >= 1


def test_a_calls_details_hold_request_reply_metadata_and_timing(
    server: VirtualServer, channel_to: Any, pb: SimpleNamespace, sid: str
) -> None:
    """/api/calls/SEQ is the call's whole record; a call no longer kept is a 404 saying so; junk a 400."""
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    inv.Reserve(pb.inv.ReserveRequest(sku="ABC-1", qty=3), metadata=_scenario("checkout-happy", sid))
    entry = server.journal.entries("checkout-happy", sid)[-1]
    assert server.dashboard is not None
    deadline = time.monotonic() + 5
    while server.dashboard.hub.details(entry.seq) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    status, _, details = _get(server, f"/api/calls/{entry.seq}")
    assert status == 200
    assert details["request"] == {"sku": "ABC-1", "qty": 3}
    assert details["reply"]["reservationId"] == "r-ABC-1-3"
    assert details["metadata"]["x-virtsvc-session"] == sid
    assert details["headers"] == {"x-served-by": "virtsvc"}
    assert "x-trace-id" in details["trailers"]
    assert details["rule"] == RESERVE_RULE
    assert details["rule_answers"] == "reply"
    assert details["overhead_ms"] == pytest.approx(details["duration_ms"] - details["delay_ms"], abs=0.002)
    status, _, missing = _get(server, "/api/calls/999999999")
    assert status == 404
    assert missing == {
        "error": "call 999999999 is no longer kept (the dashboard keeps the most recent calls)"
    }
    status, _, junk = _get(server, "/api/calls/abc")
    assert (status, junk) == (400, {"error": "not a call number: 'abc'"})


def test_unmatched_calls_carry_their_near_miss(
    server: VirtualServer, channel_to: Any, pb: SimpleNamespace, sid: str
) -> None:
    """The state lists an unmatched call with the near-miss text the caller got."""
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    with pytest.raises(grpc.RpcError) as caught:
        inv.Reserve(pb.inv.ReserveRequest(sku="XYZ", qty=3), metadata=_scenario("matching", sid))
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert server.dashboard is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _, _, state = _get(server, "/api/state")
        mine = [c for c in state["unmatched"] if c["session"] == sid]
        if mine:
            break
        time.sleep(0.05)
    assert len(mine) == 1
    assert mine[0]["code"] == "UNIMPLEMENTED"
    assert mine[0]["near_miss"] == caught.value.details()
    assert f"closest: rule at {SCENARIOS / 'matching.yaml'}:" in mine[0]["near_miss"]


def test_a_lagging_stream_starts_over_from_a_snapshot(server: VirtualServer, stream: Stream) -> None:
    """A browser whose queue overflowed is sent a fresh snapshot (marked resync), not a gap."""
    stream.next("snapshot")
    assert server.dashboard is not None
    hub = server.dashboard.hub
    deadline = time.monotonic() + 5
    while not hub._clients and time.monotonic() < deadline:
        time.sleep(0.01)
    for client in hub._clients:
        client.lagging.set()  # what Client.offer does when the queue is full
    again = stream.next("snapshot")
    assert again["resync"] is True
    assert "figures" in again and "calls" in again


def test_a_reload_sends_the_new_scenarios(catalog: Catalog) -> None:
    """Scenarios put or replaced while a page is open reach it as a `scenarios` event."""
    with VirtualServer(catalog, port=0, dashboard_port=0) as vs:
        assert vs.dashboard is not None
        s = Stream(vs.dashboard.port)
        try:
            assert s.next("snapshot")["scenarios"]["list"] == []
            vs.reload(load_scenarios([SCENARIOS / "payments-retry.yaml"], catalog))
            [scenario] = s.next("scenarios")["list"]
            assert scenario["name"] == "payments-retry"
            assert [(r["method"], r["answers"]) for r in scenario["rules"]] == [
                ("shop.v1.Payments/Charge", "sequence of 2"),
                ("shop.v1.Payments/Refund", "sequence of 2"),
            ]
            assert scenario["rules"][0]["where"] == f"{SCENARIOS / 'payments-retry.yaml'}:7"
        finally:
            s.close()


def test_pages_and_headers(server: VirtualServer) -> None:
    """The page, its script and style come from the package, with a strict content security policy."""
    status, headers, body = _get(server, "/")
    assert status == 200 and b'<script src="/static/app.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = _get(server, "/static/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"EventSource" in body
    status, _, body = _get(server, "/static/../web.py")
    assert status == 404
    status, _, body = _get(server, "/nope")
    assert (status, body) == (404, {"error": "no such page: /nope"})


def test_history_without_a_history_says_how_to_get_one(server: VirtualServer) -> None:
    """/api/history names the flag when no history was given."""
    status, _, trends = _get(server, "/api/history")
    assert status == 200
    assert trends == {
        "available": False,
        "reason": "no history: serve with --history FILE to show its trends",
    }


def test_a_foreign_host_name_is_refused_on_loopback(server: VirtualServer) -> None:
    """A request naming another host (a DNS name rebound to 127.0.0.1) is refused; loopback names pass."""
    status, _, body = _get(server, "/api/state", {"Host": "evil.example:80"})
    assert status == 421 and b"loopback host name" in body
    for host in ("localhost", "127.0.0.1:1234", "[::1]:80"):
        assert _get(server, "/api/state", {"Host": host})[0] == 200, host


# -- the token -----------------------------------------------------------------------------------------------


def test_the_token_guards_every_page_and_api(guarded: VirtualServer) -> None:
    """Without the token: 401 (the API says why, pages show the login form); a bearer header opens it."""
    status, _, body = _get(guarded, "/api/state")
    assert (status, body) == (
        401,
        {"error": "the dashboard needs the admin token (authorization: Bearer TOKEN)"},
    )
    assert _get(guarded, "/api/events")[0] == 401
    assert _get(guarded, "/api/calls/1")[0] == 401
    status, _, page = _get(guarded, "/")
    assert status == 401 and b'<form method="post" action="/login">' in page
    assert _get(guarded, "/api/state", {"Authorization": "Bearer wrong"})[0] == 401
    assert _get(guarded, "/api/state", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert _get(guarded, "/static/app.css")[0] == 200  # no data in it: the login page needs it


def _login(vs: VirtualServer, token: str) -> http.client.HTTPResponse:
    assert vs.dashboard is not None
    conn = http.client.HTTPConnection("127.0.0.1", vs.dashboard.port, timeout=10)
    body = urllib.parse.urlencode({"token": token})
    conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
    reply = conn.getresponse()
    reply.read()
    conn.close()
    return reply


def test_the_login_form_sets_a_cookie_that_is_not_the_token(guarded: VirtualServer) -> None:
    """A right token gets a cookie holding an HMAC of it (useless against the admin API); a wrong one 401."""
    wrong = _login(guarded, "guess")
    assert wrong.status == 401 and wrong.getheader("Set-Cookie") is None
    right = _login(guarded, TOKEN)
    assert right.status == 303 and right.getheader("Location") == "/"
    cookie = right.getheader("Set-Cookie")
    assert cookie is not None and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    value = cookie.split(";")[0]
    assert value == f"{COOKIE}={cookie_value(TOKEN)}" and TOKEN not in value
    assert _get(guarded, "/api/state", {"Cookie": value})[0] == 200
    assert _get(guarded, "/api/state", {"Cookie": f"{COOKIE}={cookie_value('other')}"})[0] == 401


def test_the_stream_needs_the_token_too(guarded: VirtualServer) -> None:
    """With the bearer header the event stream opens and starts with its snapshot."""
    assert guarded.dashboard is not None
    s = Stream(guarded.dashboard.port, {"Authorization": f"Bearer {TOKEN}"})
    try:
        assert s.reply.status == 200
        assert [x["name"] for x in s.next("snapshot")["scenarios"]["list"]] == ["checkout-happy"]
    finally:
        s.close()


# -- where it listens ----------------------------------------------------------------------------------------


def test_loopback_by_default(catalog: Catalog) -> None:
    """With no host given the dashboard binds 127.0.0.1, as the gRPC port does; no dashboard_port, none."""
    with VirtualServer(catalog, port=0, dashboard_port=0) as vs:
        assert vs.dashboard is not None
        assert vs.dashboard._httpd is not None
        assert vs.dashboard._httpd.server_address[0] == "127.0.0.1"
        assert vs.dashboard.url == f"http://127.0.0.1:{vs.dashboard.port}/"
    with VirtualServer(catalog, port=0) as plain:
        assert plain.dashboard is None


def test_off_loopback_it_needs_a_token(catalog: Catalog) -> None:
    """Serving the dashboard where other machines reach it without a token is refused before listening."""
    with pytest.raises(ConfigError) as caught:
        VirtualServer(catalog, host="0.0.0.0", port=0, dashboard_port=0)
    assert str(caught.value) == (
        "the dashboard would show every call to anyone who can reach 0.0.0.0: serve it on a loopback "
        "address, or set --admin-token (or VIRTSVC_ADMIN_TOKEN) to require it"
    )
    vs = VirtualServer(catalog, host="0.0.0.0", port=0, dashboard_port=0, admin_token=TOKEN)  # not started
    assert vs.dashboard is not None and vs.dashboard.token == TOKEN


def test_an_occupied_dashboard_port_is_one_clear_error(catalog: Catalog) -> None:
    """A taken port fails start() with a ConfigError naming it, and the gRPC server does not keep running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        vs = VirtualServer(catalog, port=0, dashboard_port=port)
        with pytest.raises(ConfigError) as caught:
            vs.start()
        assert str(caught.value) == f"cannot serve the dashboard on 127.0.0.1:{port}: Address already in use"
        assert vs._server is None


def test_stop_ends_open_streams_and_the_port(catalog: Catalog) -> None:
    """After stop() an open stream has ended and the port refuses connections."""
    vs = VirtualServer(catalog, port=0, dashboard_port=0).start()
    assert vs.dashboard is not None
    port = vs.dashboard.port
    s = Stream(port)
    s.next("snapshot")
    vs.stop(0)
    started = time.monotonic()
    with pytest.raises(AssertionError, match="the stream ended"):
        s.next("never", timeout=5)
    assert time.monotonic() - started < 3
    s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- the hub: never in the way of a call ---------------------------------------------------------------------


def _entry(catalog: Catalog, session: str = "s", seconds: float = 0.003) -> Entry:
    entry = Entry("sc", session, catalog.methods["shop.v1.Inventory/Reserve"], {}, time.time())
    entry.duration = seconds
    return entry


def test_the_journal_hands_off_and_never_waits(catalog: Catalog) -> None:
    """With the hub's thread not draining, recording goes on at full speed; the overflow is counted."""
    journal = Journal()
    hub = Hub(journal, Registry(), intake=3)
    journal.subscribe(hub.hear)  # subscribed, but its thread never started: nothing takes from the intake
    started = time.perf_counter()
    for _ in range(1000):
        journal.record(_entry(catalog))
    assert time.perf_counter() - started < 1.0
    assert hub.missed == 997


def test_a_browser_that_does_not_read_is_marked_lagging_not_waited_for(catalog: Catalog) -> None:
    """A client's full queue marks it lagging; the other clients and the figures go on."""
    journal = Journal()
    hub = Hub(journal, Registry(), client_backlog=3)
    hub.start()
    try:
        stuck, _ = hub.attach()
        reader, _ = hub.attach(backlog=100)
        entries = [_entry(catalog, session=f"s{i}") for i in range(10)]
        for entry in entries:
            journal.record(entry)
        deadline = time.monotonic() + 5
        while hub.figures()["seen"] < len(entries) and time.monotonic() < deadline:
            time.sleep(0.01)
        got = [line["seq"] for line in reader.take(100)]
        assert got == [e.seq for e in entries]
        assert not reader.lagging.is_set()
        assert stuck.lagging.is_set() and len(stuck.items) <= 3
        figures = hub.figures()
        assert figures["seen"] == 10
        [stats] = figures["methods"]
        assert stats["calls"] == 10 and stats["buckets"][2] == 10  # 3 ms: the (2, 5] bucket
    finally:
        hub.stop()


def test_the_hub_counts_what_was_journaled_before_it_started(catalog: Catalog) -> None:
    """Entries already in the journal are counted once, and entries heard later are not counted twice."""
    journal = Journal()
    first = _entry(catalog)
    journal.record(first)
    hub = Hub(journal, Registry())
    hub.start()
    try:
        journal.record(_entry(catalog))
        deadline = time.monotonic() + 5
        while hub.figures()["seen"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert hub.figures()["seen"] == 2
        assert hub.details(first.seq) is not None
    finally:
        hub.stop()


# -- the command line ----------------------------------------------------------------------------------------


def test_serve_dashboard_port_over_the_wire(tmp_path: Path) -> None:
    """`virtsvc serve --dashboard-port 0` logs the dashboard's URL in its serving event and serves it."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "virtsvc.cli",
            "serve",
            "--protos",
            str(ROOT / "protos"),
            "--scenarios",
            str(SCENARIOS / "checkout-happy.yaml"),
            "--port",
            "0",
            "--dashboard-port",
            "0",
            "--log-format",
            "json",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        event: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("{") and json.loads(line).get("event") == "serving":
                event = json.loads(line)
                break
        assert event, "no serving event"
        url = urllib.parse.urlsplit(event["dashboard"])
        assert url.scheme == "http" and url.hostname == "127.0.0.1" and url.port
        conn = http.client.HTTPConnection("127.0.0.1", url.port, timeout=10)
        conn.request("GET", "/api/state")
        state = json.loads(conn.getresponse().read())
        conn.close()
        assert [s["name"] for s in state["scenarios"]["list"]] == ["checkout-happy"]
        assert state["server"]["address"] == event["address"]
    finally:
        process.terminate()
        process.wait(30)
    assert process.returncode == 0


def test_serve_dashboard_port_must_be_a_port() -> None:
    """A bad --dashboard-port is one usage line, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "virtsvc.cli", "serve", "--dashboard-port", "http"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "virtsvc serve: error: argument --dashboard-port: not a port number: 'http' "
        "(see 'virtsvc serve --help')"
    )


def test_forwarded_calls_name_their_upstream(catalog: Catalog, pb: SimpleNamespace) -> None:
    """A call a `passthrough:` sent to the real service names the upstream in its line and its details, and
    the scenario's fallback is listed among its rules (method ``*``)."""
    upstream = start_upstream(pb)
    upstreams = {"inventory": upstream.address}
    text = (
        "scenario: real-rest\npassthrough: inventory\nrules:\n"
        "  - method: shop.v1.Payments/Charge\n    reply: {}\n"
    )
    scenarios = compile_text(text, catalog, origin="real.yaml", upstreams=upstreams)
    try:
        with VirtualServer(catalog, scenarios, port=0, dashboard_port=0, upstreams=upstreams) as vs:
            assert vs.dashboard is not None
            s = Stream(vs.dashboard.port)
            try:
                [scenario] = s.next("snapshot")["scenarios"]["list"]
                assert [(r["where"], r["method"], r["answers"]) for r in scenario["rules"]] == [
                    ("real.yaml:4", "shop.v1.Payments/Charge", "reply"),
                    ("real.yaml:2", "*", "passthrough inventory"),
                ]
                with grpc.insecure_channel(vs.address) as channel:
                    reply = pb.inv_grpc.InventoryStub(channel).Reserve(
                        pb.inv.ReserveRequest(sku="C", qty=1), metadata=[("x-virtsvc-scenario", "real-rest")]
                    )
                assert reply.reservation_id == "real-C-1"
                [call] = s.next("calls")
                assert (call["forwarded"], call["rule"]) == ("inventory", "real.yaml:2")
                details = vs.dashboard.hub.details(call["seq"])
                assert details is not None
                assert details["reply"]["reservationId"] == "real-C-1"
                assert (details["forwarded"], details["rule_answers"]) == (
                    "inventory",
                    "passthrough inventory",
                )
            finally:
                s.close()
    finally:
        upstream.stop()


# -- the run history's trends -------------------------------------------------------------------------------


def make_history(path: Path, runs: int = 6) -> Path:
    """A run history of ``runs`` CI runs on one scenario version: a steady test, and one whose answer
    changes from run to run (flaky), with latencies that move."""
    from virtsvc.observe.history import History
    from virtsvc.observe.report import Call, build_report

    history = History(path)
    for run in range(runs):
        calls = [
            Call(seq=1, scenario="checkout-happy", session="a", method="shop.v1.Inventory/Reserve", code="OK",
                 duration=0.002 + 0.001 * run, version=1, label="tests/test_checkout.py::test_reserve",
                 rule="scenarios/checkout-happy.yaml:7"),
            Call(seq=2, scenario="checkout-happy", session="b", method="shop.v1.Payments/Charge",
                 code="OK" if run % 2 else "UNAVAILABLE", duration=0.004 + 0.002 * (run % 3), version=1,
                 label="tests/test_checkout.py::test_pay", rule="scenarios/checkout-happy.yaml:25"),
        ]  # fmt: skip
        history.record(build_report(calls, source="ci"), at=f"2026-12-0{run + 1}T06:00:00Z")
    return path


def test_history_trends_are_served(catalog: Catalog, tmp_path: Path) -> None:
    """With a history, /api/history holds its runs, the flaky test and the trends per method and test."""
    path = make_history(tmp_path / "history.sqlite")
    with VirtualServer(catalog, port=0, dashboard_port=0, history=path) as vs:
        status, _, trends = _get(vs, "/api/history")
        _, _, state = _get(vs, "/api/state")
    assert status == 200 and trends["available"] is True
    assert state["server"]["history"] == str(path)
    assert [r["at"] for r in trends["runs"]] == [f"2026-12-0{n}T06:00:00Z" for n in range(1, 7)]
    [flaky] = trends["flaky"]
    assert flaky["test"] == "tests/test_checkout.py::test_pay" and flaky["times"] == 5
    assert [(t["test"], t["flaky"]) for t in trends["tests"]] == [
        ("tests/test_checkout.py::test_pay", True),
        ("tests/test_checkout.py::test_reserve", False),
    ]
    charge = next(m for m in trends["methods"] if m["method"] == "shop.v1.Payments/Charge")
    assert charge["error_rate"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_a_history_that_is_not_one_is_said_on_the_page(catalog: Catalog, tmp_path: Path) -> None:
    """A missing file, or one that is no history: the page says why, the dashboard serves, the file stays."""
    missing = tmp_path / "none.sqlite"
    other = tmp_path / "notes.txt"
    other.write_text("not a database, just some notes\n" * 100)
    for path, reason in (
        (missing, f"{missing}: no such file yet (virtsvc report --history writes it)"),
        (other, f"{other}: not a virtsvc history (SQLite: "),
    ):
        with VirtualServer(catalog, port=0, dashboard_port=0, history=path) as vs:
            status, _, trends = _get(vs, "/api/history")
            assert _get(vs, "/api/state")[0] == 200
        assert status == 200 and trends["available"] is False
        assert trends["reason"].startswith(reason)
    assert not missing.exists()
    assert other.read_text().startswith("not a database")
