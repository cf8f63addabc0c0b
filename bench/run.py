"""The virtsvc benchmark: virtsvc's figures as ratios to a hand-written grpcio servicer, in one run.

    python bench/run.py            # the full suite (several minutes), figures in bench/results/latest.json
    python bench/run.py --quick    # under a minute: short runs, small size figures, plus --check
    tox -e bench -- --quick        # what .ci/run runs

Method (see bench/README.md): servers pinned to core 0, load generators to core 1; h2load drives unary
calls over h2c at 4 connections x 16 streams; the servers under comparison run side by side and the load
runs alternate between them, so that drift and noise of the machine hit each alike; medians of >= 3 runs.
Every server is first asked with a real grpc client, and every h2load run must return exactly the
expected reply bytes for each request.

``--check`` (on by default with ``--quick``) exits 1 when virtsvc's static-reply throughput is below
0.5x the hand-written servicer's in the same run. Any step that cannot be measured exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    LOAD_CORE,
    PROTOS,
    RESULTS,
    ROOT,
    SAY,
    SCENARIO_HEADER,
    SCENARIOS,
    SERVER_CORE,
    SESSION_HEADER,
    STREAM,
    STREAM_COUNT,
    BenchError,
    H2Result,
    Server,
    check_h2load,
    compile_stubs,
    cores,
    cpu_seconds,
    exit_on_sigterm,
    grpc_frame,
    h2load_path,
    median,
    percentile,
    pinned,
    pinning,
    preexec_for,
    rss_bytes,
    run_h2load,
    server_process,
    server_processes,
    stop_process,
)
from make_scenarios import filler_name, write_bench_yaml, write_scale_tree

CHECK_THRESHOLD = 0.5
CLIENTS, STREAMS = 4, 16  # the load shape of the published targets

# The peers' own published figures; NOT measured here (different machine).
PEERS = [
    ("@alenon/grpc-mock-server (npm)", 24_700),
    ("grpc-mock (npm)", 31_300),
    ("plain @grpc/grpc-js server (npm)", 25_000),
]
ISSUE_FIGURES = {
    "hand-written sync grpcio servicer": "about 8,500 calls/s, about 117 µs server CPU per call, p99 < 15 ms "
    "at 4x16, about 0.35 ms at concurrency 1",
    "generic handler, pre-serialised bytes": "about 9,100 calls/s",
}


@dataclass
class Config:
    quick: bool
    repeats: int = 3
    unary_repeats: int = 3  # the unary throughput table, the figure the check reads
    unary_requests: int = 20_000
    warmup_requests: int = 2_000
    c1_requests: int = 3_000
    stream_requests: int = 96
    stream_shape: tuple[int, int] = (4, 4)  # connections x streams: 16 streams of 1,000 messages in flight
    stream_generic: bool = True  # also stream from the generic-handler baseline
    py_shapes: tuple[tuple[int, int], ...] = ((1, 1), (4, 4))  # processes x threads
    py_calls_c1: int = 2_000
    py_calls_c16: int = 400  # per thread
    py_seconds: float = 5.0
    scale_scenarios: int = 10_000
    scale_rules: int = 100_000
    scale_sessions: int = 10_000
    scale_timeout: float = 900.0
    scale_gc_defaults: bool = True  # also the big scenario set served with the collector at its defaults
    startup_repeats: int = 3
    session_repeats: int = 200
    gen_protos: int = 100
    gen_repeats: int = 3
    # below the journal's total bound (per entry, per session), then 10,000 sessions past it (the bound)
    memory_runs: tuple[tuple[int, int], ...] = ((1_000, 90), (10_000, 9), (10_000, 20))
    profile_seconds: int = 10

    @classmethod
    def for_mode(cls, quick: bool) -> Config:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            unary_repeats=5,  # short runs: more of them, so one disturbed run moves the median less
            unary_requests=4_000,  # ~1 s a run: shorter runs made the CI ratio swing by +-5%
            warmup_requests=500,
            c1_requests=200,
            stream_requests=8,
            stream_shape=(4, 2),
            stream_generic=False,
            py_shapes=((4, 4),),  # h2load measures concurrency 1 in quick mode
            py_calls_c1=300,
            py_calls_c16=25,
            py_seconds=1.0,
            scale_scenarios=300,
            scale_rules=3_000,
            scale_sessions=1_000,
            scale_timeout=120.0,
            scale_gc_defaults=False,
            startup_repeats=1,
            session_repeats=30,
            gen_protos=100,
            gen_repeats=1,
            memory_runs=((5_000, 4), (2_000, 60)),  # the second past the bound
        )


# -- the environment: stubs, request bodies, descriptors, commands -------------------------------------


@dataclass
class Case:
    """One load: a method, a request body and the reply every call must get."""

    name: str
    path: str
    request: bytes
    reply: bytes  # one serialised reply message
    replies_per_call: int = 1

    @property
    def data_per_call(self) -> int:
        return len(grpc_frame(self.reply)) * self.replies_per_call


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # virtsvc's modules byte-compiled, as `pip install` leaves them (grpc_tools, the baseline of the gen
        # figure, is). Without it, a tree installed with -e on a machine that sets PYTHONDONTWRITEBYTECODE
        # (tox does) recompiles every module at every start: ~75 ms of a serve start, ~18 ms of a gen run.
        import compileall

        import virtsvc

        compileall.compile_dir(Path(virtsvc.__file__).parent, quiet=1)
        self.pb2, _ = compile_stubs(tmp / "stubs")
        pb2 = self.pb2
        self.static = Case(
            "static",
            SAY,
            pb2.SayRequest(name="alice", n=1, tenant="acme").SerializeToString(),
            pb2.SayReply(text="hello", n=1).SerializeToString(),
        )
        self.matched = Case(
            "matched",
            SAY,
            pb2.SayRequest(name="bob", n=1, tenant="acme").SerializeToString(),
            pb2.SayReply(text="hi bob", n=2).SerializeToString(),
        )
        self.stream = Case(
            "stream1000",
            STREAM,
            pb2.StreamRequest(count=STREAM_COUNT).SerializeToString(),
            pb2.SayReply(text="m").SerializeToString(),
            STREAM_COUNT,
        )
        self.bodies: dict[str, Path] = {}
        for case in (self.static, self.matched, self.stream):
            path = tmp / f"{case.name}.body"
            path.write_bytes(grpc_frame(case.request))
            self.bodies[case.name] = path
        if not SCENARIOS.exists():
            write_bench_yaml()
        from virtsvc.contracts.protoc import generate

        with contextlib.redirect_stdout(sys.stderr):  # its log line is not part of the figures
            generate(PROTOS, tmp / "generated")
        self.descriptors = tmp / "generated" / "descriptors.binpb"
        self.virtsvc_exe = _virtsvc_exe()
        self.serve_cmd, self.serve_kind = _serve_command(self.virtsvc_exe)

    def serve(self, *extra: str, descriptors: bool = True, scenarios: Sequence[Path] = ()) -> list[str]:
        source = ["--descriptors", str(self.descriptors)] if descriptors else ["--protos", str(PROTOS)]
        paths = [str(p) for p in (scenarios or [SCENARIOS])]
        return [*self.serve_cmd, *source, "--scenarios", *paths, "--host", "127.0.0.1", *extra]


def _virtsvc_exe() -> list[str]:
    beside = Path(sys.executable).parent / "virtsvc"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("virtsvc")
    return [found] if found else [sys.executable, "-m", "virtsvc.cli"]


def _serve_command(exe: list[str]) -> tuple[list[str], str]:
    """``virtsvc serve`` when this tree has it, else the bench's stand-in launcher."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run([*exe, "serve", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        if done.returncode == 0 and "--descriptors" in done.stdout:
            return [*exe, "serve", "--log-format", "json"], "virtsvc serve"
    return [
        sys.executable,
        str(BENCH / "serve_launcher.py"),
    ], "bench/serve_launcher.py (no `virtsvc serve` yet)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- grpc verification ---------------------------------------------------------------------------------


FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def verify(target: str, case: Case, metadata: Sequence[tuple[str, str]], pb2: ModuleType, who: str) -> None:
    """One call with a real grpc client: status OK and exactly the expected reply (or replies)."""
    expected = pb2.SayReply.FromString(case.reply)
    with grpc.insecure_channel(target) as channel:
        try:
            if case.path == STREAM:
                call = channel.unary_stream(case.path)
                got = [
                    pb2.SayReply.FromString(m)
                    for m in call(case.request, metadata=tuple(metadata), timeout=30)
                ]
            else:
                call = channel.unary_unary(case.path)
                got = [pb2.SayReply.FromString(call(case.request, metadata=tuple(metadata), timeout=30))]
        except grpc.RpcError as exc:
            raise BenchError(f"{who}, {case.name}: {_rpc_text(exc)}") from None
    if len(got) != case.replies_per_call or any(m != expected for m in got):
        shown = str(got[0]).replace("\n", " ") if got else "nothing"
        raise BenchError(
            f"{who}, {case.name}: expected {case.replies_per_call} x {{{str(expected).strip()}}}, "
            f"got {len(got)} messages, first {shown}"
        )


# -- load runs ---------------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under load and the metadata that selects the case's answer on it."""

    label: str
    server: Server
    scenario: str | None  # virtsvc's scenario header, None for the baselines

    def headers(self) -> dict[str, str]:
        h = {"content-type": "application/grpc", "te": "trailers"}
        if self.scenario:
            h[SCENARIO_HEADER] = self.scenario
        return h

    def metadata(self) -> list[tuple[str, str]]:
        return [(SCENARIO_HEADER, self.scenario)] if self.scenario else []


@dataclass
class Runs:
    """Repeated measurements of one (target, case)."""

    label: str
    case: str
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per call
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)

    def summary(self, per_call: int = 1) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "case": self.case,
            "runs": len(self.rps),
            "calls_per_s": median(self.rps),
            "calls_per_s_runs": [round(x, 1) for x in self.rps],
            "server_cpu_us_per_call": median(self.cpu_us),
        }
        if per_call > 1:
            out["messages_per_s"] = (median(self.rps) or 0) * per_call
            out["server_cpu_us_per_message"] = (median(self.cpu_us) or 0) / per_call
        if self.p99_us:
            out["p50_ms"] = (median(self.p50_us) or 0) / 1000
            out["p99_ms"] = (median(self.p99_us) or 0) / 1000
        return out


def load(
    env: Env,
    target: Target,
    case: Case,
    requests: int,
    clients: int = CLIENTS,
    streams: int = STREAMS,
    latencies: bool = False,
) -> H2Result:
    result = run_h2load(
        f"http://{target.server.target}{case.path}",
        env.bodies[case.name],
        target.headers(),
        requests=requests,
        clients=clients,
        streams=streams,
        server_pid=target.server.pid,
        log_latencies=latencies,
    )
    check_h2load(result, case.data_per_call, f"{target.label}, {case.name}")
    return result


def alternate(
    env: Env,
    pairs: Sequence[tuple[Target, Case]],
    repeats: int,
    requests: int,
    *,
    clients: int = CLIENTS,
    streams: int = STREAMS,
    latencies: bool = False,
    warmup: int = 0,
    progress: Callable[[str], None] = lambda s: None,
) -> list[Runs]:
    """Runs every (target, case) ``repeats`` times, round-robin; a warm-up run of each first."""
    runs = [Runs(t.label, c.name) for t, c in pairs]
    for target, case in pairs:
        if warmup:
            load(env, target, case, warmup, clients, streams)
    for r in range(repeats):
        for (target, case), out in zip(pairs, runs, strict=True):
            res = load(env, target, case, requests, clients, streams, latencies)
            out.rps.append(res.rps)
            if res.cpu_seconds is not None:
                out.cpu_us.append(res.cpu_seconds / res.requests * 1e6)
            if latencies:
                out.p50_us.append(percentile(res.latencies_us, 50) or 0.0)
                out.p99_us.append(percentile(res.latencies_us, 99) or 0.0)
        progress(f"round {r + 1}/{repeats}")
    return runs


