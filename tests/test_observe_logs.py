"""The logs: one ``rpc`` event per call with its fields asserted one by one (structlog's capture_logs, and
`virtsvc serve`'s JSON lines), the sidecar's lifecycle events, and failing handlers logged with their rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from virtsvc.contracts import Catalog
from virtsvc.scenarios import compile_text, load_scenarios
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
RESERVE = "shop.v1.Inventory/Reserve"

RULES = """\
scenario: logged
version: 3
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: GONE}}
    status: {code: NOT_FOUND, message: no such sku}
  - method: shop.v1.Inventory/Reserve
    delay: 30ms
    reply: {reservationId: r-1}
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: KNOWN}}
    reply: {sku: KNOWN}
"""


@pytest.fixture(autouse=True)
def debug_level() -> Iterator[None]:
    """Debug events pass whatever level an earlier test left structlog filtering at (capture_logs keeps
    the wrapper class, and the rpc events are debug-level)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(10))
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    srv = VirtualServer(catalog, compile_text(RULES, catalog, origin="logged.yaml"), port=0, log_calls=True)
    srv.start()
    yield srv
    srv.stop(0)


def _md(session: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", "logged"), ("x-virtsvc-session", session))


def _rpc_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5  # the event is written as the call finishes, just before grpc answers
    while not any(e["event"] == "rpc" for e in logs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [e for e in logs if e["event"] == "rpc"]


def test_an_answered_call_logs_one_rpc_event(inv: Any, pb: SimpleNamespace, sid: str) -> None:
    """Scenario, version, session, method, rule, code, the simulated delay and the total, field by field."""
    with capture_logs() as logs:
        inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md(sid))
        (event,) = _rpc_events(logs)
    duration = event.pop("duration_ms")
    delay = event.pop("delay_ms")
    assert event == {
        "event": "rpc",
        "log_level": "debug",
        "scenario": "logged",
        "version": 3,
        "session": sid,
        "method": RESERVE,
        "rule": "logged.yaml:7",
        "code": "OK",
    }
    assert 30.0 <= delay <= duration


def test_a_near_miss_is_logged_with_its_text(inv: Any, pb: SimpleNamespace, sid: str) -> None:
    """No rule matched: the event carries the near-miss text (the status message) instead of a rule."""
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as info:
        inv.GetItem(pb.inv.GetItemRequest(sku="NOPE"), metadata=_md(sid))
    (event,) = _rpc_events(logs)
    assert event["code"] == "UNIMPLEMENTED"
    assert event["near_miss"] == info.value.details()
    assert 'request.sku: expected "KNOWN", got "NOPE"' in event["near_miss"]
    assert "rule" not in event and "message" not in event
    assert event["delay_ms"] == 0.0


def test_a_scripted_status_logs_its_message(inv: Any, pb: SimpleNamespace, sid: str) -> None:
    """A rule answering NOT_FOUND: its rule and its message."""
    with capture_logs() as logs, pytest.raises(grpc.RpcError):
        inv.Reserve(pb.inv.ReserveRequest(sku="GONE"), metadata=_md(sid))
    (event,) = _rpc_events(logs)
    assert (event["rule"], event["code"], event["message"]) == ("logged.yaml:4", "NOT_FOUND", "no such sku")


def test_without_log_calls_nothing_subscribes(catalog: Catalog, channel_to: Any, pb: SimpleNamespace) -> None:
    """log_calls off (the default): no rpc event, and the journal has no subscriber for it to pay."""
    server = VirtualServer(catalog, compile_text(RULES, catalog, origin="logged.yaml"), port=0).start()
    try:
        assert server.journal._subscribers == []
        inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
        with capture_logs() as logs:
            inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("quiet"))
        assert [e for e in logs if e["event"] == "rpc"] == []
    finally:
        server.stop(0)


HANDLER = """\
from virtsvc import Scenario

scenario = Scenario("handled")


@scenario.handler("shop.v1.Inventory/Reserve")
def reserve(request, context):
    raise KeyError(request.sku)
"""


def test_a_failing_handler_is_logged_with_its_rule(
    catalog: Catalog, channel_to: Any, pb: SimpleNamespace, tmp_path: Path
) -> None:
    """A handler that raises: INTERNAL for the caller, a warning naming the handler and its file:line."""
    script = tmp_path / "handled.py"
    script.write_text(HANDLER)
    server = VirtualServer(catalog, load_scenarios([script], catalog), port=0, log_calls=True).start()
    try:
        inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
        with capture_logs() as logs, pytest.raises(grpc.RpcError) as info:
            inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=(("x-virtsvc-scenario", "handled"),))
        assert info.value.code() is grpc.StatusCode.INTERNAL
        (failed,) = [e for e in logs if e["event"] == "handler.failed"]
        assert failed == {
            "event": "handler.failed",
            "log_level": "warning",
            "handler": "reserve",
            "rule": f"{script}:6",
            "error": "KeyError: 'A'",
        }
        (rpc,) = _rpc_events(logs)
        assert (rpc["rule"], rpc["code"]) == (f"{script}:6", "INTERNAL")
        assert rpc["message"] == info.value.details()
    finally:
        server.stop(0)


