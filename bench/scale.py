"""Scale-out: calls/s and CPU per call of a stateful call, by store and by number of workers.

    python bench/scale.py                  # 5 alternating rounds
    python bench/scale.py --repeats 9 --requests 40000

The call advances a session's sequence on every call (``bench.v1.Echo/Say`` answered by a two-step
``sequence`` with ``after: cycle``, both steps the static reply's bytes, so h2load's byte count still
proves every call got its answer). Servers, each started once and loaded in turn, round after round
(A B C D, then again), so drift and other tenants' load hit them alike:

- the hand-written grpcio servicer (``bench/handwritten.py``) answering the static reply: the floor;
- ``virtsvc serve`` on the memory store, one worker;
- the same hand-written servicer counting each call in Redis first (``INCR``, redis-py with hiredis):
  the floor of any sync grpcio server that makes one Redis round trip per call;
- ``virtsvc serve --store redis://...`` with one worker and with ``--workers 2``, on one redis-server
  started here (when ``serve`` has ``--store`` and ``redis-server`` is installed; otherwise said and left
  out).

CPU per call is the utime + stime over the run of every process of the server (the supervisor and its
workers) from /proc; the Redis rows also give redis-server's, and every row h2load's (from
``RUSAGE_CHILDREN``). h2load (16 connections x 4 streams, one thread) is pinned to the load core; the
servers and redis-server are not pinned: two workers need both cores of the reference machine, so they
share the load core with h2load, as a load balancer's traffic would on a real host. The sum of the three
CPU figures gives the calls/s the whole machine could carry, which is what two workers run into on two
cores. Sixteen connections, because the kernel spreads connections (not calls) over the workers of one
port: four would often leave a worker with one connection or none. Read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    PROTOS,
    SAY,
    SCENARIO_HEADER,
    SESSION_HEADER,
    USABLE_CORES,
    BenchError,
    check_h2load,
    compile_stubs,
    cpu_seconds,
    exit_on_sigterm,
    grpc_frame,
    median,
    run_h2load,
    server_processes,
)

HANDWRITTEN_REDIS = "hand-written + Redis INCR"
STATEFUL = """\
scenario: stateful
description: every call advances the session's sequence (the static reply's bytes at each step)
rules:
  - method: bench.v1.Echo/Say
    sequence:
      - {reply: {text: hello, n: 1}}
      - {reply: {text: hello, n: 1}}
    after: cycle
