"""Instructions per call under callgrind: what a serve flag costs a case, free of a shared machine's noise.

    python bench/instructions.py                                  # metrics off (A) and on (B)
    python bench/instructions.py --b-serve "--log-level debug"    # what the rpc log costs
    python bench/instructions.py --case matched --windows 5 --calls 1000

Wall-clock and CPU-time A/Bs of a few percent drown in a shared 2-core machine's noise (other load, CPU
frequency, cache contention). Instructions executed are nearly deterministic: A and B each run ``virtsvc
serve`` under valgrind's callgrind, side by side, with a fixed PYTHONHASHSEED (dict layouts, hence
instruction counts, otherwise differ from process to process). For each window a grpc client outside
valgrind makes ``--calls`` calls (sequential, or from ``--threads`` threads at once) after the counters
are zeroed (``callgrind_control -z``); the counters are then dumped (``-d``) and the dump's total read:
every thread of the process, grpc's C core included. Windows alternate A B B A ...; reported per server
are the median and spread of instructions per call, and B/A. Every reply is checked against the expected
bytes. Needs valgrind (Debian's package); callgrind slows the server ~50x, so the windows are short.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import SCENARIO_HEADER, SCENARIOS, BenchError, exit_on_sigterm, median, server_processes

_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _calls(call: Any, case: Any, meta: tuple[tuple[str, str], ...], calls: int) -> None:
    for i in range(calls):
        reply = call(case.request, metadata=meta, timeout=60)
        if reply != case.reply:
            raise BenchError(f"call {i + 1}: reply {reply!r}, expected {case.reply!r}")


def _window(
    pid: int, outdir: Path, call: Any, case: Any, meta: tuple[tuple[str, str], ...], calls: int, threads: int
) -> float:
    """Instructions per call over ``calls`` calls (``threads`` client threads at once), from one
    zero-and-dump window of process ``pid``."""
    before = set(outdir.glob(f"callgrind.out.{pid}*"))
    each = calls // threads
    calls = each * threads
    _control("-z", str(pid))
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(_calls, call, case, meta, each) for _ in range(threads)]:
            done.result()
    _control("-d", str(pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(outdir.glob(f"callgrind.out.{pid}*")) - before:
            found = _TOTALS.search(dump.read_bytes())
            if found:
                dump.unlink()
                return int(found.group(1)) / calls
        time.sleep(0.2)
    raise BenchError(f"no callgrind dump from process {pid} in {outdir}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=("static", "matched"), default="static")
    parser.add_argument(
        "--a-serve", default="", metavar="FLAGS", help="more serve flags for A (default none)"
    )
    parser.add_argument(
        "--b-serve",
        default="--metrics-port 0",
        metavar="FLAGS",
        help='serve flags for B (default "--metrics-port 0")',
    )
    parser.add_argument("--calls", type=int, default=500, help="calls per window (default 500)")
    parser.add_argument("--windows", type=int, default=4, help="windows per server (default 4)")
    parser.add_argument(
        "--threads", type=int, default=1, help="client threads calling at once (default 1: sequential calls)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="calls before the first window (default 200)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench/instructions.py needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    exit_on_sigterm()
    import grpc

    sys.path.insert(0, str(Path(__file__).parent))
    from run import Env

    with tempfile.TemporaryDirectory(prefix="virtsvc-ir-") as tmp:
        env = Env(Path(tmp))
        case = env.static if args.case == "static" else env.matched
        outdir = Path(tmp) / "callgrind"
        outdir.mkdir()
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outdir}/callgrind.out.%p"]
        flags = {"A": shlex.split(args.a_serve), "B": shlex.split(args.b_serve)}
        serve = [sys.executable, "-m", "virtsvc.cli", "serve", "--log-format", "json", "--port", "0"]
        source = ["--descriptors", str(env.descriptors), "--scenarios", str(SCENARIOS), "--host", "127.0.0.1"]
        specs = [(name, [*valgrind, *serve, *source, *extra]) for name, extra in flags.items()]
        meta = ((SCENARIO_HEADER, case.name),)
        runs: dict[str, list[float]] = {name: [] for name in flags}
        # malloc: valgrind sees every allocation alike; a fixed hash seed: the same dict layouts each run
        environ = {**os.environ, "PYTHONMALLOC": "malloc", "PYTHONHASHSEED": "0"}
        with (
            server_processes(specs, core=None, env=environ, timeout=600) as servers,
            contextlib.ExitStack() as stack,
        ):
            calls = {}
            for server in servers:
                channel = stack.enter_context(grpc.insecure_channel(server.target))
                calls[server.name] = channel.unary_unary(case.path)
                for _ in range(args.warmup):
                    calls[server.name](case.request, metadata=meta, timeout=60)
            for i in range(args.windows):
                order = servers if i % 2 == 0 else list(reversed(servers))
                for server in order:
                    figure = _window(
                        server.pid, outdir, calls[server.name], case, meta, args.calls, args.threads
                    )
                    runs[server.name].append(figure)
                    print(f"  {server.name} window {i + 1}: {figure:,.0f} instructions/call", file=sys.stderr)
    print(
        f"instructions per call, {case.name} reply, {args.windows} windows of {args.calls} sequential calls"
    )
    for name, figures in runs.items():
        extra = flags[name]
        print(f"  {name} {shlex.join(extra) or '(no extra flags)':<22} median {median(figures):,.0f}  "
              f"({min(figures):,.0f}-{max(figures):,.0f})")  # fmt: skip
    a, b = median(runs["A"]), median(runs["B"])
    assert a is not None and b is not None
    print(f"  B/A: {b / a:.4f}x ({b - a:+,.0f} instructions/call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
