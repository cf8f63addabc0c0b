"""``virtsvc serve`` with virtsvc's unary handler timed: the CPU time each call spends in virtsvc's own code
*inside the loaded server*, where caches are shared with grpc's own per-call work and 64 worker threads.

The direct probe (probes.py handler) calls the handler in a tight loop, where everything it touches stays
hot in the CPU caches; under load the same code runs several times slower, and that is the cost that shows
in the server's CPU per call. Here the handler is wrapped with ``time.thread_time_ns`` (the calling
thread's CPU time, so other threads' work is not counted) and the totals are printed as a JSON line on
stdout at each SIGUSR1, then reset:

    {"event": "handler_cpu", "calls": N, "cpu_us_per_call": x, "wall_us_per_call": y, "clock_us": c}

``clock_us`` is the cost of one pair of clock reads, measured at start (included in the figures).
Arguments are those of ``virtsvc serve``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any


def main(argv: list[str]) -> int:
    from virtsvc import cli
    from virtsvc.engine import pipeline as handlers

    lock = threading.Lock()
    totals = [0, 0, 0]  # calls, thread CPU ns, wall ns
    original = handlers.Dispatcher._unary

    def timed(self: Any, spec: Any, raw: bytes, context: Any) -> Any:
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        try:
            return original(self, spec, raw, context)
        finally:
            cpu, wall = time.thread_time_ns() - c0, time.perf_counter_ns() - w0
            with lock:
                totals[0] += 1
                totals[1] += cpu
                totals[2] += wall

    n = 20_000
    t0 = time.perf_counter_ns()
    for _ in range(n):
        time.thread_time_ns()
        time.perf_counter_ns()
    clock_us = (time.perf_counter_ns() - t0) / n / 1000

    def report(signum: int, frame: Any) -> None:
        with lock:
            calls, cpu, wall = totals
            totals[:] = [0, 0, 0]
        line = {
            "event": "handler_cpu",
            "calls": calls,
            "cpu_us_per_call": cpu / calls / 1000 if calls else None,
            "wall_us_per_call": wall / calls / 1000 if calls else None,
            "clock_us": clock_us,
        }
        print(json.dumps(line), flush=True)

    handlers.Dispatcher._unary = timed  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, report)
    return cli.main(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