"""


def _family(pid: int) -> list[int]:
    """``pid`` and its children (a supervisor's workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            pids += [int(c) for c in children]
    return pids


def _cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _children_cpu() -> float:
    """The CPU time of this process's reaped children: h2load, once its run returned."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _redis() -> Iterator[tuple[str, subprocess.Popen[bytes]] | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.terminate()
        proc.wait(10)


def _has_store(serve: list[str]) -> bool:
    done = subprocess.run([*serve, "--help"], capture_output=True, text=True, timeout=60)
    return re.search(r"^\s+--store\b", done.stdout, re.MULTILINE) is not None


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--requests", type=int, default=20_000, help="calls per h2load run (default 20000)")
    parser.add_argument("--connections", type=int, default=16, help="h2load connections (default 16)")
    parser.add_argument("--streams", type=int, default=4, help="streams per connection (default 4)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_text, _redis() as redis:
        tmp = Path(tmp_text)
        pb2, _ = compile_stubs(tmp / "stubs")
        request = pb2.SayRequest(name="alice", n=1, tenant="acme").SerializeToString()
        reply = pb2.SayReply(text="hello", n=1).SerializeToString()
        body = tmp / "say.body"
        body.write_bytes(grpc_frame(request))
        scenario = tmp / "stateful.yaml"
        scenario.write_text(STATEFUL)
        from virtsvc.contracts.protoc import generate

        with contextlib.redirect_stdout(sys.stderr):
            generate(PROTOS, tmp / "generated")
        serve = [sys.executable, "-m", "virtsvc.cli", "serve"]
        flags = ["--log-format", "json", "--descriptors", str(tmp / "generated" / "descriptors.binpb")]
        flags += ["--scenarios", str(scenario), "--host", "127.0.0.1", "--port", "0"]
        specs: list[tuple[str, list[str]]] = [
            ("hand-written servicer", [sys.executable, str(BENCH / "handwritten.py"), "--mode", "servicer"]),
            ("memory, 1 worker", [*serve, *flags]),
        ]
        notes = []
        if redis is None:
            notes.append("redis-server not installed: the Redis rows are left out")
        elif not _has_store(serve):
            notes.append("`virtsvc serve` has no --store yet: the Redis rows are left out")
        else:
            store = ["--store", redis[0]]
            handwritten = [sys.executable, str(BENCH / "handwritten.py"), "--mode", "servicer"]
            specs += [
                (HANDWRITTEN_REDIS, [*handwritten, "--redis", redis[0]]),
                ("redis, 1 worker", [*serve, *flags, *store]),
                ("redis, 2 workers", [*serve, *flags, *store, "--workers", "2"]),
            ]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in specs}
        with server_processes(specs, core=None, timeout=120) as servers:
            for round_ in range(args.repeats):
                for server in servers:
                    headers = {"content-type": "application/grpc", "te": "trailers"}
                    if server.name != "hand-written servicer":
                        headers[SCENARIO_HEADER] = "stateful"
                        headers[SESSION_HEADER] = f"round-{round_}"
                    pids = _family(server.pid)
                    uses_redis = "redis" in server.name.lower()
                    redis_pid = redis[1].pid if redis is not None and uses_redis else None
                    cpu0, rcpu0 = _cpu(pids), _cpu([redis_pid] if redis_pid else [])
                    load0 = _children_cpu()
                    result = run_h2load(
                        f"http://{server.target}{SAY}", body, headers,
                        requests=args.requests, clients=args.connections, streams=args.streams,
                    )  # fmt: skip
                    cpu1, rcpu1 = _cpu(pids), _cpu([redis_pid] if redis_pid else [])
                    load = _children_cpu() - load0
                    check_h2load(result, len(grpc_frame(reply)), server.name)
                    run = {"rps": result.rps, "cpu_us": (cpu1 - cpu0) / result.requests * 1e6}
                    run["load_cpu_us"] = load / result.requests * 1e6
                    if redis_pid:
                        run["redis_cpu_us"] = (rcpu1 - rcpu0) / result.requests * 1e6
                    runs[server.name].append(run)
                    print(f"round {round_ + 1} {server.name}: {json.dumps(run)}", file=sys.stderr)
    summary = _summary(runs)
    _print(summary, notes, args)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs, "notes": notes}, indent=2))
    return 0


def _summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        row: dict[str, Any] = {}
        for key in ("rps", "cpu_us", "redis_cpu_us", "load_cpu_us"):
            values = [r[key] for r in rs if key in r]
            if values:
                row[key] = {"median": median(values), "min": min(values), "max": max(values)}
        out[name] = row
    return out


def _ratio(summary: dict[str, dict[str, Any]], a: str, b: str, key: str) -> str:
    if a not in summary or b not in summary:
        return "n/a"
    return f"{summary[b][key]['median'] / summary[a][key]['median']:.2f}x"


def _print(summary: dict[str, dict[str, Any]], notes: list[str], args: argparse.Namespace) -> None:
    print(
        f"stateful call (a sequence step per call), h2load {args.connections}x{args.streams}, "
        f"{args.requests} calls, {args.repeats} rounds"
    )
    print("h2load pinned to the load core; the servers and redis-server share both cores with it")
    for name, row in summary.items():
        rps, cpu = row["rps"], row["cpu_us"]
        line = (
            f"  {name:24} {rps['median']:8,.0f} calls/s ({rps['min']:,.0f}-{rps['max']:,.0f})  "
            f"{cpu['median']:6,.0f} us CPU/call ({cpu['min']:,.0f}-{cpu['max']:,.0f})"
        )
        if "redis_cpu_us" in row:
            line += f"  + redis-server {row['redis_cpu_us']['median']:,.0f} us"
        line += f"  + h2load {row['load_cpu_us']['median']:,.0f} us"
        print(line)
    print(
        "  redis / memory CPU per call (1 worker):",
        _ratio(summary, "memory, 1 worker", "redis, 1 worker", "cpu_us"),
    )
    print(
        "  one Redis round trip per call, hand-written / static servicer CPU per call:",
        _ratio(summary, "hand-written servicer", HANDWRITTEN_REDIS, "cpu_us"),
    )
    print(
        "  redis store (1 worker) / hand-written + Redis CPU per call:",
        _ratio(summary, HANDWRITTEN_REDIS, "redis, 1 worker", "cpu_us"),
    )
    print("  2 / 1 workers (redis) calls/s:", _ratio(summary, "redis, 1 worker", "redis, 2 workers", "rps"))
    two = summary.get("redis, 2 workers")
    if two is not None:
        # Every microsecond of CPU a call costs anywhere on the machine (server, redis-server, h2load).
        whole = sum(two[key]["median"] for key in ("cpu_us", "redis_cpu_us", "load_cpu_us"))
        cores = len(USABLE_CORES)
        ceiling = cores * 1e6 / whole
        print(
            f"  the machine's ceiling for 2 workers: {cores} cores / {whole:,.0f} us per call = "
            f"{ceiling:,.0f} calls/s ({two['rps']['median'] / ceiling:.0%} reached), "
            f"{ceiling / summary['redis, 1 worker']['rps']['median']:.2f}x one worker's calls/s"
        )
    print(
        "  2 / 1 workers (redis) CPU per call:",
        _ratio(summary, "redis, 1 worker", "redis, 2 workers", "cpu_us"),
    )
    for note in notes:
        print(f"  note: {note}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench/scale.py: {exc}", file=sys.stderr)
        sys.exit(1)
