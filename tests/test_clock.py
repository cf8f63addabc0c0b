"""Virtual time: held answers released by advancing a session's clock, in-process, through the test helper
and through the admin API with real grpc clients on loopback. No assertion here measures wall time: each
asserts virtual times, call counts and statuses."""

from __future__ import annotations

import datetime
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog
from virtsvc.engine.clock import ClockClosed, VirtualClock
from virtsvc.engine.redis_store import RedisStore
from virtsvc.errors import ScenarioError, VirtsvcError
from virtsvc.scenarios import compile_text, load_scenarios
from virtsvc.server import VirtualServer
from virtsvc.testing import RemoteServer, VirtualService

CHARGE = "shop.v1.Payments/Charge"
RESERVE = "shop.v1.Inventory/Reserve"

# A slow, flaky payment service: each attempt takes 2 s, the first three fail UNAVAILABLE.
FLAKY = """\
scenario: flaky
rules:
  - method: shop.v1.Payments/Charge
    sequence:
      - {status: {code: UNAVAILABLE, message: busy}, delay: 2s}
      - {status: {code: UNAVAILABLE, message: busy}, delay: 2s}
      - {status: {code: UNAVAILABLE, message: busy}, delay: 2s}
      - {reply: {chargeId: "c-{{ now() }}", outcome: APPROVED}, delay: 2s}
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: "at {{ now() }}"}
    delay: 30s
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {sku: A, onHand: 1}
      - reply: {sku: A, onHand: 2}
        delay: 10s
      - reply: {sku: A, onHand: 3}
        delay: 10s
"""
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# the README's `clock: virtual` example, loaded as written
VIRTUAL = re.compile(r"```yaml\n(scenario: slow-quotes\n.*?)```", re.S).search(README).group(1)  # type: ignore[union-attr]


def charge_with_backoff(
    stub: Any, request: Any, sleep: Callable[[float], object], attempts: int = 5, initial: float = 1.0
) -> Any:
    """The client under test: retries UNAVAILABLE with exponential backoff (1 s, 2 s, 4 s ...)."""
    backoff = initial
    for attempt in range(attempts):
        try:
            return stub.Charge(request, timeout=30)
        except grpc.RpcError as err:
            if err.code() is not grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
        sleep(backoff)
        backoff *= 2


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    scenarios = compile_text(FLAKY, catalog) + compile_text(VIRTUAL, catalog)
    srv = VirtualServer(catalog, scenarios, admin=True).start()
    yield srv
    srv.stop(0)


@pytest.fixture
def service(server: VirtualServer) -> Iterator[VirtualService]:
    with VirtualService(server) as svc:
        svc.use("flaky")
        yield svc


@pytest.fixture
def pool() -> Iterator[futures.ThreadPoolExecutor]:
    with futures.ThreadPoolExecutor(2) as executor:
        yield executor


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Waits (bounded) for what another thread is doing; fails naming the condition if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def _rfc3339(seconds: float) -> str:
    from virtsvc.scenarios.templates import rfc3339

    return rfc3339(seconds)


# -- the clock itself ------------------------------------------------------------------------------


def test_a_clock_starts_where_it_is_told_and_moves_only_when_advanced() -> None:
    """now() stays put until advance(); advance returns the new time and refuses to go back."""
    clock = VirtualClock(start=1000.0)
    assert clock.now() == 1000.0
    assert clock.advance(2.5) == 1002.5
    assert clock.now() == 1002.5
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)


def test_held_calls_wake_in_due_order() -> None:
    """pending() lists held calls earliest first; run_until_idle walks the clock through their due times."""
    clock = VirtualClock(start=0.0)
    stopping = threading.Event()
    results: dict[str, bool] = {}

    def hold(name: str, seconds: float) -> None:
        results[name] = clock.hold(name, seconds, threading.Event(), stopping)

    threads = [threading.Thread(target=hold, args=(n, s)) for n, s in (("late", 9.0), ("early", 3.0))]
    for thread in threads:
        thread.start()
    held = clock.wait_for_pending(2)
    assert [(h.method, h.due) for h in held] == [("early", 3.0), ("late", 9.0)]
    clock.advance(3)
    threads[1].join(5)
    assert results == {"early": True}
    assert [h.method for h in clock.pending()] == ["late"]
    assert clock.run_until_idle() == 6.0
    threads[0].join(5)
    assert results == {"early": True, "late": True}
    assert clock.now() == 9.0
    assert clock.pending() == []


