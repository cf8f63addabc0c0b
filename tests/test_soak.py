"""Soak: one `virtsvc serve` process under a long mixed load, checked for answers, memory, threads, fds and
the journal's bound.

Skipped unless VIRTSVC_SOAK is set:

    VIRTSVC_SOAK=1 python -m pytest -m soak -p no:xdist -s tests/test_soak.py

VIRTSVC_SOAK_CALLS (default 200000) is the number of calls; VIRTSVC_SOAK_CLIENTS (default 4) the client
processes, each with VIRTSVC_SOAK_THREADS (default 4) threads. The load mixes all four RPC kinds over 50
sessions: static and templated replies, sequences, error statuses, garbage/reset/drop faults, delays,
client cancellations (during a delay and mid-stream) and malformed requests. Every call's outcome is
checked against what its scenario says. A tenth of the calls warm the server up (worker pool, sessions,
full journals); the figures printed at the end are what the README's reliability section publishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_reliability import ROOT, serve_process

from virtsvc.admin import AdminClient

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not os.environ.get("VIRTSVC_SOAK"), reason="soak test: set VIRTSVC_SOAK=1 to run it"),
]

SESSIONS = 50
JOURNAL_SIZE = 50
WORKERS = 16
CORE_THREADS = 2  # grpc core's own threads come and go

SCENARIO = """\
scenario: soak
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: FAIL}}
    status: {code: UNAVAILABLE, message: "try later ({{ request.order_id }})"}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: GARBAGE}}
    fault: garbage
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: RESET}}
    fault: reset
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: DROP}}
    fault: drop
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: SLOW}}
    delay: 5ms
    reply: {reservationId: slow}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: CANCEL}}
    delay: 10s
    reply: {reservationId: never}
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: {$regex: "^t-"}}}
    reply: {reservationId: "{{ request.sku }}/{{ request.qty * 2 }}", qtyReserved: "{{ request.qty }}"}
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: ok, qtyReserved: 1}
  - method: shop.v1.Inventory/GetItem
    sequence:
      - reply: {sku: s-1}
      - reply: {sku: s-2}
      - reply: {sku: s-3}
    after: cycle
  - method: shop.v1.Inventory/Watch
    when: {metadata: {x-cancel: "1"}}
    stream:
      - reply: {sku: c-0}
      - reply: {sku: c-1}
      - {delay: 10s, reply: {sku: never}}
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {sku: w-0}
      - reply: {sku: w-1}
      - reply: {sku: w-2}
      - reply: {sku: w-3}
      - reply: {sku: w-4}
  - method: shop.v1.Inventory/BulkUpdate
    reply: {accepted: "{{ requests | length }}"}
  - method: shop.v1.Inventory/Ping
    reply: {}
  - method: shop.v1.Orders/Track
    each_request: {reply: {orderId: "{{ request.order_id }}", text: "ack"}}
"""

# One client process: THREADS threads, each driving its share of the sessions with a weighted mix of
# calls and checking every outcome. Prints one JSON line: counts, mismatches and a few examples of them.
CLIENT = r"""
import json, random, sys, threading, time
from pathlib import Path
import grpc
from virtsvc.contracts import Catalog

address, descriptors, calls, threads, seed, first, sessions = sys.argv[1:8]
calls, threads, seed, first, sessions = int(calls), int(threads), int(seed), int(first), int(sessions)
catalog = Catalog.from_file(Path(descriptors))
M = {n: catalog.method(f"shop.v1.{n}") for n in
     ["Inventory/Reserve", "Inventory/GetItem", "Inventory/Watch", "Inventory/BulkUpdate", "Inventory/Ping",
      "Orders/Track"]}
Req = lambda n, **f: M[n].input_class(**f).SerializeToString()
Out = lambda n, raw: M[n].output_class.FromString(raw)
MIX = [("static", 30), ("template", 15), ("status", 7), ("garbage", 3), ("reset", 2), ("drop", 1),
       ("slow", 3), ("cancel_delay", 2), ("sequence", 8), ("stream", 8), ("cancel_stream", 2),
       ("client_stream", 8), ("bidi", 8), ("bad_request", 3)]
KINDS, WEIGHTS = zip(*MIX)
channel = grpc.insecure_channel(address)
reserve = channel.unary_unary(M["Inventory/Reserve"].path)
get_item = channel.unary_unary(M["Inventory/GetItem"].path)
watch = channel.unary_stream(M["Inventory/Watch"].path)
bulk = channel.stream_unary(M["Inventory/BulkUpdate"].path)
ping = channel.unary_unary(M["Inventory/Ping"].path)
track = channel.stream_stream(M["Orders/Track"].path)
counts = {k: 0 for k in KINDS}
bad = []
lock = threading.Lock()

def code(fn):
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""

