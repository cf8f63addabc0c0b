"""Shared pieces of the benchmark: paths, stubs, gRPC framing, pinning, server processes, h2load.

Every process started here runs in its own session (process group) and is stopped by group, with SIGTERM
first and SIGKILL after a grace period, also when the benchmark fails half-way.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PROTOS = BENCH / "protos"
PROTO_FILE = PROTOS / "bench" / "v1" / "bench.proto"
SCENARIOS = BENCH / "scenarios" / "bench.yaml"
RESULTS = BENCH / "results"

SCENARIO_HEADER = "x-virtsvc-scenario"
SESSION_HEADER = "x-virtsvc-session"
SAY = "/bench.v1.Echo/Say"
STREAM = "/bench.v1.Echo/Stream"
STREAM_COUNT = 1000  # messages per streaming call, as in scenario stream1000

SERVER_CORE = 0
LOAD_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The cores this process could use when it started (run.py later pins itself to the load core).
USABLE_CORES = frozenset(os.sched_getaffinity(0))


class BenchError(RuntimeError):
    """A benchmark step that could not be measured: the message says which and why."""


# -- stubs and messages ------------------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """A SIGTERM (a CI time limit, ``timeout``) ends the run through its cleanups, as Ctrl-C does, so no
    server or worktree is left behind."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def compile_stubs(out: Path) -> tuple[ModuleType, ModuleType]:
    """Compiles bench.proto with grpc_tools.protoc into ``out``; returns (bench_pb2, bench_pb2_grpc)."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO_FILE)]
    if protoc.main(args) != 0:
        raise BenchError(f"grpc_tools.protoc failed on {PROTO_FILE}")
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("bench.v1.bench_pb2"), importlib.import_module("bench.v1.bench_pb2_grpc")


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# -- pinning ---------------------------------------------------------------------------------------


def cores() -> int:
    return len(USABLE_CORES)


def pinning() -> str:
    """How processes are pinned here: ``taskset``, ``sched_setaffinity`` or ``none`` (fewer than 2 cores)."""
    if not {SERVER_CORE, LOAD_CORE} <= USABLE_CORES:
        return "none"
    return "taskset" if shutil.which("taskset") else "sched_setaffinity"


def pinned(cmd: Sequence[str], core: int) -> list[str]:
    """``cmd`` run on one core (taskset when present; otherwise see ``preexec_for``)."""
    if pinning() == "taskset":
        return ["taskset", "-c", str(core), *cmd]
    return list(cmd)


def preexec_for(core: int) -> Any:
    """A preexec_fn pinning the child when taskset is missing; None when taskset (or nothing) pins."""
    if pinning() != "sched_setaffinity":
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


# -- /proc -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; resolution 1/CLK_TCK."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


# -- server processes --------------------------------------------------------------------------------


@dataclass
class Server:
    """A server subprocess that announced ``{"event": "serving", "port": N}`` on stdout."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    started: float  # perf_counter at spawn
    announced: float  # perf_counter when the serving line was read
    logdir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _serving_port(stdout: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError):
        for line in stdout.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "serving" and isinstance(event.get("port"), int):
                    return int(event["port"])
    return None


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class _Launch:
    """A spawned server process, not yet known to be serving."""

    def __init__(
        self, name: str, cmd: Sequence[str], core: int | None, env: Mapping[str, str] | None, logdir: Path
    ) -> None:
        self.name = name
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = logdir / f"{name}.out", logdir / f"{name}.err"
        full = pinned(cmd, core) if core is not None else list(cmd)
        self.started = time.perf_counter()
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                full,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=ROOT,
                preexec_fn=preexec_for(core) if core is not None else None,
            )

    def wait_serving(self, timeout: float) -> Server:
        deadline = self.started + timeout
        while True:
            port = _serving_port(self.stdout)
            if port is not None:
                return Server(self.name, self.proc, port, self.started, time.perf_counter(), self.logdir)
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.proc.returncode} before serving: "
                    + tail(self.stderr)
                    + tail(self.stdout)
                )
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"{self.name} did not announce serving within {timeout:.0f}s: {tail(self.stderr)}"
                )
            time.sleep(0.005)