def test_a_call_that_ends_first_stops_waiting_and_a_closed_clock_releases_its_calls() -> None:
    """hold() is False when the call ended (deadline, cancel); ClockClosed when the session was dropped."""
    clock = VirtualClock(start=0.0)
    ended = threading.Event()
    ended.set()
    assert clock.hold("m", 5.0, ended, threading.Event()) is False
    outcome: list[BaseException] = []

    def hold() -> None:
        try:
            clock.hold("m", 5.0, threading.Event(), threading.Event())
        except ClockClosed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=hold)
    thread.start()
    clock.wait_for_pending(1)
    clock.close()
    thread.join(5)
    assert len(outcome) == 1
    with pytest.raises(TimeoutError, match=r"0 call\(s\) held on the virtual clock after 0.05 s; expected 1"):
        VirtualClock().wait_for_pending(1, timeout=0.05)


# -- through the test helper (in-process) ----------------------------------------------------------------


def test_a_delayed_answer_is_held_until_the_clock_is_advanced(
    service: VirtualService, pb: SimpleNamespace, pool: futures.ThreadPoolExecutor
) -> None:
    """A 30 s delay holds the call; advancing 29 s does not answer it, the 30th second does; now() in the
    reply is the session's virtual time."""
    clock = service.clock
    start = clock.now()
    stub = pb.inv_grpc.InventoryStub(service.channel())
    reply = pool.submit(stub.Reserve, pb.inv.ReserveRequest(sku="A", qty=1), timeout=30)
    (held,) = clock.wait_for_pending()
    assert held.method == RESERVE
    assert held.due == pytest.approx(start + 30)
    clock.advance(29)
    assert [h.method for h in clock.pending()] == [RESERVE]
    assert not reply.done()
    clock.advance(1)
    assert reply.result(timeout=10).reservation_id == f"at {_rfc3339(start + 30)}"
    assert clock.pending() == []
    (call,) = service.calls(RESERVE)
    assert call.code is grpc.StatusCode.OK


def test_a_retry_loop_with_backoff_runs_in_virtual_seconds(
    service: VirtualService, pb: SimpleNamespace, pool: futures.ThreadPoolExecutor
) -> None:
    """Four attempts of 2 s each and backoffs of 1 + 2 + 4 s: 15 virtual seconds, four calls. The client
    runs on a thread with the clock's advance as its sleep; the test releases each held attempt."""
    clock = service.clock
    start = clock.now()
    stub = pb.pay_grpc.PaymentsStub(service.channel())
    charged = pool.submit(charge_with_backoff, stub, pb.pay.ChargeRequest(account="a-1"), clock.advance)
    for _ in range(4):
        clock.wait_for_pending()
        assert clock.run_until_idle() == pytest.approx(2.0)
    reply = charged.result(timeout=10)
    assert clock.now() - start == pytest.approx(15.0)
    assert reply.charge_id == f"c-{_rfc3339(clock.now())}"
    codes = [c.code for c in service.calls(CHARGE)]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3 + [grpc.StatusCode.OK]


def test_stream_items_wait_on_the_virtual_clock(
    service: VirtualService, pb: SimpleNamespace, pool: futures.ThreadPoolExecutor
) -> None:
    """Each item's delay is held like an answer's: item 2 after 10 virtual seconds, item 3 after 20."""
    clock = service.clock
    stub = pb.inv_grpc.InventoryStub(service.channel())
    stream = stub.Watch(pb.inv.WatchRequest(), timeout=30)
    assert next(stream).on_hand == 1
    second = pool.submit(next, stream)
    clock.wait_for_pending()
    clock.advance(10)
    assert second.result(timeout=10).on_hand == 2
    clock.wait_for_pending()
    assert clock.run_until_idle() == pytest.approx(10.0)
    assert [e.on_hand for e in stream] == [3]


def test_client_deadlines_stay_real(
    service: VirtualService, pb: SimpleNamespace, pool: futures.ThreadPoolExecutor
) -> None:
    """A held call whose client's deadline passes before the clock reaches it ends DEADLINE_EXCEEDED and
    leaves the clock; the same call with the clock advanced in time is answered."""
    clock = service.clock
    stub = pb.inv_grpc.InventoryStub(service.channel())
    request = pb.inv.ReserveRequest(sku="A", qty=1)
    with pytest.raises(grpc.RpcError) as err:
        stub.Reserve(request, timeout=0.3)  # nobody advances the clock: 30 virtual seconds never pass
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The server hears of the deadline a moment after the client: the call then leaves the clock.
    _eventually(lambda: [c.code for c in service.calls(RESERVE)] == [grpc.StatusCode.DEADLINE_EXCEEDED])
    assert clock.pending() == []
    answered = pool.submit(stub.Reserve, request, timeout=30)
    clock.wait_for_pending()
    clock.advance(30)
    assert answered.result(timeout=10).reservation_id.startswith("at ")