def one(kind, rng, md):
    if kind == "static":
        r = Out("Inventory/Reserve", reserve(Req("Inventory/Reserve", sku="x"), metadata=md, timeout=10))
        return r.reservation_id == "ok" and r.qty_reserved == 1
    if kind == "template":
        q = rng.randrange(1000)
        raw = reserve(Req("Inventory/Reserve", sku=f"t-{q}", qty=q), metadata=md, timeout=10)
        r = Out("Inventory/Reserve", raw)
        return r.reservation_id == f"t-{q}/{2 * q}" and r.qty_reserved == q
    if kind == "status":
        request = Req("Inventory/Reserve", sku="FAIL", order_id="o7")
        c, d = code(lambda: reserve(request, metadata=md, timeout=10))
        return c is grpc.StatusCode.UNAVAILABLE and d == "try later (o7)"
    if kind == "garbage":
        return reserve(Req("Inventory/Reserve", sku="GARBAGE"), metadata=md, timeout=10) == b"\x08\x80"
    if kind == "reset":
        c, _ = code(lambda: reserve(Req("Inventory/Reserve", sku="RESET"), metadata=md, timeout=10))
        return c is grpc.StatusCode.CANCELLED
    if kind == "drop":
        c, _ = code(lambda: reserve(Req("Inventory/Reserve", sku="DROP"), metadata=md, timeout=0.05))
        return c is grpc.StatusCode.DEADLINE_EXCEEDED
    if kind == "slow":
        raw = reserve(Req("Inventory/Reserve", sku="SLOW"), metadata=md, timeout=10)
        return Out("Inventory/Reserve", raw).reservation_id == "slow"
    if kind == "cancel_delay":
        f = reserve.future(Req("Inventory/Reserve", sku="CANCEL"), metadata=md, timeout=30)
        time.sleep(0.01)
        f.cancel()
        return f.cancelled()
    if kind == "sequence":
        return Out("Inventory/GetItem", get_item(b"", metadata=md, timeout=10)).sku in ("s-1", "s-2", "s-3")
    if kind == "stream":
        return [Out("Inventory/Watch", r).sku for r in watch(b"", metadata=md, timeout=10)] == \
            [f"w-{i}" for i in range(5)]
    if kind == "cancel_stream":
        it = watch(b"", metadata=md + (("x-cancel", "1"),), timeout=30)
        got = [Out("Inventory/Watch", next(it)).sku, Out("Inventory/Watch", next(it)).sku]
        it.cancel()
        return got == ["c-0", "c-1"]
    if kind == "client_stream":
        n = rng.randrange(1, 6)
        reqs = [Req("Inventory/BulkUpdate", sku=f"S{i}", count=i) for i in range(n)]
        return Out("Inventory/BulkUpdate", bulk(iter(reqs), metadata=md, timeout=10)).accepted == n
    if kind == "bidi":
        ids = [f"o-{rng.randrange(100)}" for _ in range(3)]
        got = [Out("Orders/Track", r).order_id for r in
               track(iter([Req("Orders/Track", order_id=i) for i in ids]), metadata=md, timeout=10)]
        return got == ids
    if kind == "bad_request":
        c, d = code(lambda: ping(b"\x08\x80", metadata=md, timeout=10))
        return c is grpc.StatusCode.INVALID_ARGUMENT and d.startswith("the request to shop.v1.Inventory/Ping")
    raise AssertionError(kind)