def _rpc_text(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# -- parts ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, env: Env, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.env = env
        self.log = log
        self.results: dict[str, Any] = {}

    @contextlib.contextmanager
    def servers(self) -> Iterator[tuple[Server, Server, Server, Server]]:
        py = sys.executable
        with server_processes(
            [
                ("handwritten", [py, str(BENCH / "handwritten.py"), "--mode", "servicer"]),
                ("generic", [py, str(BENCH / "handwritten.py"), "--mode", "generic"]),
                ("virtsvc", self.env.serve("--port", "0")),
                # the same, with Prometheus metrics counted (and served, idle: nothing scrapes them)
                ("virtsvc-metrics", self.env.serve("--port", "0", "--metrics-port", "0")),
            ]
        ) as (hw, gen, vs, vm):
            yield hw, gen, vs, vm

    # 1-3: throughput, CPU per call, latency, streaming
    def throughput(self) -> None:
        cfg, env = self.cfg, self.env
        with self.servers() as (hw, gen, vs, vm):
            t_hw = Target("hand-written servicer", hw, None)
            t_gen = Target("generic handler, pre-serialised", gen, None)
            t_vs_static = Target("virtsvc serve, static", vs, "static")
            t_vm_static = Target("virtsvc serve --metrics-port, static", vm, "static")
            t_vs_matched = Target("virtsvc serve, matched", vs, "matched")
            t_vs_stream = Target("virtsvc serve, stream1000", vs, "stream1000")
            checks = [
                (t_hw, env.static),
                (t_gen, env.static),
                (t_vs_static, env.static),
                (t_vm_static, env.static),
                (t_hw, env.matched),
                (t_vs_matched, env.matched),
                (t_hw, env.stream),
                (t_gen, env.stream),
                (t_vs_stream, env.stream),
            ]
            for target, case in checks:
                verify(target.server.target, case, target.metadata(), env.pb2, target.label)
            self.log("verified every server with a grpc client (status OK, expected replies)")
            rss_vs0 = rss_bytes(vs.pid)

            self.log(f"unary, {CLIENTS} connections x {STREAMS} streams, {cfg.unary_requests:,} calls a run")
            unary = alternate(
                env,
                [
                    (t_hw, env.static),
                    (t_gen, env.static),
                    (t_vs_static, env.static),
                    (t_vm_static, env.static),
                    (t_hw, env.matched),
                    (t_vs_matched, env.matched),
                ],
                cfg.unary_repeats,
                cfg.unary_requests,
                warmup=cfg.warmup_requests,
                latencies=True,
                progress=self.log,
            )
            self.log(f"latency at concurrency 1 (h2load -c1 -m1), {cfg.c1_requests:,} calls a run")
            c1 = alternate(
                env,
                [(t_hw, env.static), (t_gen, env.static), (t_vs_static, env.static)],
                cfg.repeats,
                cfg.c1_requests,
                clients=1,
                streams=1,
                latencies=True,
                warmup=100,
                progress=self.log,
            )
            sc, sm = cfg.stream_shape
            self.log(
                f"server streaming, {STREAM_COUNT:,} messages a call, {sc} connections x {sm} streams, "
                f"{cfg.stream_requests} calls a run"
            )
            stream_targets = [t_hw, t_gen, t_vs_stream] if cfg.stream_generic else [t_hw, t_vs_stream]
            stream = alternate(
                env,
                [(t, env.stream) for t in stream_targets],
                cfg.repeats,
                cfg.stream_requests,
                clients=sc,
                streams=sm,
                warmup=sc * sm,
                progress=self.log,
            )
            shapes = ", ".join(f"c{p * t} = {p} processes x {t} threads" for p, t in cfg.py_shapes)
            self.log(f"latency with the multi-process grpc Python client ({shapes})")
            pyc = {}
            for target in (t_hw, t_vs_static):
                for procs, threads in cfg.py_shapes:
                    calls = cfg.py_calls_c1 if procs * threads == 1 else cfg.py_calls_c16
                    pyc[(target.label, procs * threads)] = self.pyclient(
                        target, env.static, procs, threads, calls
                    )
            rss_vs1 = rss_bytes(vs.pid)

        s_hw, s_gen, s_vs, s_vm, m_hw, m_vs = (r.summary() for r in unary)
        for s, base in ((s_gen, s_hw), (s_vs, s_hw), (s_vm, s_hw), (m_hw, m_hw), (m_vs, m_hw)):
            s["ratio"] = ratio(s["calls_per_s"], base["calls_per_s"])
            s["cpu_ratio"] = ratio(base["server_cpu_us_per_call"], s["server_cpu_us_per_call"])
        s_hw["ratio"] = s_hw["cpu_ratio"] = 1.0
        # what metrics cost the static reply: metrics on / off, same run
        s_vm["vs_metrics_off"] = ratio(s_vm["calls_per_s"], s_vs["calls_per_s"])
        s_vm["cpu_vs_metrics_off"] = ratio(s_vs["server_cpu_us_per_call"], s_vm["server_cpu_us_per_call"])
        lat = [r.summary() for r in c1]
        st = [r.summary(STREAM_COUNT) for r in stream]
        for s in st:
            s["ratio"] = ratio(s["messages_per_s"], st[0]["messages_per_s"])
        self.results["unary"] = {"static": [s_hw, s_gen, s_vs, s_vm], "matched": [m_hw, m_vs]}
        self.results["latency_c1_h2load"] = lat
        self.results["streaming"] = st
        self.results["latency_pyclient"] = [
            {"label": label, "concurrency": c, **{k: v for k, v in r.items() if k != "rounds"}}
            for (label, c), r in pyc.items()
        ]
        self.results["virtsvc_rss"] = {"after_start": rss_vs0, "after_load": rss_vs1}

    def pyclient(self, target: Target, case: Case, procs: int, threads: int, calls: int) -> dict[str, Any]:
        cmd = [
            sys.executable,
            str(BENCH / "pyclient.py"),
            "--target",
            target.server.target,
            "--method",
            case.path,
            "--body-hex",
            case.request.hex(),
            "--expect-hex",
            case.reply.hex(),
            "--procs",
            str(procs),
            "--threads",
            str(threads),
            "--calls",
            str(calls),
            "--seconds",
            str(self.cfg.py_seconds),
            "--rounds",
            str(self.cfg.repeats),
            "--warmup",
            "20",
        ]
        for key, value in target.metadata():
            cmd += ["--header", f"{key}={value}"]
        budget = self.cfg.repeats * (self.cfg.py_seconds + 30) + 120
        done = subprocess.run(
            pinned(cmd, LOAD_CORE),
            capture_output=True,
            text=True,
            timeout=budget,
            preexec_fn=preexec_for(LOAD_CORE),
            start_new_session=True,
        )
        if done.returncode != 0:
            raise BenchError(f"python client against {target.label} failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        if result["errors"] or result["wrong"]:
            raise BenchError(
                f"python client against {target.label}: {result['errors']} errors, {result['wrong']} wrong "
                f"replies (first: {result['first_error']})"
            )
        return result

    # 4: flat in size
    def scale(self) -> None:
        cfg, env = self.cfg, self.env
        tree = env.tmp / "scale"
        fillers = cfg.scale_scenarios - 3  # bench.yaml holds 3 scenarios of 1 rule each
        n_scen, n_rules = write_scale_tree(tree, fillers, cfg.scale_rules - 3)
        n_scen, n_rules = n_scen + 3, n_rules + 3
        self.log(f"size: {n_scen:,} scenarios, {n_rules:,} rules, {cfg.scale_sessions:,} sessions")
        big_cmd = env.serve("--port", "0", scenarios=[SCENARIOS, tree])
        others = [("virtsvc-small", env.serve("--port", "0"))]
        if cfg.scale_gc_defaults:
            # The same scenarios served by the bench launcher, which leaves the cyclic GC at Python's defaults
            # (no frozen heap, young generation at 700): what virtsvc serve's collector settings save.
            plain = [sys.executable, str(BENCH / "serve_launcher.py"), "--descriptors", str(env.descriptors),
                     "--scenarios", str(SCENARIOS), str(tree), "--port", "0"]  # fmt: skip
            others.append(("virtsvc-big-gc-defaults", plain))
        with server_process("virtsvc-big", big_cmd, timeout=cfg.scale_timeout) as big:
            load_s = big.announced - big.started  # alone on its core: the others start after
            self.log(f"the big server loaded its scenarios in {load_s:.1f}s")
            rss0 = rss_bytes(big.pid)
            with server_processes(others, timeout=cfg.scale_timeout) as started:
                targets = [
                    Target("virtsvc, bench.yaml only", started[0], "static"),
                    Target(f"virtsvc, {n_scen:,} scenarios", big, "static"),
                ]
                if cfg.scale_gc_defaults:
                    targets.append(Target("  same, the GC at Python's defaults", started[1], "static"))
                for t in targets:
                    verify(t.server.target, env.static, t.metadata(), env.pb2, t.label)
                t0 = time.perf_counter()
                self.sessions(big.target, cfg.scale_sessions, fillers)
                warm_s = time.perf_counter() - t0
                rss1 = rss_bytes(big.pid)
                self.log(f"{cfg.scale_sessions:,} sessions created in {warm_s:.1f}s")
                for t in targets[2:]:
                    self.sessions(t.server.target, cfg.scale_sessions, fillers)
                runs = alternate(
                    env,
                    [(t, env.static) for t in targets],
                    cfg.repeats,
                    cfg.unary_requests,
                    warmup=cfg.warmup_requests,
                    progress=self.log,
                )
        summaries = [r.summary() for r in runs]
        small_s = summaries[0]
        for s in summaries:
            s["ratio"] = ratio(s["calls_per_s"], small_s["calls_per_s"])
            s["cpu_ratio"] = ratio(small_s["server_cpu_us_per_call"], s["server_cpu_us_per_call"])
        self.results["scale"] = {
            "scenarios": n_scen,
            "rules": n_rules,
            "sessions": cfg.scale_sessions,
            "load_seconds": load_s,
            "sessions_seconds": warm_s,
            "rss_loaded": rss0,
            "rss_with_sessions": rss1,
            "runs": summaries,
        }

    def sessions(self, target: str, count: int, fillers: int) -> None:
        """``count`` calls with distinct session ids, spread over the filler scenarios; 64 in flight."""
        request = self.env.static.request
        budget = max(60.0, count / 50)
        deadline = time.monotonic() + budget
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(SAY)
            pending: list[Any] = []

            def settle(keep: int) -> None:
                while len(pending) > keep:
                    fut = pending.pop(0)
                    try:
                        if not fut.result(timeout=30):
                            raise BenchError("a session warm-up call got an empty reply")
                    except grpc.RpcError as exc:
                        raise BenchError(f"session warm-up call failed: {_rpc_text(exc)}") from None

            for i in range(count):
                if time.monotonic() > deadline:
                    raise BenchError(f"creating {count:,} sessions took over {budget:.0f}s")
                metadata = ((SCENARIO_HEADER, filler_name(i % fillers)), (SESSION_HEADER, f"sess-{i:06d}"))
                pending.append(call.future(request, metadata=metadata, timeout=30))
                settle(64)
            settle(0)

    # 5: start-up
    def startup(self) -> None:
        cfg, env = self.cfg, self.env
        out: dict[str, Any] = {}
        shared_cache = env.tmp / "xdg-warm"
        for label, descriptors, cache in (
            ("descriptors", True, None),
            ("protos_cold_cache", False, "fresh"),
            ("protos_warm_cache", False, "warm"),
        ):
            times, announced = [], []
            if cache == "warm":  # prime the cache once, unmeasured
                self.spawn_until_answer(
                    env.serve("--port", str(_free_port()), descriptors=False), shared_cache
                )
            for i in range(cfg.startup_repeats):
                xdg = env.tmp / f"xdg-{label}-{i}" if cache == "fresh" else shared_cache
                t, a = self.spawn_until_answer(
                    env.serve("--port", str(_free_port()), descriptors=descriptors), xdg
                )
                times.append(t)
                announced.append(a)
            out[label] = {"ready_s": median(times), "serving_line_s": median(announced), "runs": times}
            self.log(f"start-up, {label}: {median(times):.2f}s to the first answer")
        probe = [sys.executable, str(BENCH / "probes.py")]
        common = ["--descriptors", str(env.descriptors), "--scenarios", str(SCENARIOS)]
        inproc = [
            self.probe([*probe, "startup", *common, "--repeats", "5"]) for _ in range(cfg.startup_repeats)
        ]
        out["in_process"] = {
            "cold_s": median([r["cold_s"] for r in inproc]),
            "warm_s": median([r["warm_s"] for r in inproc]),
            "scenarios_load_s": median([r["scenarios_s"] for r in inproc]),
            "catalog_load_s": median([r["catalog_s"] for r in inproc]),
        }
        out["session_rules"] = self.probe([*probe, "session", *common, "--repeats", str(cfg.session_repeats)])
        self.results["startup"] = out

    def spawn_until_answer(self, cmd: list[str], xdg: Path | None) -> tuple[float, float]:
        """Seconds from spawn to the first OK answer, and to the serving line."""
        env_vars = dict(os.environ)
        if xdg is not None:
            xdg.mkdir(parents=True, exist_ok=True)
            env_vars["XDG_CACHE_HOME"] = str(xdg)
        port = int(cmd[cmd.index("--port") + 1])
        logdir = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=self.env.tmp))
        stdout = logdir / "out"
        t0 = time.perf_counter()
        with open(stdout, "wb") as out, open(logdir / "err", "wb") as err:
            proc = subprocess.Popen(
                pinned(cmd, SERVER_CORE),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env_vars,
                start_new_session=True,
                cwd=ROOT,
                preexec_fn=preexec_for(SERVER_CORE),
            )
        # As a supervisor would: wait for the serving line, then dial. (A client dialling from the spawn is
        # refused until the port opens and then waits out its reconnect backoff: that measures the client.)
        announced = None
        try:
            while announced is None:
                if b'"serving"' in stdout.read_bytes():
                    announced = time.perf_counter() - t0
                elif proc.poll() is not None:
                    raise BenchError(
                        f"start-up: the server exited ({proc.returncode}): {' '.join(cmd)}\n"
                        + (logdir / "err").read_text()[-2000:]
                    )
                elif time.perf_counter() - t0 > 120:
                    raise BenchError(f"start-up: no serving line within 120s: {' '.join(cmd)}")
                else:
                    time.sleep(0.001)
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
                call = channel.unary_unary(SAY)
                try:
                    call(self.env.static.request, metadata=((SCENARIO_HEADER, "static"),), timeout=10)
                except grpc.RpcError as exc:
                    raise BenchError(f"start-up: the first call failed: {_rpc_text(exc)}") from None
                ready = time.perf_counter() - t0
        finally:
            stop_process(proc)
        return ready, announced if announced is not None else ready

    def probe(self, cmd: list[str], timeout: float = 900.0) -> dict[str, Any]:
        done = subprocess.run(
            pinned(cmd, SERVER_CORE),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            preexec_fn=preexec_for(SERVER_CORE),
            start_new_session=True,
        )
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd[1:4])} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    # 6: virtsvc gen
    def gen(self) -> None:
        cfg, env = self.cfg, self.env
        tree = env.tmp / "gen-tree"
        files = write_proto_tree(tree, cfg.gen_protos)

        def timed(cmd: list[str]) -> float:
            t0 = time.perf_counter()
            done = subprocess.run(
                pinned(cmd, SERVER_CORE),
                capture_output=True,
                text=True,
                timeout=600,
                cwd=env.tmp,
                preexec_fn=preexec_for(SERVER_CORE),
            )
            if done.returncode != 0:
                raise BenchError(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            return time.perf_counter() - t0

        gen = [*env.virtsvc_exe, "gen", str(tree), "-o"]
        cold, noop, protoc = [], [], []
        for i in range(cfg.gen_repeats):
            out = env.tmp / f"gen-out-{i}"
            cold.append(timed([*gen, str(out)]))
            noop.append(timed([*gen, str(out)]))
            plain = env.tmp / f"protoc-out-{i}"
            plain.mkdir()
            protoc.append(
                timed(
                    [
                        sys.executable,
                        "-m",
                        "grpc_tools.protoc",
                        f"-I{tree}",
                        f"--python_out={plain}",
                        f"--pyi_out={plain}",
                        f"--grpc_python_out={plain}",
                        f"--descriptor_set_out={plain / 'd.binpb'}",
                        "--include_imports",
                        "--include_source_info",
                        *(str(f.relative_to(tree)) for f in files),
                    ]
                )
            )
        self.results["gen"] = {
            "protos": len(files),
            "cold_s": median(cold),
            "noop_s": median(noop),
            "protoc_s": median(protoc),
            "cold_ratio": ratio(median(cold), median(protoc)),
            "noop_ratio": ratio(median(noop), median(protoc)),
        }
        self.log(f"gen: cold {median(cold):.2f}s, no-op {median(noop):.2f}s, protoc {median(protoc):.2f}s")

    # 7: memory
    def memory(self) -> None:
        env = self.env
        runs = []
        for sessions, journal in self.cfg.memory_runs:
            self.log(f"memory: {sessions:,} sessions x {journal} journal entries")
            runs.append(
                self.probe(
                    [
                        sys.executable,
                        str(BENCH / "probes.py"),
                        "memory",
                        "--descriptors",
                        str(env.descriptors),
                        "--scenarios",
                        str(SCENARIOS),
                        "--sessions",
                        str(sessions),
                        "--journal-size",
                        str(journal),
                    ]
                )
            )
        # Each figure from the run that measures it best: per entry from the most entries, per session
        # from the most sessions (a few thousand sessions' RSS is within the allocator's granularity).
        measured = [r for r in runs if not r["capped"]] or runs
        b_entry = max(measured, key=lambda r: (r["entries"], r["journal_size"]))["bytes_per_entry"] or 0.0
        b_session = max(measured, key=lambda r: r["sessions"])["bytes_per_session"] or 0.0
        bound = runs[0]["max_entries"]
        self.results["memory"] = {
            "runs": runs,
            "formula": (
                "RSS ≈ base + live_sessions x B_session"
                " + min(live_sessions x journal_size, max_entries) x B_entry"
            ),
            "max_entries": bound,
            "bytes_per_entry": b_entry,
            "bytes_per_session": b_session,
            "default_10k_sessions_500_entries_bytes": 10_000 * b_session + min(10_000 * 500, bound) * b_entry,
        }

    # where virtsvc's own time goes, without grpc: its handlers called directly
    def handler(self) -> None:
        calls = 3_000 if self.cfg.quick else 20_000
        self.log(f"virtsvc's handlers called directly (no grpc), {calls:,} calls a case")
        self.results["handler"] = self.probe(
            [
                sys.executable,
                str(BENCH / "probes.py"),
                "handler",
                "--descriptors",
                str(self.env.descriptors),
                "--scenarios",
                str(SCENARIOS),
                "--calls",
                str(calls),
            ]
        )
        self.handler_in_server()

    def handler_in_server(self) -> None:
        """The same handlers' thread CPU time per call inside ``virtsvc serve`` under the unary load."""
        cfg, env = self.cfg, self.env
        self.log("virtsvc's handler timed inside the loaded server (bench/timed_serve.py)")
        serve = env.serve("--port", "0")
        cmd = [sys.executable, str(BENCH / "timed_serve.py"), *serve[serve.index("serve") + 1 :]]
        out: dict[str, Any] = {}
        with server_process("virtsvc-timed", cmd) as vs:
            stdout = vs.logdir / f"{vs.name}.out"
            for case in (env.static, env.matched):
                target = Target("virtsvc (timed)", vs, case.name)
                verify(vs.target, case, target.metadata(), env.pb2, target.label)
                load(env, target, case, cfg.warmup_requests)
                runs: list[dict[str, Any]] = []
                for _ in range(cfg.repeats):
                    _handler_report(vs, stdout)  # reset
                    res = load(env, target, case, cfg.unary_requests)
                    report = _handler_report(vs, stdout)
                    report["server_cpu_us_per_call"] = (res.cpu_seconds or 0) / res.requests * 1e6
                    runs.append(report)
                out[case.name] = {
                    "cpu_us_per_call": median([r["cpu_us_per_call"] for r in runs]),
                    "wall_us_per_call": median([r["wall_us_per_call"] for r in runs]),
                    "server_cpu_us_per_call": median([r["server_cpu_us_per_call"] for r in runs]),
                    "clock_us": runs[-1]["clock_us"],
                    "runs": runs,
                }
        self.results["handler_in_server"] = out

    # py-spy
    def profile(self) -> None:
        """py-spy on virtsvc serve under the static load, then under the matched load."""
        spy = shutil.which("py-spy")
        if spy is None:
            self.results["profile"] = {
                "available": False,
                "reason": "py-spy not installed (pip install py-spy)",
            }
            return
        out: dict[str, Any] = {"available": True}
        with server_process("virtsvc-profiled", self.env.serve("--port", "0")) as vs:
            for case in (self.env.static, self.env.matched):
                self.log(
                    f"profiling virtsvc serve under the {case.name} load for {self.cfg.profile_seconds}s"
                )
                out[case.name] = self.profile_one(spy, Target("virtsvc", vs, case.name), case)
        self.results["profile"] = out

    def profile_one(self, spy: str, target: Target, case: Case) -> dict[str, Any]:
        env, seconds, vs = self.env, self.cfg.profile_seconds, target.server
        verify(vs.target, case, target.metadata(), env.pb2, "virtsvc (profiled)")
        load(env, target, case, self.cfg.warmup_requests)
        raw = env.tmp / f"profile-{case.name}.txt"
        cmd = [
            h2load_path(),
            "-n",
            "10000000",
            "-c",
            str(CLIENTS),
            "-m",
            str(STREAMS),
            "-D",
            str(seconds + 3),
            "-d",
            str(env.bodies[case.name]),
        ]
        for k, v in target.headers().items():
            cmd += ["-H", f"{k}: {v}"]
        cmd.append(f"http://{vs.target}{case.path}")
        h2 = subprocess.Popen(
            pinned(cmd, LOAD_CORE),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec_for(LOAD_CORE),
        )
        try:
            time.sleep(1.0)
            cpu0 = cpu_seconds(vs.pid)
            # --gil: samples of the thread holding the GIL, i.e. where the server's Python time goes.
            done = subprocess.run(
                pinned(
                    [
                        spy,
                        "record",
                        "-d",
                        str(seconds),
                        "-r",
                        "250",
                        "--gil",
                        "--nonblocking",
                        "-f",
                        "raw",
                        "-o",
                        str(raw),
                        "-p",
                        str(vs.pid),
                    ],
                    LOAD_CORE,
                ),
                capture_output=True,
                text=True,
                timeout=seconds + 60,
                preexec_fn=preexec_for(LOAD_CORE),
            )
            cpu1 = cpu_seconds(vs.pid)
        finally:
            stop_process(h2, grace=2)
        if done.returncode != 0 or not raw.exists():
            raise BenchError(f"py-spy failed ({done.returncode}): {done.stderr[-500:]}")
        return {"seconds": seconds, "server_cpu_s": cpu1 - cpu0, **summarise_profile(raw.read_text())}


def _handler_report(server: Server, stdout: Path, timeout: float = 10.0) -> dict[str, Any]:
    """Asks bench/timed_serve.py for its totals since the last ask (SIGUSR1) and reads its JSON line."""
    before = stdout.read_text().count('"handler_cpu"') if stdout.exists() else 0
    os.kill(server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [ln for ln in stdout.read_text().splitlines() if '"handler_cpu"' in ln]
        if len(lines) > before:
            return json.loads(lines[-1])
        time.sleep(0.01)
    raise BenchError(f"{server.name} did not report its handler time within {timeout:.0f}s")


def summarise_profile(text: str, top: int = 12) -> dict[str, Any]:
    """From py-spy's raw (collapsed) output: top frames by own and by inclusive samples, the share of each
    package in own samples, and the top virtsvc frames (inclusive)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    packages: dict[str, int] = {}
    in_virtsvc = 0
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        leaf, leaf_package = frames[-1]
        own[leaf] = own.get(leaf, 0) + count
        packages[leaf_package] = packages.get(leaf_package, 0) + count
        for name in {name for name, _ in frames}:
            incl[name] = incl.get(name, 0) + count
        if any(package == "virtsvc" for _, package in frames):
            in_virtsvc += count

    def ranked(d: dict[str, int], keep: Callable[[str], bool] = lambda k: True) -> list[dict[str, Any]]:
        items = sorted(((k, v) for k, v in d.items() if keep(k)), key=lambda kv: -kv[1])[:top]
        return [{"frame": k, "share": v / total} for k, v in items]

    return {
        "samples": total,
        "own": ranked(own),
        "inclusive": ranked(incl),
        "own_by_package": {k: v / total for k, v in sorted(packages.items(), key=lambda kv: -kv[1])},
        "virtsvc_inclusive": in_virtsvc / total if total else 0.0,
        "virtsvc_frames": ranked(incl, lambda k: "(virtsvc/" in k),
    }


def _frame(frame: str) -> tuple[str, str]:
    """``fn (path/to/module.py:123)`` -> (``fn (dir/module.py)``, package): one function's samples add up."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(where).parts
    if "virtsvc" in parts:
        package = "virtsvc"
    elif "grpc" in parts:
        package = "grpc"
    elif "protobuf" in parts:
        package = "protobuf"
    elif "site-packages" in parts:
        package = parts[parts.index("site-packages") + 1] if parts[-1] != "site-packages" else "other"
    elif where:
        package = "stdlib (threading, queue, concurrent.futures...)"
    else:
        package = "other"
    short = "/".join(parts[-2:]) if package in ("virtsvc", "grpc") else Path(where).name
    return (f"{name} ({short})" if where else name), package


def write_proto_tree(root: Path, count: int) -> list[Path]:
    """``count`` small .proto files: one shared types file and services that import it."""
    files = []
    common = root / "acme" / "common" / "v1" / "types.proto"
    common.parent.mkdir(parents=True, exist_ok=True)
    common.write_text(
        'syntax = "proto3";\npackage acme.common.v1;\n'
        "message Money { string currency = 1; int64 units = 2; int32 nanos = 3; }\n"
        "message Page { int32 size = 1; string token = 2; }\n"
    )
    files.append(common)
    for i in range(count - 1):
        pkg = f"acme.svc{i:03d}.v1"
        path = root / "acme" / f"svc{i:03d}" / "v1" / f"svc{i:03d}.proto"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f'syntax = "proto3";\npackage {pkg};\nimport "acme/common/v1/types.proto";\n'
            f"message Item{i} {{ string id = 1; string name = 2; acme.common.v1.Money price = 3; }}\n"
            f"message GetRequest{i} {{ string id = 1; }}\n"
            f"message ListRequest{i} {{ acme.common.v1.Page page = 1; }}\n"
            f"message ListReply{i} {{ repeated Item{i} items = 1; string next = 2; }}\n"
            f"service Service{i} {{\n  rpc Get(GetRequest{i}) returns (Item{i});\n"
            f"  rpc List(ListRequest{i}) returns (stream ListReply{i});\n}}\n"
        )
        files.append(path)
    return files


# -- output --------------------------------------------------------------------------------------------


def _n(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:,.1f} ms"


def _mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines: list[str] = []
    w = lines.append
    w(f"virtsvc benchmark ({meta['mode']}) - {meta['machine']}")
    unary = meta.get("unary_repeats", meta["repeats"])
    unary_runs = f" ({unary} for unary throughput)" if unary != meta["repeats"] else ""
    w(
        f"  server on core {SERVER_CORE}, load on core {LOAD_CORE} (pinning: {meta['pinning']}); "
        f"h2load over {meta['protocol']}, {CLIENTS} connections x {STREAMS} streams; "
        f"medians of {meta['repeats']} runs{unary_runs}, runs alternating between the servers compared"
    )
    w(f"  virtsvc {meta['virtsvc']} via {meta['serve']}; grpcio {meta['grpcio']}, Python {meta['python']}")
    w(
        f"  {meta['date']}; load average {meta['loadavg_at_start']} at the start, "
        f"{meta.get('loadavg_at_end', '?')} at the end"
    )
    busy = float(meta["loadavg_at_start"].split()[0]) if meta["loadavg_at_start"] != "?" else 0.0
    if busy > 1.0:
        w("  NOTE: the machine was busy when the run started: absolute figures are low, ratios still hold")
    if "unary" in results:
        w("")
        w(
            f"{'Unary calls (h2load 4x16)':<46}{'calls/s':>9}{'ratio':>7}{'CPU µs/call':>12}{'CPU ratio':>10}"
            f"{'p50':>9}{'p99':>9}"
        )
        rows = [*results["unary"]["static"], *results["unary"]["matched"]]
        names = [
            "hand-written servicer, static",
            "generic handler, pre-serialised bytes",
            "virtsvc serve, static reply (journal on)",
            "  same, --metrics-port (metrics counted)",
            "hand-written servicer, 2 fields + format",
            "virtsvc serve, matched 2 fields + template",
        ]
        for name, r in zip(names, rows, strict=True):
            w(
                f"  {name:<44}{_n(r['calls_per_s']):>9}{_x(r['ratio']):>7}"
                f"{_n(r['server_cpu_us_per_call']):>12}{_x(r['cpu_ratio']):>10}"
                f"{r['p50_ms']:>7.2f}ms{r['p99_ms']:>7.2f}ms"
            )
        w("  (ratio: throughput / the hand-written servicer's for the same work; matched rows compare with")
        w("   the hand-written matched row. CPU ratio: its CPU per call / this one's, below 1 = more CPU")
        w("   per call. p50/p99: h2load's per-request times at this load, medians of the runs)")
        on = results["unary"]["static"][3]
        if on.get("vs_metrics_off") is not None:
            w(
                f"  metrics on / off, static reply: throughput {on['vs_metrics_off']:.3f}x, "
                f"CPU per call ratio {on['cpu_vs_metrics_off']:.3f}x (below 1 = more CPU with metrics)"
            )
    if "latency_c1_h2load" in results:
        w("")
        w(f"{'Latency at concurrency 1 (h2load -c1 -m1)':<52}{'calls/s':>10}{'p50':>10}{'p99':>10}")
        for r in results["latency_c1_h2load"]:
            w(f"  {r['label']:<50}{_n(r['calls_per_s']):>10}{r['p50_ms']:>8.2f}ms{r['p99_ms']:>8.2f}ms")
    if "latency_pyclient" in results:
        w("")
        w(f"{'Latency, multi-process grpc Python client':<52}{'calls/s':>10}{'p50':>10}{'p99':>10}")
        for r in results["latency_pyclient"]:
            name = f"{r['label']}, c{r['concurrency']}"
            w(f"  {name:<50}{_n(r['rate']):>10}{r['p50_us'] / 1000:>8.2f}ms{r['p99_us'] / 1000:>8.2f}ms")
    if "streaming" in results:
        w("")
        shape = results["meta"]["config"]["stream_shape"]
        title = f"Server streaming, 1,000 messages a call, {shape[0]}x{shape[1]}"
        w(f"{title:<52}{'msgs/s':>10}{'ratio':>8}{'CPU µs/msg':>13}")
        for r in results["streaming"]:
            w(
                f"  {r['label']:<50}{_n(r['messages_per_s']):>10}{_x(r['ratio']):>8}"
                f"{_n(r['server_cpu_us_per_message'], 1):>13}"
            )
    if "scale" in results:
        s = results["scale"]
        w("")
        w(
            f"Flat in size: {s['scenarios']:,} scenarios, {s['rules']:,} rules, "
            f"{s['sessions']:,} live sessions"
        )
        w(f"{'':<52}{'calls/s':>10}{'ratio':>8}{'CPU µs/call':>13}{'CPU ratio':>11}")
        for r in s["runs"]:
            w(
                f"  {r['label']:<50}{_n(r['calls_per_s']):>10}{_x(r['ratio']):>8}"
                f"{_n(r['server_cpu_us_per_call']):>13}{_x(r['cpu_ratio']):>11}"
            )
        w(
            f"  loading them: {s['load_seconds']:.1f} s to serving, RSS {_mib(s['rss_loaded'])}; "
            f"with the sessions: RSS {_mib(s['rss_with_sessions'])}"
        )
    if "startup" in results:
        s = results["startup"]
        w("")
        w("Start-up (spawn to the first answered call)")
        w(f"  virtsvc serve --descriptors (precompiled)          {_ms(s['descriptors']['ready_s']):>12}")
        w(
            f"  virtsvc serve --protos, cold cache (compiles)      "
            f"{_ms(s['protos_cold_cache']['ready_s']):>12}"
        )
        w(
            f"  virtsvc serve --protos, warm cache                 "
            f"{_ms(s['protos_warm_cache']['ready_s']):>12}"
        )
        ip = s["in_process"]
        w(
            f"  in-process VirtualServer(...).start() to an answer {_ms(ip['warm_s']):>12}  "
            f"(first in a process {_ms(ip['cold_s'])})"
        )
        sr = s["session_rules"]
        if sr.get("available"):
            w(
                f"  per-test session, 5 inline rules compiled + set   {sr['median_ms']:>9.2f} ms  "
                f"(p99 {sr['p99_ms']:.2f} ms)"
            )
        else:
            w(f"  per-test session, 5 inline rules                          n/a  ({sr.get('reason')})")
    if "gen" in results:
        g = results["gen"]
        w("")
        w(f"virtsvc gen on {g['protos']} protos (whole command, interpreter start included)")
        w(f"  cold (fresh output)          {_ms(g['cold_s']):>12}   {_x(g['cold_ratio'])} of plain protoc")
        w(f"  no-op (nothing changed)      {_ms(g['noop_s']):>12}   {_x(g['noop_ratio'])} of plain protoc")
        w(
            f"  python -m grpc_tools.protoc  {_ms(g['protoc_s']):>12}   "
            "(same outputs: py, pyi, grpc, descriptor set)"
        )
    if "memory" in results:
        m = results["memory"]
        w("")
        first = m["runs"][0]
        w(
            f"Memory: sessions with full journals (static reply, {first['request_bytes']}-byte request, "
            f"{first['metadata_pairs']} metadata pairs)"
        )
        for r in m["runs"]:
            if r["capped"]:
                figures = f"{r['entries']:,} entries kept (the bound: {r['max_entries']:,})"
            else:
                figures = f"{r['bytes_per_entry']:,.0f} B/entry, {r['bytes_per_session']:,.0f} B/session"
            w(
                f"  {r['sessions']:>6,} sessions x {r['journal_size']:>3} entries: "
                f"RSS +{_mib(r['rss_delta'])}, {figures}; "
                f"one more round: {(r['rss_one_more_round'] - r['rss_full']) / 2**20:+.1f} MiB"
            )
        w(f"  bound: {m['formula']}")
        b_e, b_s = m["bytes_per_entry"], m["bytes_per_session"]
        w(
            f"         with B_entry ≈ {b_e:,.0f} B, B_session ≈ {b_s:,.0f} B, "
            f"max_entries {m['max_entries']:,} (journal_size default 500)"
        )
        w(
            f"  at the defaults (journal 500) 10,000 sessions -> about "
            f"{_mib(m['default_10k_sessions_500_entries_bytes'])}"
        )
    if "handler" in results:
        h = results["handler"]
        w("")
        w("virtsvc's own code per call (its grpc handler called directly: no grpc, no network; CPU time)")
        for name, r in h.items():
            unit = (
                f"{r['us_per_message']:.2f} µs/message"
                if name.startswith("stream")
                else f"{r['us_per_call']:.1f} µs/call"
            )
            split = ", ".join(f"{k} {v * 100:.0f}%" for k, v in r["by_package"].items() if v >= 0.02)
            w(f"  {name:<12}{unit:>18}   ({split})")
        w(
            "  top functions of the matched case (own time): "
            + "; ".join(
                f"{f['function'].split(' (')[0]} {f['share'] * 100:.0f}%" for f in h["matched"]["top_own"][:5]
            )
        )
        w("  (compare: the server's CPU per call under load in the unary table above)")
    if "handler_in_server" in results:
        hs = results["handler_in_server"]
        w("")
        w("virtsvc's own code per call inside the loaded server (thread CPU time around its unary handler,")
        w("h2load 4x16; caches shared with grpc's own per-call work, so several times the direct figure)")
        for name, r in hs.items():
            share = r["cpu_us_per_call"] / r["server_cpu_us_per_call"] if r["server_cpu_us_per_call"] else 0
            w(
                f"  {name:<12}{r['cpu_us_per_call']:>8.1f} µs/call of the server's "
                f"{r['server_cpu_us_per_call']:.0f} µs ({share * 100:.0f}%; "
                f"clock reads {r['clock_us']:.2f} µs)"
            )
    if results.get("profile", {}).get("available"):
        for name in ("static", "matched"):
            p = results["profile"].get(name)
            if not p:
                continue
            w("")
            w(
                f"Profile of virtsvc serve under the {name} load (py-spy --gil, {p['seconds']} s: "
                f"{p['samples']:,} samples of the thread holding the GIL)"
            )
            w(
                "  own samples by package: "
                + ", ".join(f"{k} {v * 100:.0f}%" for k, v in p["own_by_package"].items())
            )
            w(f"  samples with a virtsvc frame on the stack: {p['virtsvc_inclusive'] * 100:.0f}%")
            w("  top frames, own samples:")
            for f in p["own"][:8]:
                w(f"    {f['share'] * 100:5.1f}%  {f['frame']}")
            w("  top virtsvc frames, inclusive:")
            for f in p["virtsvc_frames"][:8]:
                w(f"    {f['share'] * 100:5.1f}%  {f['frame']}")
        w("  (py-spy's GIL-holder attribution is approximate with 64 threads and understates short handler")
        w("   work; virtsvc's own cost per call is measured exactly in the table above it)")
    elif "profile" in results:
        w("")
        w(f"Profile: n/a ({results['profile'].get('reason')})")
    w("")
    w("npm peers: reported, not measured here (their published figures, another machine)")
    for name, rate in PEERS:
        w(f"  {name:<50}{rate:>10,} calls/s")
    w("  the targets' own grpcio figures, on their machine (reported, not measured here):")
    for k, v in ISSUE_FIGURES.items():
        w(f"    {k}: {v}")
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def meta(cfg: Config, env: Env | None) -> dict[str, Any]:
    import google.protobuf

    import virtsvc

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    )
    h2 = subprocess.run([h2load_path(), "--version"], capture_output=True, text=True)
    return {
        "mode": "quick" if cfg.quick else "full",
        "loadavg_at_start": _loadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{cores()} cores ({model}), {mem:.0f} GiB, {platform.system()} {platform.release()}",
        "pinning": pinning(),
        "protocol": "h2c",
        "repeats": cfg.repeats,
        "unary_repeats": cfg.unary_repeats,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "h2load": h2.stdout.strip(),
        "virtsvc": f"{virtsvc.__version__} ({commit.stdout.strip() or 'no git'})",
        "serve": env.serve_kind if env else "?",
        "config": asdict(cfg),
    }


