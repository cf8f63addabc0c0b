"""A multi-process grpc Python client measuring unary latency: ``procs`` processes x ``threads`` threads,
each thread making blocking calls back to back (so concurrency = procs x threads).

Requests and replies cross as raw bytes (no protobuf work in the client); every reply is compared with
the expected bytes. Each thread stops after ``calls`` calls or ``seconds`` seconds, whichever comes
first: that is one round, and the processes start each of ``rounds`` rounds together. Prints one JSON
object: per round and as medians of the rounds, calls, errors, wrong replies, rate and latency
percentiles (µs).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import threading
import time
from typing import Any


def _percentile(values: list[int], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered), max(1, math.ceil(p / 100 * len(ordered)))) - 1])


def _worker(args: dict[str, Any], barrier: Any, results: Any) -> None:
    import grpc

    body = bytes.fromhex(args["body"])
    expect = bytes.fromhex(args["expect"])
    metadata = tuple(tuple(pair) for pair in args["metadata"])
    rounds: list[dict[str, Any]] = []
    with grpc.insecure_channel(args["target"]) as channel:
        call = channel.unary_unary(args["method"])
        for _ in range(args["warmup"]):
            call(body, metadata=metadata, timeout=10)
        for _ in range(args["rounds"]):
            out: dict[str, Any] = {"latencies": [], "errors": 0, "wrong": 0, "first_error": None}
            lock = threading.Lock()
            barrier.wait(60)  # every process starts each round together
            deadline = time.perf_counter() + args["seconds"]

            def loop(
                out: dict[str, Any] = out, lock: threading.Lock = lock, deadline: float = deadline
            ) -> None:
                lat: list[int] = []
                errors = wrong = 0
                first: str | None = None
                for _ in range(args["calls"]):
                    t0 = time.perf_counter()
                    try:
                        reply = call(body, metadata=metadata, timeout=10)
                    except grpc.RpcError as exc:
                        errors += 1
                        first = first or f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
                        continue
                    t1 = time.perf_counter()
                    lat.append(int((t1 - t0) * 1e6))
                    if reply != expect:
                        wrong += 1
                    if t1 > deadline:
                        break
                with lock:
                    out["latencies"].extend(lat)
                    out["errors"] += errors
                    out["wrong"] += wrong
                    out["first_error"] = out["first_error"] or first

            threads = [threading.Thread(target=loop) for _ in range(args["threads"])]
            t_round = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["seconds"] = time.perf_counter() - t_round
            rounds.append(out)
    results.put(rounds)


def measure(
    target: str,
    method: str,
    body: bytes,
    expect: bytes,
    metadata: list[tuple[str, str]],
    *,
    procs: int,
    threads: int,
    calls: int,
    seconds: float,
    rounds: int = 3,
    warmup: int = 50,
) -> dict[str, Any]:
    """Runs the client; returns per-round figures and their medians."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    args = {
        "target": target,
        "method": method,
        "body": body.hex(),
        "expect": expect.hex(),
        "metadata": metadata,
        "threads": threads,
        "calls": calls,
        "seconds": seconds,
        "rounds": rounds,
        "warmup": warmup,
    }
    workers = [ctx.Process(target=_worker, args=(args, barrier, results), daemon=True) for _ in range(procs)]
    for w in workers:
        w.start()
    outs: list[list[dict[str, Any]]] = []
    try:
        limit = time.monotonic() + rounds * (seconds + 30) + 60
        for _ in workers:
            outs.append(results.get(timeout=max(1.0, limit - time.monotonic())))
    finally:
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.kill()
                w.join(5)
    per_round = []
    for r in range(rounds):
        parts = [o[r] for o in outs]
        lat = [x for p in parts for x in p["latencies"]]
        wall = max(p["seconds"] for p in parts)
        per_round.append(
            {
                "calls": len(lat),
                "errors": sum(p["errors"] for p in parts),
                "wrong": sum(p["wrong"] for p in parts),
                "first_error": next((p["first_error"] for p in parts if p["first_error"]), None),
                "rate": len(lat) / wall if wall else None,
                "p50_us": _percentile(lat, 50),
                "p90_us": _percentile(lat, 90),
                "p99_us": _percentile(lat, 99),
                "max_us": float(max(lat)) if lat else None,
            }
        )

    def med(key: str) -> float | None:
        values = [r[key] for r in per_round if r[key] is not None]
        return statistics.median(values) if values else None

    return {
        "concurrency": procs * threads,
        "procs": procs,
        "threads": threads,
        "rounds": per_round,
        "calls": sum(r["calls"] for r in per_round),
        "errors": sum(r["errors"] for r in per_round),
        "wrong": sum(r["wrong"] for r in per_round),
        "first_error": next((r["first_error"] for r in per_round if r["first_error"]), None),
        "rate": med("rate"),
        "p50_us": med("p50_us"),
        "p90_us": med("p90_us"),
        "p99_us": med("p99_us"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--body-hex", default="")
    parser.add_argument("--expect-hex", default="")
    parser.add_argument("--header", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=1000, help="per thread")
    parser.add_argument("--seconds", type=float, default=10.0, help="per thread, at most")
    parser.add_argument("--rounds", type=int, default=3, help="measurements, each reported; medians too")
    parser.add_argument("--warmup", type=int, default=50, help="calls per process before measuring")
    a = parser.parse_args(argv)
    metadata = [tuple(h.split("=", 1)) for h in a.header]
    result = measure(
        a.target,
        a.method,
        bytes.fromhex(a.body_hex),
        bytes.fromhex(a.expect_hex),
        metadata,  # type: ignore[arg-type]
        procs=a.procs,
        threads=a.threads,
        calls=a.calls,
        seconds=a.seconds,
        rounds=a.rounds,
        warmup=a.warmup,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
