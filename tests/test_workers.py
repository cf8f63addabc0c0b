"""`virtsvc serve --workers N`: several processes on one port, started, stopped and watched as one server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from _workers import ROOT, Served, alive, gone
from grpc_health.v1 import health_pb2, health_pb2_grpc

from virtsvc.contracts import Catalog

SEQUENCE = """\
scenario: counted
rules:
  - method: shop.v1.Inventory/Reserve
    sequence:
      - {reply: {reservationId: one}}
      - {reply: {reservationId: two}}
      - {reply: {reservationId: three}}
    after: repeat_last
"""

# The supervisor refuses --workers with the memory store; these tests of the process handling itself drive
# it directly, where each worker's own memory store shows which worker answered.
SUPERVISOR = """\
import sys
from virtsvc import cli
from virtsvc.server.workers import run_workers
cli.configure_logging("json", 20, stream="stdout")
sys.exit(run_workers(sys.argv[1:], count=2, host="127.0.0.1", port=0, grace=5.0))
"""


def _reserve(address: str, catalog: Catalog, session: str) -> str:
    spec = catalog.method("shop.v1.Inventory/Reserve")
    with grpc.insecure_channel(address) as channel:  # a channel of its own: a connection of its own
        call = channel.unary_unary(
            spec.path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=spec.output_class.FromString,
        )
        reply = call(
            spec.input_class(sku="ABC-1", qty=1),
            metadata=[("x-virtsvc-scenario", "counted"), ("x-virtsvc-session", session)],
            timeout=30,
        )
    return str(reply.reservation_id)


def _supervised(launch: object, tmp_path: Path) -> Served:
    scenario = tmp_path / "counted.yaml"
    scenario.write_text(SEQUENCE)
    return launch(  # type: ignore[operator,no-any-return]
        sys.executable, "-c", SUPERVISOR, "serve", "--protos", "protos", "--scenarios", str(scenario),
        "--workers", "2", "--log-format", "json",
    )  # fmt: skip


def test_the_memory_store_refuses_more_than_one_worker() -> None:
    """--workers 2 with the default store: one line naming --store redis://, exit 2, nothing served."""
    done = subprocess.run(
        [sys.executable, "-m", "virtsvc.cli", "serve", "--protos", "protos", "--workers", "2", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "virtsvc: error: --workers 2 needs a shared store: with --store memory (the default) each worker "
        "would keep its own sessions, sequences and journals; give --store redis://HOST:PORT/DB\n"
    )
    assert "serving" not in done.stdout


def test_workers_share_one_port_and_stop_as_one(launch: object, tmp_path: Path, catalog: Catalog) -> None:
    """One `serving` event for both workers; connections reach both; SIGTERM stops them all, exit 0."""
    served = _supervised(launch, tmp_path)
    serving = served.wait_for("serving")
    pids = served.worker_pids
    assert len(set(pids)) == 2 and served.process.pid not in pids
    assert len(served.events("serving")) == 1
    with grpc.insecure_channel(served.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert serving["scenarios"] == ["counted"]

    # Each worker has a memory store of its own here, so the session's sequence starts over on each: two
    # "one"s among the answers are two workers answering (the reason the CLI refuses this store).
    answers = [_reserve(served.address, catalog, "s") for _ in range(40)]
    assert answers.count("one") == 2, answers

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    assert gone(pids), f"workers left running: {[p for p in pids if alive(p)]}"
    assert [e["event"] for e in map(json.loads, filter(lambda x: x.startswith("{"), served.lines))][-2:] == [
        "draining",
        "stopped",
    ]


def test_a_worker_that_dies_is_reported_and_the_server_exits_1(launch: object, tmp_path: Path) -> None:
    """SIGKILL to one worker: `worker_exited` names it and the signal; the other drains; exit 1."""
    served = _supervised(launch, tmp_path)
    first, second = served.worker_pids
    os.kill(first, signal.SIGKILL)
    assert served.process.wait(timeout=60) == 1
    [exited] = served.events("worker_exited")
    assert (exited["pid"], exited["worker"], exited["signal"], exited["level"]) == (
        first,
        0,
        "SIGKILL",
        "error",
    )
    assert gone([second])


def test_workers_stop_when_their_supervisor_is_killed(launch: object, tmp_path: Path) -> None:
    """SIGKILL to the supervisor: its workers see their link close and exit by themselves, no orphans."""
    served = _supervised(launch, tmp_path)
    pids = served.worker_pids
    served.process.kill()
    served.process.wait(timeout=30)
    assert gone(pids), f"orphaned workers: {[p for p in pids if alive(p)]}"


def test_a_worker_that_cannot_start_is_reported_once(launch: object, tmp_path: Path) -> None:
    """A bad scenario: the first worker says why, once, and the supervisor exits with its status."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenario: bad\nrules:\n  - method: shop.v1.Inventory/Reserve\n    replly: {}\n")
    served = launch(
        sys.executable, "-c", SUPERVISOR, "serve", "--protos", "protos", "--scenarios", str(bad),
        "--workers", "2", "--log-format", "json",
    )  # fmt: skip
    assert served.process.wait(timeout=60) == 1
    time.sleep(0.2)
    problems = [line for line in served.lines if 'unknown rule key "replly"' in line]
    assert problems == [f'{bad}:4: unknown rule key "replly"; did you mean "reply"?']
    assert not served.events("serving")


def test_each_worker_serves_metrics_of_its_own(launch: object, tmp_path: Path) -> None:
    """--metrics-port 0: each worker its own /metrics, listed in the `serving` event's workers."""
    import urllib.request

    scenario = tmp_path / "counted.yaml"
    scenario.write_text(SEQUENCE)
    served = launch(
        sys.executable, "-c", SUPERVISOR, "serve", "--protos", "protos", "--scenarios", str(scenario),
        "--workers", "2", "--log-format", "json", "--metrics-port", "0",
    )  # fmt: skip
    serving = served.wait_for("serving")
    urls = [w["metrics"] for w in serving["workers"]]  # type: ignore[attr-defined]
    assert len(set(urls)) == 2 and serving["metrics"] == urls[0]
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert b"# TYPE" in response.read()
