"""A/B of two virtsvc trees on one case: is a change within noise of the code before it?

    python bench/ab.py --base 8852e93                 # the working tree against that commit
    python bench/ab.py --base main~3 --case matched --repeats 9
    python bench/ab.py --base HEAD --against HEAD --b-serve "--metrics-port 0"  # what metrics cost

Both trees serve the same descriptors and ``bench/scenarios/bench.yaml`` with ``virtsvc serve`` (the base
from a temporary ``git worktree``, each through its own ``PYTHONPATH``), started side by side on the server
core and idle when not loaded. h2load runs alternate between them (A B B A A B ...), so drift and other
load on the shared machine hit both alike. Reported per tree: calls/s and the server's CPU per call
(utime + stime from /proc over each run: steadier than throughput on a shared machine), as median, min-max
and every run, and the ratio B/A of the medians. Each run is checked like the main benchmark (h2c, every
request succeeded, exactly the expected reply bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    SCENARIO_HEADER,
    SCENARIOS,
    BenchError,
    check_h2load,
    exit_on_sigterm,
    median,
    run_h2load,
    server_processes,
)


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached checkout of ``ref`` in a temporary directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="virtsvc-ab-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), ref], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


def serve_command(descriptors: Path, *extra: str) -> list[str]:
    serve = [sys.executable, "-m", "virtsvc.cli", "serve", "--log-format", "json"]
    paths = ["--descriptors", str(descriptors), "--scenarios", str(SCENARIOS)]
    return [*serve, *paths, "--host", "127.0.0.1", "--port", "0", *extra]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the git ref to compare with (A)")
    parser.add_argument(
        "--against", help="a git ref for B instead of the working tree (the same ref twice: A/A)"
    )
    parser.add_argument("--case", choices=("static", "matched"), default="static")
    parser.add_argument("--repeats", type=int, default=7, help="runs per tree (default 7)")
    parser.add_argument("--requests", type=int, default=40_000, help="calls per run (default 40,000)")
    parser.add_argument("--out", type=Path, help="also write every figure as JSON here")
    parser.add_argument(
        "--b-serve",
        default="",
        metavar="FLAGS",
        help='more `virtsvc serve` flags for B only, e.g. "--metrics-port 0" (with --against the same ref '
        "as --base: what those flags cost)",
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()

    sys.path.insert(0, str(ROOT / "bench"))
    from run import Env

    with contextlib.ExitStack() as trees_stack:
        tmp = trees_stack.enter_context(tempfile.TemporaryDirectory(prefix="virtsvc-ab-"))
        base = trees_stack.enter_context(worktree(args.base))
        other = trees_stack.enter_context(worktree(args.against)) if args.against else ROOT
        env = Env(Path(tmp))
        case = env.static if args.case == "static" else env.matched
        b_extra = shlex.split(args.b_serve)
        b_name = f"B {args.against or 'working tree'}{' ' + args.b_serve if b_extra else ''}"
        trees = {f"A {args.base}": base, b_name: other}
        specs = [
            (name, serve_command(env.descriptors, *(b_extra if name.startswith("B") else ())))
            for name in trees
        ]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        headers = {"content-type": "application/grpc", "te": "trailers", SCENARIO_HEADER: case.name}
        environs = {name: {**os.environ, "PYTHONPATH": str(tree)} for name, tree in trees.items()}
        with contextlib.ExitStack() as stack:
            servers = {}
            for name, cmd in specs:  # one launch each: their PYTHONPATHs differ
                (server,) = stack.enter_context(server_processes([(name, cmd)], env=environs[name]))
                servers[name] = server
            for server in servers.values():  # warm-up, not counted
                run_h2load(f"http://{server.target}/{case.path.lstrip('/')}", env.bodies[case.name], headers,
                           requests=args.requests // 4, clients=4, streams=16)  # fmt: skip
            for i in range(args.repeats):
                # A B, then B A: neither tree always runs right after the other's load
                order = list(servers.items()) if i % 2 == 0 else list(reversed(servers.items()))
                for name, server in order:
                    result = run_h2load(
                        f"http://{server.target}/{case.path.lstrip('/')}",
                        env.bodies[case.name],
                        headers,
                        requests=args.requests,
                        clients=4,
                        streams=16,
                        server_pid=server.pid,
                    )
                    check_h2load(result, case.data_per_call, f"{name}, run {i + 1}")
                    assert result.cpu_seconds is not None
                    runs[name].append(
                        {"rps": result.rps, "cpu_us": result.cpu_seconds / result.requests * 1e6}
                    )
                    print(f"  {name:<24} run {i + 1}: {result.rps:8,.0f} calls/s  "
                          f"{runs[name][-1]['cpu_us']:6.1f} µs CPU/call", file=sys.stderr)  # fmt: skip
    summary = _summary(runs)
    print(f"A/B, {args.case} reply, h2load 4x16, {args.requests:,} calls a run, {args.repeats} runs each")
    for name, figures in summary.items():
        if name == "ratio":
            continue
        rps = f"{figures['rps_median']:8,.0f} calls/s ({figures['rps_min']:,.0f}-{figures['rps_max']:,.0f})"
        cpu = f"{figures['cpu_median']:6.1f} µs CPU/call ({figures['cpu_min']:.1f}-{figures['cpu_max']:.1f})"
        print(f"  {name:<24} {rps}   {cpu}")
    ratio = summary["ratio"]
    print(f"  B/A: throughput {ratio['rps']:.3f}x, CPU per call {ratio['cpu']:.3f}x")
    if args.out:
        args.out.write_text(
            json.dumps({"base": args.base, "case": args.case, "runs": runs, "summary": summary}, indent=2)
        )
    return 0


def _summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, items in runs.items():
        rps = [r["rps"] for r in items]
        cpu = [r["cpu_us"] for r in items]
        out[name] = {
            "rps_median": median(rps), "rps_min": min(rps), "rps_max": max(rps),
            "cpu_median": median(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
        }  # fmt: skip
    a, b = (out[name] for name in runs)
    out["ratio"] = {"rps": b["rps_median"] / a["rps_median"], "cpu": b["cpu_median"] / a["cpu_median"]}
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"ab: {exc}", file=sys.stderr)
        sys.exit(2)
