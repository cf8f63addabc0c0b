"""`virtsvc serve` as a subprocess, driven only over the wire: what a platform team sees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog

ROOT = Path(__file__).resolve().parent.parent


def _command() -> list[str]:
    script = shutil.which("virtsvc")
    return [script] if script else [sys.executable, "-m", "virtsvc.cli"]


@dataclass
class Sidecar:
    process: subprocess.Popen[str]
    ready: dict[str, object]
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ready['port']}"

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def wait_for_event(self, name: str, timeout: float = 10.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} event; got {self.lines}")


def _reader(process: subprocess.Popen[str], lines: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[object]:
    """``start_sidecar(*args)`` runs `virtsvc serve ARGS --port 0` and waits for its `serving` event."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Sidecar:
        process = subprocess.Popen(
            [*_command(), "serve", "--port", "0", "--log-format", "json", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})},
        )
        started.append(process)
        lines: list[str] = []
        threading.Thread(target=_reader, args=(process, lines), daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in list(lines):
                if line.startswith("{") and json.loads(line).get("event") == "serving":
                    return Sidecar(process, json.loads(line), lines)
            if process.poll() is not None:
                time.sleep(0.1)
                raise AssertionError(f"serve exited {process.returncode}: {lines}")
            time.sleep(0.02)
        raise AssertionError(f"serve never became ready: {lines}")

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _reserve(address: str, catalog: Catalog, scenario: str, session: str = "t", timeout: float = 5) -> object:
    spec = catalog.method("shop.v1.Inventory/Reserve")
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            spec.path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=spec.output_class.FromString,
        )
        return call(
            spec.input_class(sku="ABC-1", qty=3),
            metadata=[("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session)],
            timeout=timeout,
        )


def test_ready_event_health_reflection_and_a_call(start_sidecar: object, catalog: Catalog) -> None:
    """The `serving` event carries host, port, services and scenarios; then health, reflection and calls."""
    sidecar = start_sidecar("--protos", "protos", "--scenarios", "scenarios")
    ready = sidecar.ready
    assert ready["host"] == "127.0.0.1" and isinstance(ready["port"], int) and ready["port"] > 0
    assert ready["services"] == ["shop.v1.Inventory", "shop.v1.Orders", "shop.v1.Payments"]
    assert "checkout-happy" in ready["scenarios"] and "interop" in ready["scenarios"]
    with grpc.insecure_channel(sidecar.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"shop.v1.Inventory", "virtsvc.admin.v1.Admin", "grpc.health.v1.Health"} <= services
    assert _reserve(sidecar.address, catalog, "checkout-happy").reservation_id == "r-ABC-1-3"


def test_admin_over_the_wire(start_sidecar: object, catalog: Catalog, tmp_path: Path) -> None:
    """Put, list, call, journal, reset and delete through the admin API of a running sidecar."""
    empty = tmp_path / "none"
    empty.mkdir()
    sidecar = start_sidecar("--protos", "protos", "--scenarios", str(empty))
    with grpc.insecure_channel(sidecar.address) as channel:
        admin = AdminClient(channel)
        text = (
            "scenario: live\nrules:\n  - method: shop.v1.Inventory/Reserve\n"
            "    sequence: [{reply: {reservationId: one}}, {reply: {reservationId: two}}]\n"
        )
        assert list(admin.call("PutScenario", text=text).names) == ["live"]
        assert [s.name for s in admin.call("ListScenarios").scenarios] == ["live"]
        assert _reserve(sidecar.address, catalog, "live").reservation_id == "one"
        journal = admin.call("GetJournal", scenario="live", session="t").entries
        assert [(e.method, e.code, e.reply["reservationId"]) for e in journal] == [
            ("shop.v1.Inventory/Reserve", "OK", "one")
        ]
        assert admin.call("ResetSession", scenario="live", session="t").existed is True
        assert _reserve(sidecar.address, catalog, "live").reservation_id == "one"
        admin.call("DeleteScenario", name="live")
    with pytest.raises(grpc.RpcError) as info:
        _reserve(sidecar.address, catalog, "live")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert info.value.details() == 'unknown scenario "live"; loaded scenarios: none'


def test_watch_reloads_good_edits_and_keeps_serving_on_bad_ones(
    start_sidecar: object, catalog: Catalog, tmp_path: Path
) -> None:
    """--watch: a good edit is served by the next call; a bad edit is logged and the old rules stay."""
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    file = scenarios / "w.yaml"
    file.write_text(
        "scenario: w\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: v1}\n"
    )
    sidecar = start_sidecar("--protos", "protos", "--scenarios", str(scenarios), "--watch")
    assert _reserve(sidecar.address, catalog, "w").reservation_id == "v1"

    file.write_text(
        "scenario: w\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply: {reservationId: v2}\n"
    )
    sidecar.wait_for_event("reloaded")
    assert _reserve(sidecar.address, catalog, "w").reservation_id == "v2"

    file.write_text(
        "scenario: w\nrules:\n  - method: shop.v1.Inventory/Reserve\n    replly: {reservationId: v3}\n"
    )
    failed = sidecar.wait_for_event("reload_failed")
    assert failed["problems"] == [f'{file}:4: unknown rule key "replly"; did you mean "reply"?']
    assert failed["kept"] == ["w"]
    assert _reserve(sidecar.address, catalog, "w").reservation_id == "v2"


def test_sigterm_lets_a_call_in_flight_finish(
    start_sidecar: object, catalog: Catalog, tmp_path: Path
) -> None:
    """SIGTERM: the delayed call in flight completes with its reply, then the process exits 0."""
    slow = tmp_path / "slow.yaml"
    slow.write_text(
        "scenario: slow\nrules:\n  - method: shop.v1.Inventory/Reserve\n    delay: 800ms\n"
        "    reply: {reservationId: finished}\n"
    )
    sidecar = start_sidecar("--protos", "protos", "--scenarios", str(slow))
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["reply"] = _reserve(sidecar.address, catalog, "slow", timeout=10).reservation_id
        except grpc.RpcError as err:
            result["error"] = err.code()

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)  # the call is now waiting out its delay on the server
    sidecar.process.send_signal(signal.SIGTERM)
    caller.join(timeout=15)
    assert result == {"reply": "finished"}
    assert sidecar.process.wait(timeout=15) == 0
    names = [e.get("event") for e in sidecar.events()]
    assert names[-2:] == ["draining", "stopped"]


def test_descriptors_from_gen_and_from_a_users_export(
    start_sidecar: object, catalog: Catalog, generated: Path, tmp_path: Path
) -> None:
    """--descriptors takes `virtsvc gen`'s descriptors.binpb or a plain protoc export without source info."""
    sidecar = start_sidecar("--descriptors", str(generated / "descriptors.binpb"), "--scenarios", "scenarios")
    assert _reserve(sidecar.address, catalog, "checkout-happy").reservation_id == "r-ABC-1-3"
    exported = tmp_path / "export.pb"
    from grpc_tools import protoc

    files = [str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto")]
    well_known = Path(protoc.__file__).parent / "_proto"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"-I{well_known}",
                "--include_imports",
                f"--descriptor_set_out={exported}",
                *files,
            ]
        )
        == 0
    )
    other = start_sidecar("--descriptors", str(exported), "--scenarios", "scenarios/checkout-happy.yaml")
    assert _reserve(other.address, catalog, "checkout-happy").reservation_id == "r-ABC-1-3"


