"""Latency models: each model's statistics on 10k draws, determinism by session, backoff by attempt over real
grpc calls (memory and Redis stores), and ``--time-scale`` through serve, ``[tool.virtsvc]`` and the plugin.

No test here asserts elapsed time: each asserts the delay the engine sampled, as the journal records it.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import NormalDist
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from _upstream import run_virtsvc
from google.protobuf import empty_pb2
from helpers import fails

from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog
from virtsvc.engine.redis_store import RedisStore
from virtsvc.scenarios import load_scenarios
from virtsvc.scenarios.latency import LONGEST, Delay, draw
from virtsvc.scenarios.loader import compile_text
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
N = 10_000
TIMEOUT = 10


# -- each model's statistics ------------------------------------------------------------------------------
#
# The draws are a fixed hash of their names (as in a session: scenario, session, rule, call number), so each
# check below gives the same verdict on every run: none can flake. The tolerance is a statistical one all
# the same, so that it tells a right model from a wrong one: the number of draws below the true
# q-quantile is binomial(N, q), its share of N has the standard deviation sqrt(q(1-q)/N) (0.005 at p50,
# 0.001 at p99). Four of them is beyond what a right sampler shows (p < 1e-4), and well within what a wrong
# parameter moves the share by (a median 5% off moves it by about 0.03 here).


def _compiled(catalog: Catalog, delay: str) -> Delay:
    text = (
        f"scenario: stats\nrules:\n  - method: shop.v1.Inventory/Ping\n    delay: {delay}\n    reply: {{}}\n"
    )
    [scenario] = compile_text(text, catalog, "stats.yaml")
    model = scenario.rules[0].steps[0].delay
    assert model is not None
    return model


def _samples(model: Delay, attempt: int = 1) -> list[float]:
    return [model.seconds(draw("stats", "s", model.kind, attempt, i), attempt) for i in range(N)]


def _assert_quantile(samples: list[float], q: float, value: float) -> None:
    share = sum(s < value for s in samples) / len(samples)
    tolerance = 4 * math.sqrt(q * (1 - q) / len(samples))
    assert abs(share - q) <= tolerance, f"{share:.4f} of the draws below {value}, expected {q}"


def _truncated(mean: float, stddev: float) -> Callable[[float], float]:
    """The q-quantile of a normal truncated at 0."""
    dist = NormalDist(mean, stddev)
    below = dist.cdf(0)
    return lambda q: dist.inv_cdf(below + (1 - below) * q)


MODELS: list[tuple[str, list[tuple[float, float]], float, float]] = [
    # (delay, [(q, its quantile in seconds)], lowest possible, highest possible)
    ("{uniform: [10ms, 50ms]}", [(0.1, 0.014), (0.5, 0.030), (0.9, 0.046)], 0.010, 0.050),
    (
        "{normal: {mean: 40ms, stddev: 10ms}}",
        [(q, _truncated(0.04, 0.01)(q)) for q in (0.05, 0.5, 0.95)],
        0.0,
        math.inf,
    ),
    (  # mostly cut off at 0: the truncation must keep the upper part's shape, not pile draws on 0
        "{normal: {mean: 5ms, stddev: 10ms}}",
        [(q, _truncated(0.005, 0.01)(q)) for q in (0.1, 0.5, 0.9)],
        0.0,
        math.inf,
    ),
    ("{lognormal: {median: 20ms, p99: 200ms}}", [(0.5, 0.020), (0.99, 0.200)], 0.0, math.inf),
    (  # below p50: linear from 0 (so p25 is 6ms); above p99: p99 itself
        "{percentiles: {p50: 12ms, p90: 40ms, p99: 180ms}}",
        [(0.25, 0.006), (0.5, 0.012), (0.9, 0.040), (0.99, 0.180)],
        0.0,
        0.180,
    ),
    (  # p0 sets a floor; p100 a longest delay
        "{percentiles: {p0: 5ms, p50: 12ms, p100: 30ms}}",
        [(0.25, 0.0085), (0.5, 0.012), (0.75, 0.021)],
        0.005,
        0.030,
    ),
]


@pytest.mark.parametrize(("delay", "quantiles", "lowest", "highest"), MODELS)
def test_model_percentiles_on_10k_draws(
    catalog: Catalog, delay: str, quantiles: list[tuple[float, float]], lowest: float, highest: float
) -> None:
    """The share of 10k draws below each of the model's quantiles is that quantile's level."""
    samples = _samples(_compiled(catalog, delay))
    for q, value in quantiles:
        _assert_quantile(samples, q, value)
    assert lowest <= min(samples) and max(samples) <= highest


def test_percentiles_reach_the_top_percentile_and_stay_there(catalog: Catalog) -> None:
    """Above the highest percentile given, every draw is that percentile's delay (no invented tail)."""
    samples = _samples(_compiled(catalog, "{percentiles: {p50: 12ms, p90: 40ms, p99: 180ms}}"))
    share = sum(s == 0.180 for s in samples) / N
    assert abs(share - 0.01) <= 4 * math.sqrt(0.01 * 0.99 / N)