def test_a_reset_session_releases_its_held_calls(
    server: VirtualServer, pb: SimpleNamespace, pool: futures.ThreadPoolExecutor
) -> None:
    """Dropping the session ends a call held on its clock with ABORTED, saying why."""
    svc = VirtualService(server)
    svc.use("flaky")
    clock = svc.clock
    stub = pb.inv_grpc.InventoryStub(svc.channel())
    held = pool.submit(stub.Reserve, pb.inv.ReserveRequest(sku="A", qty=1), timeout=30)
    clock.wait_for_pending()
    server.store.reset("flaky", svc.session)
    with pytest.raises(grpc.RpcError) as err:
        held.result(timeout=10)
    assert err.value.code() is grpc.StatusCode.ABORTED
    assert err.value.details() == (
        f'session "{svc.session}" of scenario "flaky" was dropped while this call waited on its virtual clock'
    )
    svc.close()


def test_clock_virtual_in_yaml_puts_every_session_on_virtual_time(
    server: VirtualServer, pb: SimpleNamespace, pool: futures.ThreadPoolExecutor
) -> None:
    """`clock: virtual`: a session of the scenario is held from its first call, and its clock is the one
    the test helper hands out."""
    with VirtualService(server) as svc:
        svc.use("slow-quotes")
        stub = pb.inv_grpc.InventoryStub(svc.channel())
        reply = pool.submit(stub.Reserve, pb.inv.ReserveRequest(sku="A", qty=1), timeout=30)
        clock = svc.clock
        (held,) = clock.wait_for_pending()
        assert held.due == pytest.approx(clock.now() + 30)
        due = held.due
        clock.advance(30)
        assert reply.result(timeout=10).reservation_id == f"held until {_rfc3339(due)}"


def test_a_bad_clock_key_is_located(tmp_path: Path, catalog: Catalog) -> None:
    """`clock: virtaul` is one located line with the valid values and a did-you-mean."""
    path = tmp_path / "s.yaml"
    path.write_text("scenario: s\nclock: virtaul\nrules: []\n")
    with pytest.raises(ScenarioError) as err:
        load_scenarios([path], catalog)
    assert str(err.value) == (
        f'{path}:2: clock: unknown clock "virtaul"; did you mean "virtual"? '
        "(use wall (the default) or virtual)"
    )


# -- through the admin API -------------------------------------------------------------------------------


@pytest.fixture
def admin(server: VirtualServer) -> Iterator[AdminClient]:
    with grpc.insecure_channel(server.address) as channel:
        yield AdminClient(channel)


def _seconds(value: Any) -> float:
    return float(value.ToNanoseconds() / 1e9)


def _duration(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)  # what an admin message's Duration field takes


def test_admin_drives_a_retry_loop_in_virtual_time(
    admin: AdminClient, server: VirtualServer, pb: SimpleNamespace, sid: str, pool: futures.ThreadPoolExecutor
) -> None:
    """SetClock, GetClock and AdvanceClock over grpc: the backoff loop's four attempts and three sleeps take
    15 virtual seconds; GetClock lists each held attempt with its due time."""
    where = {"scenario": "flaky", "session": sid}
    state = admin.call("SetClock", virtual=True, **where)
    assert state.virtual
    start = _seconds(state.now)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb.pay_grpc.PaymentsStub(channel)
        channel_md = (("x-virtsvc-scenario", "flaky"), ("x-virtsvc-session", sid))

        class Stub:
            def Charge(self, request: Any, timeout: float) -> Any:
                return stub.Charge(request, timeout=timeout, metadata=channel_md)

        def sleep(seconds: float) -> None:
            admin.call("AdvanceClock", duration=_duration(seconds), **where)

        charged = pool.submit(charge_with_backoff, Stub(), pb.pay.ChargeRequest(account="a-1"), sleep)
        for _ in range(4):
            _eventually(lambda: bool(admin.call("GetClock", **where).pending))
            (call,) = admin.call("GetClock", **where).pending
            assert call.method == CHARGE
            assert _seconds(call.remaining) == pytest.approx(2.0)
            moved = admin.call("AdvanceClock", run_until_idle=True, **where)
            assert _seconds(moved.advanced) == pytest.approx(2.0)
            assert not moved.pending
        assert charged.result(timeout=10).outcome == pb.pay.ChargeResponse.Outcome.Value("APPROVED")
    assert _seconds(admin.call("GetClock", **where).now) - start == pytest.approx(15.0)
    codes = [e.code for e in server.journal.entries("flaky", sid, method=CHARGE)]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3 + [grpc.StatusCode.OK]