def worker(t):
    rng = random.Random(seed * 1000 + t)
    mine = [s for s in range(sessions) if s % (threads * int(sys.argv[8])) == first + t] or [first + t]
    n = calls // threads + (1 if t < calls % threads else 0)
    for i in range(n):
        kind = rng.choices(KINDS, WEIGHTS)[0]
        md = (("x-virtsvc-scenario", "soak"), ("x-virtsvc-session", f"s-{rng.choice(mine)}"))
        try:
            ok = one(kind, rng, md)
            why = "unexpected answer"
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {getattr(exc, 'code', lambda: '')()} {exc}"[:300]
        with lock:
            counts[kind] += 1
            if not ok:
                bad.append(f"{kind}: {why}")

ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
channel.close()
print(json.dumps({"counts": counts, "mismatches": len(bad), "examples": bad[:10]}))
"""


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _status(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


def _drive(
    address: str, descriptors: Path, calls: int, clients: int, threads: int, seed: int
) -> dict[str, Any]:
    """Runs the client processes to completion; their summed counts and mismatches."""
    procs = []
    for c in range(clients):
        share = calls // clients + (1 if c < calls % clients else 0)
        args = [
            address,
            str(descriptors),
            str(share),
            str(threads),
            str(seed * 100 + c),
            str(c * threads),
            str(SESSIONS),
            str(clients),
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    total: dict[str, Any] = {"counts": {}, "mismatches": 0, "examples": []}
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=1800)
            assert proc.returncode == 0, err[-3000:]
            result = json.loads(out.strip().splitlines()[-1])
            for kind, n in result["counts"].items():
                total["counts"][kind] = total["counts"].get(kind, 0) + n
            total["mismatches"] += result["mismatches"]
            total["examples"] += result["examples"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return total


def _saturate_pool(address: str, workers: int) -> None:
    """Grows the server's worker pool to its maximum (more slow calls than workers, then cancelled), so the
    thread count after warm-up is the pool's full size, whatever the load's peaks were."""
    md = (("x-virtsvc-scenario", "soak"), ("x-virtsvc-session", "s-0"))
    with grpc.insecure_channel(address) as ch:
        reserve = ch.unary_unary("/shop.v1.Inventory/Reserve")
        request = b"\x0a\x06CANCEL"  # ReserveRequest(sku="CANCEL"): a 10 s delay
        calls = [reserve.future(request, metadata=md, timeout=30) for _ in range(workers + 8)]
        time.sleep(1.0)
        for call in calls:
            call.cancel()


def _settle(pid: int, fds: int, threads: int, timeout: float = 20.0) -> dict[str, int]:
    """Waits for the server's open fds and threads to come back to the given baselines; its last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = _status(pid)
        if (status["fds"] <= fds and status["Threads"] <= threads) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_soak(generated: Path, tmp_path: Path) -> None:
    calls = int(os.environ.get("VIRTSVC_SOAK_CALLS", "200000"))
    clients = int(os.environ.get("VIRTSVC_SOAK_CLIENTS", "4"))
    threads = int(os.environ.get("VIRTSVC_SOAK_THREADS", "4"))
    descriptors = generated / "descriptors.binpb"
    scenario = tmp_path / "soak.yaml"
    scenario.write_text(SCENARIO)
    args = [
        "--descriptors", str(descriptors), "--scenarios", str(scenario), "--journal-size", str(JOURNAL_SIZE),
        "--max-workers", str(WORKERS), "--max-concurrency-per-session", "32", "--grace", "1",
    ]  # fmt: skip
    with serve_process(args) as served:
        pid = served.pid
        start = _status(pid)  # no client connected yet
        warm_calls = max(calls // 10, 1000)
        t0 = time.monotonic()
        warm = _drive(served.address, descriptors, warm_calls, clients, threads, seed=1)
        warm_s = time.monotonic() - t0
        _saturate_pool(served.address, WORKERS)
        warmed = _settle(pid, start["fds"], start["Threads"] + WORKERS)
        t1 = time.monotonic()
        cpu1 = _cpu_seconds(pid)
        main = _drive(served.address, descriptors, calls - warm_calls, clients, threads, seed=2)
        main_s = time.monotonic() - t1
        server_cpu = _cpu_seconds(pid) - cpu1
        end = _settle(pid, start["fds"], warmed["Threads"])  # waits for the baseline; asserted below
        with grpc.insecure_channel(served.address) as ch:
            journal = AdminClient(ch, timeout=60).call("GetJournal").entries
        alive = served.proc.poll() is None
    total_calls = sum(warm["counts"].values()) + sum(main["counts"].values())
    growth = (end["VmRSS"] - warmed["VmRSS"]) / warmed["VmRSS"]
    per_session: dict[str, int] = {}
    for entry in journal:
        per_session[entry.session] = per_session.get(entry.session, 0) + 1
    mix = {k: warm["counts"].get(k, 0) + main["counts"].get(k, 0) for k in sorted(main["counts"])}
    figures = {
        "calls": total_calls,
        "sessions": SESSIONS,
        "client_processes": clients,
        "client_threads": clients * threads,
        "seconds": round(warm_s + main_s, 1),
        "calls_per_second": round(total_calls / (warm_s + main_s)),
        "calls_per_second_after_warm_up": round(sum(main["counts"].values()) / main_s),
        "server_cpu_us_per_call": round(server_cpu / max(sum(main["counts"].values()), 1) * 1e6),
        "server_cpu_share": f"{server_cpu / main_s:.0%} of one core",
        "rss_kib": {"start": start["VmRSS"], "after_warm_up": warmed["VmRSS"], "end": end["VmRSS"]},
        "rss_growth_after_warm_up": f"{growth:+.1%}",
        "threads": {"start": start["Threads"], "after_warm_up": warmed["Threads"], "end": end["Threads"]},
        "fds": {"start": start["fds"], "after_warm_up": warmed["fds"], "end": end["fds"]},
        "journal_entries": len(journal),
        "journal_bound": JOURNAL_SIZE * SESSIONS,
        "mismatches": warm["mismatches"] + main["mismatches"],
        "mix": mix,
    }
    print("\nSOAK " + json.dumps(figures, indent=2))
    assert alive, "the server died during the soak"
    assert figures["mismatches"] == 0, warm["examples"] + main["examples"]
    assert total_calls == calls
    assert growth < 0.10, f"resident memory grew {growth:.1%} after warm-up"
    # /proc counts OS threads, and grpc's C core starts and ends a couple of its own as it sees fit (its
    # executor and timer threads): a leak is one thread per call or per session, thousands here, not two.
    assert warmed["Threads"] <= start["Threads"] + WORKERS + CORE_THREADS, figures["threads"]
    assert end["Threads"] <= warmed["Threads"] + CORE_THREADS, figures["threads"]
    assert end["fds"] <= start["fds"], figures["fds"]
    assert len(per_session) <= SESSIONS and max(per_session.values()) <= JOURNAL_SIZE, per_session
    assert len(journal) <= JOURNAL_SIZE * SESSIONS