def test_fixed_delays_are_the_same_every_time(catalog: Catalog) -> None:
    """A duration and ``{fixed: D}`` are one model: D on every draw."""
    for text in ("25ms", "{fixed: 25ms}"):
        model = _compiled(catalog, text)
        assert set(_samples(model)) == {0.025}


def test_normal_mean_and_spread(catalog: Catalog) -> None:
    """Barely truncated, the normal keeps its mean and standard deviation (4 standard errors)."""
    samples = _samples(_compiled(catalog, "{normal: {mean: 40ms, stddev: 10ms}}"))
    mean = sum(samples) / N
    stddev = math.sqrt(sum((s - mean) ** 2 for s in samples) / (N - 1))
    assert abs(mean - 0.040) <= 4 * 0.010 / math.sqrt(N)
    assert abs(stddev - 0.010) <= 4 * 0.010 / math.sqrt(2 * (N - 1))  # the standard error of a stddev


def test_backoff_by_attempt_on_10k_draws(catalog: Catalog) -> None:
    """Attempt n waits min(max, initial * factor**(n-1)), spread uniformly by the jitter around it."""
    model = _compiled(catalog, "{backoff: {initial: 100ms, factor: 2, max: 2s, jitter: 0.1}}")
    for attempt, base in enumerate([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0], start=1):
        samples = _samples(model, attempt)
        assert base * 0.9 <= min(samples) and max(samples) <= base * 1.1
        for q in (0.05, 0.5, 0.95):
            _assert_quantile(samples, q, base * (1 + 0.1 * (2 * q - 1)))
    assert _compiled(catalog, "{backoff: {initial: 1ms, max: 1s}}").seconds(0.3, 10**9) == 1.0  # no overflow


# -- over the wire ----------------------------------------------------------------------------------------

SCENARIO = """\
scenario: waits
rules:
  - method: shop.v1.Inventory/GetItem
    delay: {percentiles: {p50: 2ms, p90: 4ms, p99: 8ms}}
    reply: {sku: drawn}
  - method: shop.v1.Inventory/Reserve
    times: 3
    delay: {backoff: {initial: 2ms, factor: 3, max: 20ms, jitter: 0.5}}
    reply: {reservationId: limited}
  - method: shop.v1.Inventory/Reserve
    status: {code: RESOURCE_EXHAUSTED, message: used up}
  - method: shop.v1.Payments/Charge
    sequence:
      - status: {code: UNAVAILABLE, message: busy}
      - status: {code: UNAVAILABLE, message: busy}
      - status: {code: UNAVAILABLE, message: busy}
      - reply: {chargeId: c-1}
    delay: {backoff: {initial: 1ms, factor: 2, max: 4ms}}
  - method: shop.v1.Inventory/Ping
    delay: {backoff: {initial: 1ms, factor: 2, max: 8ms}}
    reply: {}
"""


@pytest.fixture
def scenarios(catalog: Catalog, tmp_path: Path) -> list[Any]:
    path = tmp_path / "waits.yaml"
    path.write_text(SCENARIO)
    return load_scenarios([path], catalog)