@contextlib.contextmanager
def server_processes(
    specs: Sequence[tuple[str, Sequence[str]]],
    *,
    core: int | None = SERVER_CORE,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[list[Server]]:
    """Starts every ``(name, cmd)`` at once (pinned to ``core``), waits for each serving line, and stops
    them all on exit, also when one fails to start.

    stdout and stderr go to files, never pipes: a chatty server must not block on a full pipe.
    """
    logdir = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    launches: list[_Launch] = []
    try:
        for name, cmd in specs:
            launches.append(_Launch(name, cmd, core, env, logdir))
        yield [launch.wait_serving(timeout) for launch in launches]
    finally:
        for launch in launches:
            stop_process(launch.proc)
        shutil.rmtree(logdir, ignore_errors=True)


@contextlib.contextmanager
def server_process(
    name: str,
    cmd: Sequence[str],
    *,
    core: int | None = SERVER_CORE,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[Server]:
    """One server: see ``server_processes``."""
    with server_processes([(name, cmd)], core=core, env=env, timeout=timeout) as (server,):
        yield server


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(errors="replace").strip().splitlines()
        if text:
            return "\n  " + "\n  ".join(text[-lines:])
    return ""


# -- h2load ----------------------------------------------------------------------------------------


@dataclass
class H2Result:
    requests: int
    succeeded: int
    failed: int
    errored: int
    seconds: float
    rps: float
    data_bytes: int
    protocol: str
    latencies_us: list[int] = field(default_factory=list)  # from --log-file, when asked
    cpu_seconds: float | None = None  # the server's, over the run

    def percentile(self, p: float) -> float | None:
        return percentile(self.latencies_us, p)


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s|us), ([\d.]+) req/s")
_TRAFFIC = re.compile(r"traffic: .*?, .*?\((\d+)\) data")
_PROTOCOL = re.compile(r"Application protocol: (\S+)")


def h2load_path() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise BenchError("h2load not found: install nghttp2-client (apt-get install nghttp2-client)")
    return path


def run_h2load(
    url: str,
    body: Path,
    headers: Mapping[str, str],
    *,
    requests: int,
    clients: int,
    streams: int,
    server_pid: int | None = None,
    log_latencies: bool = False,
    timeout: float = 120.0,
) -> H2Result:
    """One h2load run (h2c, prior knowledge), pinned to the load core; the server's CPU time over it."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log = Path(tmp) / "requests.log"
        cmd = [h2load_path(), "-n", str(requests), "-c", str(clients), "-m", str(streams), "-d", str(body)]
        for key, value in headers.items():
            cmd += ["-H", f"{key}: {value}"]
        if log_latencies:
            cmd += ["--log-file", str(log)]
        cmd.append(url)
        cpu0 = cpu_seconds(server_pid) if server_pid else None
        try:
            done = subprocess.run(
                pinned(cmd, LOAD_CORE),
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
                preexec_fn=preexec_for(LOAD_CORE),
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"h2load ran over {timeout:.0f}s: {' '.join(cmd)}") from None
        cpu1 = cpu_seconds(server_pid) if server_pid else None
        out = done.stdout
        m_req, m_fin = _REQUESTS.search(out), _FINISHED.search(out)
        m_traffic, m_proto = _TRAFFIC.search(out), _PROTOCOL.search(out)
        if done.returncode != 0 or not (m_req and m_fin and m_traffic):
            raise BenchError(f"h2load failed (status {done.returncode}):\n{out}\n{done.stderr}")
        seconds = float(m_fin.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[m_fin.group(2)]
        latencies: list[int] = []
        if log_latencies and log.exists():
            for line in log.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == "200":
                    latencies.append(int(parts[2]))
        result = H2Result(
            requests=int(m_req.group(1)),
            succeeded=int(m_req.group(4)),
            failed=int(m_req.group(5)),
            errored=int(m_req.group(6)),
            seconds=seconds,
            rps=float(m_fin.group(3)),
            data_bytes=int(m_traffic.group(1)),
            protocol=m_proto.group(1) if m_proto else "?",
            latencies_us=latencies,
            cpu_seconds=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
        )
    return result


def check_h2load(result: H2Result, expected_data_per_call: int, what: str) -> None:
    """Every request succeeded over h2c and carried exactly the expected reply bytes.

    h2load cannot see gRPC trailers; a non-OK status comes without a reply message, so the DATA byte count
    is what proves every call got its answer.
    """
    if result.protocol != "h2c":
        raise BenchError(f"{what}: h2load spoke {result.protocol}, not h2c")
    if result.succeeded != result.requests:
        raise BenchError(
            f"{what}: {result.succeeded} of {result.requests} requests succeeded "
            f"({result.failed} failed, {result.errored} errored)"
        )
    expected = expected_data_per_call * result.requests
    if result.data_bytes != expected:
        raise BenchError(
            f"{what}: {result.data_bytes} bytes of replies, expected {expected} "
            f"({expected_data_per_call} per call): some calls did not get the expected answer"
        )


# -- statistics --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(p / 100 * len(ordered))))
    return float(ordered[rank - 1])


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