# -- main ----------------------------------------------------------------------------------------------

PARTS = ("throughput", "scale", "startup", "gen", "memory", "handler", "profile")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="under a minute: short runs, small size figures")
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"exit 1 when virtsvc's static throughput < {CHECK_THRESHOLD}x the hand-written "
        "servicer's (default: on with --quick)",
    )
    parser.add_argument(
        "--check-floor",
        type=float,
        default=CHECK_THRESHOLD,
        help=f"the check's floor (default {CHECK_THRESHOLD}); another value only to try the check itself",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile virtsvc serve under load with py-spy (default: on in full mode if installed)",
    )
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="the JSON results file")
    args = parser.parse_args(argv)
    exit_on_sigterm()

    cfg = Config.for_mode(args.quick)
    if args.repeats is not None:
        cfg.repeats = cfg.unary_repeats = max(1, args.repeats)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    check = args.check if args.check is not None else cfg.quick
    profile = (
        args.profile if args.profile is not None else (not cfg.quick and shutil.which("py-spy") is not None)
    )
    if not profile and "profile" in parts:
        parts.remove("profile")
    if check and "throughput" not in parts:
        parser.error("--check needs the throughput part")

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if pinning() != "none":
        os.sched_setaffinity(0, {LOAD_CORE})  # this process and its clients stay off the server's core
    else:
        log(
            f"only {cores()} core(s) usable: server and load share them (ratios still compare like with like)"
        )
    errors: list[str] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="virtsvc-bench-") as tmp:
        try:
            env: Env | None = Env(Path(tmp))
        except Exception as exc:  # the set-up failing is reported like any step that cannot be measured
            env = None
            errors.append(f"set-up: {type(exc).__name__}: {exc}")
        results["meta"] = meta(cfg, env)
        if env is not None:
            bench = Bench(cfg, env, log)
            for part in parts:
                log(f"-- {part}")
                try:
                    getattr(bench, part)()
                except Exception as exc:  # one part failing must not lose the others' figures
                    if not isinstance(exc, BenchError):
                        traceback.print_exc()
                    errors.append(f"{part}: {type(exc).__name__}: {exc}")
                    log(f"{part} FAILED: {exc}")
            results.update(bench.results)
            if check and "unary" in results and not errors:
                ok = judge(bench, results, args.check_floor)
                results["check"] = ok
    results["errors"] = errors
    results["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    results["meta"]["loadavg_at_end"] = _loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(f"\n(results: {args.out}; {results['meta']['seconds']:.0f} s in all)")
    if errors:
        for e in errors:
            print(f"BENCH ERROR: {e}")
        return 2
    if "check" in results:
        print(results["check"]["line"])
        return 0 if results["check"]["passed"] else 1
    return 0


def judge(bench: Bench, results: dict[str, Any], floor: float = CHECK_THRESHOLD) -> dict[str, Any]:
    """The gross-regression check; a failing first verdict is re-measured once before it stands."""
    hw, _, vs, _ = results["unary"]["static"]
    value = vs["ratio"]
    remeasured = False
    if value is None or value < floor:
        bench.log(f"static ratio {_x(value)} is below {floor}x: measuring that pair again")
        remeasured = True
        with bench.servers() as (s_hw, _, s_vs, _):
            runs = alternate(
                bench.env,
                [
                    (Target("hand-written servicer", s_hw, None), bench.env.static),
                    (Target("virtsvc serve, static", s_vs, "static"), bench.env.static),
                ],
                bench.cfg.unary_repeats,
                bench.cfg.unary_requests,
                warmup=bench.cfg.warmup_requests,
            )
        hw_all = [*hw["calls_per_s_runs"], *runs[0].rps]
        vs_all = [*vs["calls_per_s_runs"], *runs[1].rps]
        value = ratio(statistics.median(vs_all), statistics.median(hw_all))
    passed = value is not None and value >= floor
    verdict = "passed" if passed else "FAILED"
    line = (
        f"check {verdict}: virtsvc serve's static-reply throughput is {_x(value)} "
        "the hand-written servicer's "
        f"in this run ({'>=' if passed else 'below'} the {floor}x gross-regression floor"
        + (", after measuring again)" if remeasured else ")")
    )
    return {
        "passed": passed,
        "ratio": value,
        "threshold": floor,
        "remeasured": remeasured,
        "line": line,
    }


if __name__ == "__main__":
    sys.exit(main())