@pytest.fixture
def server(catalog: Catalog, scenarios: list[Any]) -> Iterator[VirtualServer]:
    with VirtualServer(catalog, scenarios, port=0) as srv:
        yield srv


def _md(session: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", "waits"), ("x-virtsvc-session", session))


def _stubs(pb: SimpleNamespace, address: str, channels: list[grpc.Channel]) -> SimpleNamespace:
    channel = grpc.insecure_channel(address)
    channels.append(channel)
    return SimpleNamespace(inv=pb.inv_grpc.InventoryStub(channel), pay=pb.pay_grpc.PaymentsStub(channel))


@pytest.fixture
def channels() -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    try:
        yield opened
    finally:
        for channel in opened:
            channel.close()


def _delays(server: VirtualServer, session: str, method: str) -> list[float]:
    return [e.delay for e in server.journal.entries("waits", session) if e.method.endswith(method)]


def _retry_charge(pb: SimpleNamespace, stubs: list[SimpleNamespace], session: str) -> int:
    """A client's retry loop: Charge until it succeeds; the number of calls it took (over ``stubs``
    in turn, as replicas behind a load balancer would serve them)."""
    for attempt in range(1, 10):
        stub = stubs[(attempt - 1) % len(stubs)]
        try:
            stub.pay.Charge(pb.pay.ChargeRequest(), metadata=_md(session), timeout=TIMEOUT)
            return attempt
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE
    raise AssertionError("never succeeded")


def test_backoff_grows_with_the_attempt_over_grpc(
    server: VirtualServer, pb: SimpleNamespace, channels: list[grpc.Channel]
) -> None:
    """The n-th call of a rule waits its n-th backoff delay: in a sequence, under ``times`` and on a plain
    rule; each session counts its own attempts."""
    stub = _stubs(pb, server.address, channels)
    assert _retry_charge(pb, [stub], "s1") == 4
    stub.pay.Charge(pb.pay.ChargeRequest(), metadata=_md("s1"), timeout=TIMEOUT)  # repeat_last: attempt 5
    assert _delays(server, "s1", "Charge") == pytest.approx([0.001, 0.002, 0.004, 0.004, 0.004])
    for _ in range(5):
        stub.inv.Ping(empty_pb2.Empty(), metadata=_md("s1"), timeout=TIMEOUT)
    assert _delays(server, "s1", "Ping") == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.008])
    for _ in range(3):
        stub.inv.Reserve(pb.inv.ReserveRequest(), metadata=_md("s1"), timeout=TIMEOUT)
    err = fails(stub.inv.Reserve, pb.inv.ReserveRequest(), metadata=_md("s1"), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    reserve = _delays(server, "s1", "Reserve")
    assert reserve[3] == 0.0  # the next rule has no delay
    for delay, base in zip(reserve[:3], (0.002, 0.006, 0.018), strict=True):
        assert base * 0.5 <= delay <= base * 1.5
    stub.inv.Ping(empty_pb2.Empty(), metadata=_md("s2"), timeout=TIMEOUT)
    assert _delays(server, "s2", "Ping") == pytest.approx([0.001])  # another session starts over


def test_backoff_attempts_are_shared_by_replicas_on_redis(
    catalog: Catalog, scenarios: list[Any], redis_url: str, pb: SimpleNamespace, channels: list[grpc.Channel]
) -> None:
    """Two servers on one Redis answer a client's retries in turn: the attempts count across both, so the
    delays grow as on one server; and the draws are the memory store's for the same session."""
    with (
        VirtualServer(catalog, scenarios, port=0, store=RedisStore(redis_url)) as first,
        VirtualServer(catalog, scenarios, port=0, store=RedisStore(redis_url)) as second,
        VirtualServer(catalog, scenarios, port=0) as alone,
    ):
        stubs = [_stubs(pb, s.address, channels) for s in (first, second)]
        assert _retry_charge(pb, stubs, "shared") == 4
        # The journal is in Redis too: each server reads both servers' calls.
        both = sorted(_delays(first, "shared", "Charge"))
        assert both == pytest.approx([0.001, 0.002, 0.004, 0.004])
        assert sorted(_delays(second, "shared", "Charge")) == both
        for stub in stubs * 2:
            stub.inv.GetItem(pb.inv.GetItemRequest(), metadata=_md("shared"), timeout=TIMEOUT)
        local = _stubs(pb, alone.address, channels)
        assert _retry_charge(pb, [local], "shared") == 4
        for _ in range(4):
            local.inv.GetItem(pb.inv.GetItemRequest(), metadata=_md("shared"), timeout=TIMEOUT)
        replicas = sorted(_delays(first, "shared", "GetItem"))
        assert replicas == sorted(_delays(alone, "shared", "GetItem"))


ROUND_TRIPS = """\
scenario: trips
rules:
  - {method: shop.v1.Inventory/Reserve, times: 50, reply: {}}
  - {method: shop.v1.Inventory/GetItem, times: 50, reply: {}, delay: {backoff: {initial: 1ms, max: 1ms}}}
  - method: shop.v1.Payments/Charge
    sequence: [{reply: {}}, {reply: {}}]
    delay: {backoff: {initial: 1ms, max: 1ms}}
  - {method: shop.v1.Inventory/Ping, reply: {}, delay: 1ms}
  - {method: shop.v1.Orders/GetOrder, reply: {}, delay: {backoff: {initial: 1ms, max: 1ms}}}
"""


def test_backoff_costs_no_round_trip_where_a_counter_moves_anyway(
    catalog: Catalog, redis_url: str, pb: SimpleNamespace, channels: list[grpc.Channel]
) -> None:
    """On Redis, the attempt of a rule with ``times`` or a sequence is the claim's own number: its calls
    make as many round trips as without a backoff. The step of a rule that answers every call of its
    method (no ``when``, no ``times``) moves in the session's look-up."""
    import redis

    class Counting(redis.Connection):
        """Counts the commands sent on every connection: each is one round trip (a script, one EVALSHA)."""

        sent = 0

        def send_packed_command(self, command: Any, *args: Any, **kwargs: Any) -> None:
            # every command, packed by redis-py or by hiredis, leaves through here; its name is the first
            # bulk string. The server's health check runs once a second whatever the calls; the others set
            # up a socket
            first = command if isinstance(command, (bytes, str)) else command[0]
            first = first.encode() if isinstance(first, str) else bytes(first)
            name = first.split(b"\r\n")[2].upper()
            if name not in (b"PING", b"HELLO", b"CLIENT", b"AUTH", b"SELECT"):
                Counting.sent += 1
            super().send_packed_command(command, *args, **kwargs)

    store = RedisStore(redis_url, client=redis.Redis.from_url(redis_url, connection_class=Counting))
    with VirtualServer(catalog, compile_text(ROUND_TRIPS, catalog), port=0, store=store) as srv:
        channel = grpc.insecure_channel(srv.address)
        channels.append(channel)
        inv, pay = pb.inv_grpc.InventoryStub(channel), pb.pay_grpc.PaymentsStub(channel)
        orders = pb.orders_grpc.OrdersStub(channel)
        md = (("x-virtsvc-scenario", "trips"), ("x-virtsvc-session", "t"))
        calls = {
            "times": lambda: inv.Reserve(pb.inv.ReserveRequest(), metadata=md, timeout=TIMEOUT),
            "times+backoff": lambda: inv.GetItem(pb.inv.GetItemRequest(), metadata=md, timeout=TIMEOUT),
            "sequence+backoff": lambda: pay.Charge(pb.pay.ChargeRequest(), metadata=md, timeout=TIMEOUT),
            "plain": lambda: inv.Ping(empty_pb2.Empty(), metadata=md, timeout=TIMEOUT),
            "plain+backoff": lambda: orders.GetOrder(
                pb.orders.GetOrderRequest(), metadata=md, timeout=TIMEOUT
            ),
        }
        for call in calls.values():
            call()  # the session exists and every script is loaded: the calls below cost their steady state
        sent: dict[str, float] = {}
        for name, call in calls.items():
            before = Counting.sent
            for _ in range(10):
                call()
            sent[name] = (Counting.sent - before) / 10
    # the session look-up counts the call (and moves a sure step) in the same script: a plain call is one
    # round trip, plus the journal entry's write (one script: XADD, PEXPIRE, PUBLISH)
    assert sent == {"times": 3, "times+backoff": 3, "sequence+backoff": 2, "plain": 2, "plain+backoff": 2}


def test_draws_repeat_by_session(
    server: VirtualServer, pb: SimpleNamespace, channels: list[grpc.Channel]
) -> None:
    """A session run again (after a reset, or on another server) waits the same delays; another session
    waits others."""
    stub = _stubs(pb, server.address, channels)

    def run(session: str) -> list[float]:
        before = len(_delays(server, session, "GetItem"))
        for _ in range(8):
            stub.inv.GetItem(pb.inv.GetItemRequest(), metadata=_md(session), timeout=TIMEOUT)
        return _delays(server, session, "GetItem")[before:]

    first = run("again")
    assert len(set(first)) == 8 and all(0 <= d <= 0.008 for d in first)
    assert server.store.reset("waits", "again")
    assert run("again") == first
    assert run("other") != first


def test_an_endless_delay_waits_for_the_deadline(
    catalog: Catalog, pb: SimpleNamespace, channels: list[grpc.Channel]
) -> None:
    """A delay beyond what a wait can take (1e300 s, or a backoff's huge factor) waits until the client's
    deadline, recorded as the longest delay, not an INTERNAL error."""
    text = (
        "scenario: endless\nrules:\n  - method: shop.v1.Inventory/Ping\n    delay: 1.0e+300\n    reply: {}\n"
        "  - method: shop.v1.Inventory/GetItem\n    delay: {backoff: {initial: 1ms, factor: 1.0e+300, "
        "max: 1.0e+300}}\n    reply: {}\n"
    )
    with VirtualServer(catalog, compile_text(text, catalog), port=0) as srv:
        stub = _stubs(pb, srv.address, channels)
        md = (("x-virtsvc-scenario", "endless"),)
        err = fails(stub.inv.Ping, empty_pb2.Empty(), metadata=md, timeout=0.2)
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        stub.inv.GetItem(pb.inv.GetItemRequest(), metadata=md, timeout=TIMEOUT)
        err = fails(stub.inv.GetItem, pb.inv.GetItemRequest(), metadata=md, timeout=0.2)
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        delays = [e.delay for e in _wait_for(srv, "endless", 3)]
        assert sorted(delays) == [0.001, LONGEST, LONGEST]


def _wait_for(server: VirtualServer, scenario: str, count: int) -> list[Any]:
    """The scenario's journal entries once ``count`` are in (a call cut off is journaled as it ends)."""
    import time

    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        entries = server.journal.entries(scenario, "default")
        if len(entries) >= count:
            return entries
        time.sleep(0.01)
    raise AssertionError(f"only {len(server.journal.entries(scenario, 'default'))} entries")


# -- --time-scale -----------------------------------------------------------------------------------------


def test_time_scale_multiplies_every_sampled_delay(
    catalog: Catalog, scenarios: list[Any], pb: SimpleNamespace, channels: list[grpc.Channel]
) -> None:
    """``time_scale=0.5`` halves each delay the session draws: the same draws, scaled."""
    with (
        VirtualServer(catalog, scenarios, port=0) as plain,
        VirtualServer(catalog, scenarios, port=0, time_scale=0.5) as half,
    ):
        for srv in (plain, half):
            stub = _stubs(pb, srv.address, channels)
            for _ in range(4):
                stub.inv.GetItem(pb.inv.GetItemRequest(), metadata=_md("s"), timeout=TIMEOUT)
            _retry_charge(pb, [stub], "s")
        for method in ("GetItem", "Charge"):
            assert _delays(half, "s", method) == pytest.approx([d / 2 for d in _delays(plain, "s", method)])


SLOW = """\
scenario: slow
rules:
  - method: shop.v1.Inventory/GetItem
    delay: 20s
    reply: {sku: slow}
"""


def test_serve_time_scale(spawn: Any, tmp_path: Path, pb: SimpleNamespace) -> None:
    """``virtsvc serve --time-scale 0.001`` answers a 20 s delay after 20 ms; GetJournal records 20 ms, the
    ``serving`` event the scale."""
    (tmp_path / "slow.yaml").write_text(SLOW)
    proc = spawn("serve", "--protos", str(ROOT / "protos"), "--scenarios", "slow.yaml", "--port", "0",
                 "--time-scale", "0.001")  # fmt: skip
    assert proc.wait_serving()["time_scale"] == 0.001
    with grpc.insecure_channel(proc.address) as channel:
        md = (("x-virtsvc-scenario", "slow"), ("x-virtsvc-session", "t"))
        reply = pb.inv_grpc.InventoryStub(channel).GetItem(pb.inv.GetItemRequest(), metadata=md, timeout=5)
        assert reply.sku == "slow"  # well within the 5 s deadline, which 20 s would not be
        [entry] = AdminClient(channel).call("GetJournal", session="t").entries
        assert entry.delay.ToNanoseconds() == 20_000_000


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf"])
def test_serve_refuses_a_bad_time_scale(tmp_path: Path, value: str) -> None:
    """A time scale that is not a number above 0 is a usage error (exit 2) saying what is expected."""
    done = run_virtsvc("serve", "--protos", str(ROOT / "protos"), f"--time-scale={value}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"argument --time-scale: expected a number above 0 (every delay is multiplied by it: 2 doubles " \
        f"them, 0.1 makes them ten times shorter), got '{value}'" in done.stderr  # fmt: skip
    assert "Traceback" not in done.stderr


def test_time_scale_from_pyproject(tmp_path: Path) -> None:
    """``time_scale`` in ``[tool.virtsvc]`` is serve's default; a bad one is located at its line."""
    from virtsvc.config import load_settings
    from virtsvc.errors import ConfigError

    (tmp_path / "pyproject.toml").write_text("[tool.virtsvc]\nport = 1\ntime_scale = 0.25\n")
    assert load_settings(tmp_path).time_scale == 0.25
    (tmp_path / "pyproject.toml").write_text("[tool.virtsvc]\nport = 1\ntime_scale = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)
    assert str(caught.value).endswith(
        "pyproject.toml:3: [tool.virtsvc] time_scale: expected a number above 0, got an integer 0"
    )
    done = run_virtsvc("serve", "--protos", str(ROOT / "protos"), cwd=tmp_path)
    assert done.returncode == 1 and "pyproject.toml:3: [tool.virtsvc] time_scale" in done.stderr


PLUGIN_TEST = """\
import pytest

def test_scaled(virtual_service):
    virtual_service.on("shop.v1.Inventory/Ping").reply({}, delay="10s")
    virtual_service.on("shop.v1.Inventory/GetItem").reply(
        {"sku": "b"}, delay={"backoff": {"initial": "1s", "factor": 2, "max": "10s"}})
    channel = virtual_service.channel()
    ping = channel.unary_unary("/shop.v1.Inventory/Ping")
    get = channel.unary_unary("/shop.v1.Inventory/GetItem")
    ping(b"", timeout=5)
    for _ in range(3):
        get(b"", timeout=5)
    assert [c.delay for c in virtual_service.calls()] == pytest.approx([0.01, 0.001, 0.002, 0.004])
"""


@pytest.mark.parametrize("where", ["ini", "option"])
def test_plugin_time_scale(pytester: pytest.Pytester, where: str) -> None:
    """``virtsvc_time_scale`` (ini) and ``--virtsvc-time-scale`` scale the delays of the in-process server."""
    ini = "virtsvc_time_scale = 0.001" if where == "ini" else "virtsvc_time_scale = 7"
    pytester.makeini(f"[pytest]\nvirtsvc_protos = {ROOT / 'protos'}\n{ini}\n")
    pytester.makepyfile(test_inner=PLUGIN_TEST)
    args = ["--virtsvc-time-scale", "0.001"] if where == "option" else []  # the option wins over the ini
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)


def test_plugin_refuses_a_bad_time_scale(pytester: pytest.Pytester) -> None:
    """A bad ``--virtsvc-time-scale`` is a usage error; a bad ini value fails the server's start."""
    pytester.makeini(f"[pytest]\nvirtsvc_protos = {ROOT / 'protos'}\nvirtsvc_time_scale = fast\n")
    pytester.makepyfile(test_inner="def test_one(virtual_service):\n    pass\n")
    result = pytester.runpytest_subprocess("--virtsvc-time-scale", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--virtsvc-time-scale: expected a number above 0 (every delay*got '0'"])
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*virtsvc: virtsvc_time_scale: expected a number above 0*got 'fast'"])


def test_plugin_time_scale_is_refused_for_a_sidecar(pytester: pytest.Pytester) -> None:
    """With ``--virtsvc-address`` the sidecar scales its own delays: the plugin's setting is an error
    saying so, not silently ignored."""
    pytester.makeini("[pytest]\nvirtsvc_time_scale = 0.5\n")
    pytester.makepyfile(test_inner="def test_one(virtual_service):\n    pass\n")
    result = pytester.runpytest_subprocess("--virtsvc-address", "127.0.0.1:1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*virtsvc: virtsvc_time_scale scales the delays of a server in this process; with "
            "--virtsvc-address give the sidecar's: virtsvc serve --time-scale 0.5"
        ]
    )


# -- the README's example -----------------------------------------------------------------------------------


def _readme_block(lang: str, after: str) -> str:
    start = README.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert match, f"no {lang} block after {after!r}"
    return match.group(1)


def test_readme_latency_example(
    catalog: Catalog, tmp_path: Path, pb: SimpleNamespace, channels: list[grpc.Channel]
) -> None:
    """The README's scenario loads and waits as it says: recorded percentiles, a normal, a backoff the
    client's retries climb (here at a hundredth of the time)."""
    path = tmp_path / "latency.yaml"
    path.write_text(textwrap.dedent(_readme_block("yaml", "## Latency models")))
    [scenario] = load_scenarios([path], catalog)
    with VirtualServer(catalog, [scenario], port=0, time_scale=0.01) as srv:
        stub = _stubs(pb, srv.address, channels)
        md = (("x-virtsvc-scenario", scenario.name), ("x-virtsvc-session", "readme"))
        for _ in range(20):
            stub.inv.GetItem(pb.inv.GetItemRequest(), metadata=md, timeout=TIMEOUT)
            stub.inv.Reserve(pb.inv.ReserveRequest(), metadata=md, timeout=TIMEOUT)
        for _ in range(2):
            err = fails(stub.pay.Charge, pb.pay.ChargeRequest(), metadata=md, timeout=TIMEOUT)
            assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert stub.pay.Charge(pb.pay.ChargeRequest(), metadata=md, timeout=TIMEOUT).charge_id == "c-1"
        entries = srv.journal.entries(scenario.name, "readme")
        by_method: dict[str, list[float]] = {}
        for entry in entries:
            by_method.setdefault(entry.method.rsplit("/", 1)[1], []).append(entry.delay / 0.01)
        assert all(0 <= d <= 0.180 for d in by_method["GetItem"])
        assert all(d >= 0 for d in by_method["Reserve"])
        for delay, base in zip(by_method["Charge"], (0.1, 0.2, 0.4), strict=True):
            assert base * 0.9 <= delay <= base * 1.1


def test_check_locates_bad_models(tmp_path: Path) -> None:
    """``virtsvc check`` reports a bad model at its line (exit 1), with the near miss."""
    (tmp_path / "bad.yaml").write_text(
        "scenario: bad\nrules:\n  - method: shop.v1.Inventory/Ping\n    delay:\n"
        "      lognormal: {median: 50ms, p99: 20ms}\n    reply: {}\n"
        "  - method: shop.v1.Inventory/GetItem\n    delay: {backoff: {initial: 1s, factr: 2, max: 4s}}\n"
        "    reply: {}\n"
    )
    done = run_virtsvc("check", "--protos", str(ROOT / "protos"), "bad.yaml", cwd=tmp_path)
    assert done.returncode == 1, done
    assert done.stderr.splitlines()[:2] == [
        'bad.yaml:5: delay.lognormal: p99 "20ms" must be above the median "50ms"',
        'bad.yaml:8: delay.backoff: unknown backoff key "factr"; did you mean "factor"?',
    ]