@pytest.mark.parametrize(
    ("method", "fields", "code", "message"),
    [
        (
            "AdvanceClock",
            {"scenario": "flaky", "session": "never-switched", "duration": _duration(1)},
            grpc.StatusCode.FAILED_PRECONDITION,
            'session "never-switched" of scenario "flaky" runs on wall time: switch it with '
            "SetClock(virtual: true), or give the scenario clock: virtual",
        ),
        (
            "SetClock",
            {"scenario": "flaky", "session": "s"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "SetClock switches a session to virtual time (virtual: true); a session leaves it when dropped "
            "(ResetSession)",
        ),
        (
            "SetClock",
            {"scenario": "flakey", "session": "s", "virtual": True},
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (
            "AdvanceClock",
            {"scenario": "slow-quotes", "session": "s", "duration": _duration(-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "duration: a virtual clock only moves forward; got -1 s",
        ),
    ],
)
def test_admin_clock_refusals_say_why(
    admin: AdminClient, method: str, fields: dict[str, Any], code: grpc.StatusCode, message: str | None
) -> None:
    """Each refusal is a status naming the session and what to do."""
    with pytest.raises(grpc.RpcError) as err:
        admin.call(method, **fields)
    assert err.value.code() is code
    if message is None:
        assert 'unknown scenario "flakey"' in (err.value.details() or "")
        assert '"flaky"' in (err.value.details() or "")
    else:
        assert err.value.details() == message


def test_get_clock_of_a_wall_time_session_says_so(admin: AdminClient) -> None:
    """GetClock of a session never switched: virtual false, nothing pending."""
    state = admin.call("GetClock", scenario="flaky", session="wall")
    assert not state.virtual
    assert not state.pending


def test_the_test_helper_drives_a_remote_clock(
    server: VirtualServer, pb: SimpleNamespace, pool: futures.ThreadPoolExecutor
) -> None:
    """Against a server in another process (here: reached through RemoteServer), virtual_service.clock is
    the same API over the admin calls."""
    remote = RemoteServer(server.address)
    try:
        with VirtualService(remote) as svc:
            svc.use("flaky")
            clock = svc.clock
            start = clock.now()
            stub = pb.inv_grpc.InventoryStub(svc.channel())
            reply = pool.submit(stub.Reserve, pb.inv.ReserveRequest(sku="A", qty=1), timeout=30)
            (held,) = clock.wait_for_pending()
            assert held.method == RESERVE
            assert clock.advance(10) == pytest.approx(start + 10)
            assert clock.run_until_idle() == pytest.approx(20.0)
            assert reply.result(timeout=10).reservation_id == f"at {_rfc3339(start + 30)}"
            assert clock.pending() == []
    finally:
        remote.close()


# -- the Redis store refuses ---------------------------------------------------------------------------


def test_sessions_in_redis_refuse_virtual_time(redis_url: str, catalog: Catalog, pb: SimpleNamespace) -> None:
    """SetClock, the test helper and a `clock: virtual` scenario each say why Redis sessions stay on wall
    time, as FAILED_PRECONDITION."""
    store = RedisStore(redis_url)
    srv = VirtualServer(catalog, compile_text(VIRTUAL, catalog), store=store, admin=True).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                AdminClient(channel).call("SetClock", scenario="slow-quotes", session="s", virtual=True)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == RedisStore.no_virtual_clock
            stub = pb.inv_grpc.InventoryStub(channel)
            with pytest.raises(grpc.RpcError) as call_err:
                stub.Reserve(
                    pb.inv.ReserveRequest(sku="A"),
                    timeout=5,
                    metadata=(("x-virtsvc-scenario", "slow-quotes"),),
                )
            assert call_err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert call_err.value.details() == RedisStore.no_virtual_clock
        with pytest.raises(VirtsvcError, match="this server keeps sessions in Redis"):
            VirtualService(srv).clock  # noqa: B018 - the first use switches
    finally:
        srv.stop(0)
        store.close()