def test_defaults_from_pyproject(start_sidecar: object, catalog: Catalog, tmp_path: Path) -> None:
    """[tool.virtsvc] configures protos, scenarios and the default scenario; flags win."""
    shutil.copytree(ROOT / "protos", tmp_path / "contracts")
    shutil.copytree(ROOT / "scenarios", tmp_path / "behaviour")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.virtsvc]\nprotos = "contracts"\nscenarios = ["behaviour"]\nport = 0\n'
        'default_scenario = "limits"\n'
    )
    sidecar = start_sidecar(cwd=tmp_path)
    assert sidecar.ready["default_scenario"] == "limits"
    assert _reserve(sidecar.address, catalog, "").reservation_id == "early-bird"


def _free_port_taken() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["serve", "--bogus"], 2, "virtsvc: error: unrecognized arguments: --bogus (see 'virtsvc --help')"),
        (
            ["serve", "--port", "99999"],
            2,
            "virtsvc serve: error: argument --port: port must be between 0 and 65535, not 99999 "
            "(see 'virtsvc serve --help')",
        ),
        (
            ["serve", "--port", "http"],
            2,
            "virtsvc serve: error: argument --port: not a port number: 'http' (see 'virtsvc serve --help')",
        ),
        (
            ["serve", "--protos", "protos", "--descriptors", "x.binpb"],
            2,
            "virtsvc serve: error: argument --descriptors: not allowed with argument --protos "
            "(see 'virtsvc serve --help')",
        ),
        (["serve", "--protos", "no-such-dir"], 1, "virtsvc: error: no-such-dir: no such directory"),
        (
            ["serve", "--descriptors", "missing.binpb"],
            1,
            "virtsvc: error: missing.binpb: no such descriptor set (run `virtsvc gen` first?)",
        ),
        (
            ["serve", "--protos", "protos", "--scenarios", "nowhere"],
            1,
            "virtsvc: error: nowhere: no such scenario file or directory",
        ),
        (
            [
                "serve",
                "--protos",
                "protos",
                "--scenarios",
                "scenarios",
                "--default-scenario",
                "checkout-hapy",
            ],
            1,
            'virtsvc: error: default scenario "checkout-hapy" is not loaded; loaded scenarios: bulk-update, '
            "checkout-happy, faults, held-streams, interop, inventory-watch, latency, limits, matching, "
            "orders-track, payments-retry, stock-base, stock-discontinued",
        ),
    ],
)
def test_bad_flags_get_one_clear_line(args: list[str], code: int, expected: str) -> None:
    """Each user mistake: one line, a non-zero exit, never a traceback."""
    run = _run(*args)
    assert run.returncode == code
    assert run.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in run.stderr + run.stdout


def test_occupied_port(tmp_path: Path) -> None:
    """A port already in use: one line naming it, exit 1."""
    sock, port = _free_port_taken()
    with sock:
        run = _run("serve", "--protos", "protos", "--port", str(port))
    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"virtsvc: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_invalid_scenarios_refuse_to_start(tmp_path: Path) -> None:
    """The server validates like `virtsvc check` and refuses to start, printing the same located lines."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenario: bad\nrules:\n  - method: shop.v1.Inventory/Reserv\n    reply: {}\n")
    serve = _run("serve", "--protos", "protos", "--scenarios", str(bad))
    check = _run("check", "--protos", "protos", str(bad))
    line = f'{bad}:3: unknown method "shop.v1.Inventory/Reserv"; did you mean "shop.v1.Inventory/Reserve"?'
    assert (serve.returncode, check.returncode) == (1, 1)
    assert serve.stderr.strip() == line == check.stderr.strip()