def _readme_rpc_example() -> dict[str, Any]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("every call is one `rpc` event")
    block = readme[readme.index("```json\n", start) + len("```json\n") :]
    example: dict[str, Any] = json.loads(block[: block.index("```")])
    return example


class _Lines:
    """The JSON lines of a process's stdout, read as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._process = process
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in list(self.lines) if line.startswith("{")]
        return [e for e in found if name is None or e.get("event") == name]

    def wait(self, name: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            if self._process.poll() is not None and len(self.events(name)) < count:
                time.sleep(0.2)
                if len(self.events(name)) >= count:
                    return self.events(name)
                raise AssertionError(f"exited {self._process.returncode} without {name!r}: {self.lines}")
            time.sleep(0.02)
        raise AssertionError(f"no {name!r} event: {self.lines}")


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], _Lines, Path]]:
    """`virtsvc serve --log-level debug --metrics-port 0 --watch` over a scenario file in tmp_path."""
    scenario = tmp_path / "logged.yaml"
    scenario.write_text(RULES)
    command = [sys.executable, "-m", "virtsvc.cli", "serve", "--protos", "protos", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--scenarios", str(scenario), "--log-level", "debug", "--metrics-port", "0", "--watch"],
        cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process, _Lines(process), scenario
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=15)


def test_serve_writes_lifecycle_and_rpc_events_as_json_lines(
    sidecar: tuple[subprocess.Popen[str], _Lines, Path], catalog: Catalog
) -> None:
    """serving (with the metrics URL), an rpc line per call, reloaded, draining and stopped: JSON lines
    on stdout; /metrics counts the same calls."""
    process, lines, scenario = sidecar
    (serving,) = lines.wait("serving")
    assert serving["level"] == "info" and serving["log_calls"] is True and serving["traces"] is False
    port = serving["port"]
    assert serving["metrics"].startswith("http://127.0.0.1:") and serving["metrics"].endswith("/metrics")
    spec = catalog.method(RESERVE)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(spec.path, request_serializer=lambda m: m.SerializeToString())
        for sku in ("A", "GONE"):
            try:
                call(spec.input_class(sku=sku), metadata=_md("json"), timeout=5)
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.NOT_FOUND
    first, second = lines.wait("rpc", 2)
    assert sorted(first) == sorted(_readme_rpc_example())  # the README shows the same fields
    for event in (first, second):
        assert isinstance(event.pop("duration_ms"), float)
        assert isinstance(event.pop("timestamp"), str)
    assert first.pop("delay_ms") >= 30.0
    assert second.pop("delay_ms") == 0.0
    base = {"event": "rpc", "level": "debug", "scenario": "logged", "version": 3, "session": "json"}
    assert first == {**base, "method": RESERVE, "rule": f"{scenario}:7", "code": "OK"}
    assert second == {
        **base,
        "method": RESERVE,
        "rule": f"{scenario}:4",
        "code": "NOT_FOUND",
        "message": "no such sku",
    }
    with urllib.request.urlopen(serving["metrics"], timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    counted = {
        s.labels["code"]: s.value for s in families["virtsvc_calls"].samples if s.name.endswith("_total")
    }
    assert counted == {"OK": 1.0, "NOT_FOUND": 1.0}

    scenario.write_text(RULES.replace("version: 3", "version: 4"))
    (reloaded,) = lines.wait("reloaded")
    assert reloaded["scenarios"] == ["logged"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    (draining,) = lines.wait("draining")
    assert (draining["signal"], draining["grace"]) == ("SIGTERM", 10.0)
    names = [e["event"] for e in lines.events()]
    assert names[-2:] == ["draining", "stopped"]
    assert names.index("serving") < names.index("rpc") < names.index("reloaded") < names.index("draining")


def test_serve_at_info_writes_no_rpc_lines(tmp_path: Path, catalog: Catalog) -> None:
    """The default level (info): lifecycle events, not a line per call."""
    scenario = tmp_path / "logged.yaml"
    scenario.write_text(RULES)
    command = [sys.executable, "-m", "virtsvc.cli", "serve", "--protos", "protos", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--scenarios", str(scenario)],
        cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _Lines(process)
        (serving,) = lines.wait("serving")
        assert serving["log_calls"] is False and serving["metrics"] is None
        spec = catalog.method(RESERVE)
        with grpc.insecure_channel(f"127.0.0.1:{serving['port']}") as channel:
            call = channel.unary_unary(spec.path, request_serializer=lambda m: m.SerializeToString())
            call(spec.input_class(sku="A"), metadata=_md("quiet"), timeout=5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        lines.wait("stopped")
        names = [e["event"] for e in lines.events()]
        assert names[names.index("serving") :] == ["serving", "draining", "stopped"]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=15)
