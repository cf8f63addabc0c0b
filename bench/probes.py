"""In-process measurements, each run in a fresh process by run.py; each prints one JSON object.

``startup``   ``VirtualServer(catalog, scenarios).start()`` until a call answers, descriptors loaded.
``session``   a per-test session with five inline rules: ``compile_rules`` + assigning them to a session.
``memory``    sessions with full journals, driven through virtsvc's own gRPC handlers (no network):
              RSS per session and per journal entry, and the bound that follows.
``handler``   the CPU cost of virtsvc's own code per call (its gRPC handler called directly, no network),
              and cProfile's top functions on that path.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SAY, SCENARIO_HEADER, SESSION_HEADER, percentile, rss_bytes

SAY_REQUEST = {"name": "alice", "n": 1, "tenant": "acme"}

# The five inline rules of a typical test: matching, templating, a sequence, a failure, a stream.
FIVE_RULES: list[dict[str, Any]] = [
    {
        "method": "bench.v1.Echo/Say",
        "when": {"request": {"name": "bob"}},
        "reply": {"text": "hi bob", "n": 1},
    },
    {
        "method": "bench.v1.Echo/Say",
        "when": {"request": {"tenant": "acme"}},
        "reply": {"text": "hi {{ request.name }}", "n": "{{ request.n + 1 }}"},
    },
    {
        "method": "bench.v1.Echo/Say",
        "when": {"request": {"name": "carol"}},
        "sequence": [{"reply": {"text": "one"}}, {"reply": {"text": "two"}}],
    },
    {
        "method": "bench.v1.Echo/Say",
        "when": {"request": {"name": "dave"}},
        "status": {"code": "UNAVAILABLE", "message": "try later"},
    },
    {"method": "bench.v1.Echo/Stream", "stream": [{"reply": {"text": "a"}}, {"reply": {"text": "b"}}]},
]


def _load(descriptors: Path, scenarios: Sequence[Path]) -> tuple[Any, list[Any], dict[str, float]]:
    from virtsvc.contracts import load_catalog
    from virtsvc.scenarios import load_scenarios

    t0 = time.perf_counter()
    catalog = load_catalog(descriptors=descriptors)
    t1 = time.perf_counter()
    compiled = load_scenarios(list(scenarios), catalog)
    t2 = time.perf_counter()
    return catalog, compiled, {"catalog_s": t1 - t0, "scenarios_s": t2 - t1}


def _say_bytes(catalog: Any, **fields: Any) -> bytes:
    spec = catalog.method("bench.v1.Echo/Say")
    return spec.input_class(**fields).SerializeToString()  # type: ignore[no-any-return]


def _first_call(address: str, request: bytes, metadata: tuple[tuple[str, str], ...]) -> bytes:
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(SAY)(request, metadata=metadata, timeout=10, wait_for_ready=True)  # type: ignore[no-any-return]


def startup(descriptors: Path, scenarios: Sequence[Path], repeats: int) -> dict[str, Any]:
    """The first server of a process (cold: grpc core starts too), then ``repeats`` more (warm)."""
    from virtsvc.server import VirtualServer

    catalog, compiled, loads = _load(descriptors, scenarios)
    request = _say_bytes(catalog, **SAY_REQUEST)
    metadata = ((SCENARIO_HEADER, "static"),)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        server = VirtualServer(catalog, compiled).start()
        try:
            _first_call(server.address, request, metadata)
            times.append(time.perf_counter() - t0)
        finally:
            server.stop(0)
    return {"cold_s": times[0], "warm_s": statistics.median(times[1:]) if repeats else None, **loads}


def session_rules(descriptors: Path, scenarios: Sequence[Path], repeats: int) -> dict[str, Any]:
    """Compile five inline rules and assign them to a fresh session, ``repeats`` times; then one call."""
    try:
        from virtsvc.scenarios import compile_rules
    except ImportError as exc:
        return {"available": False, "reason": f"virtsvc.scenarios.loader.compile_rules: {exc}"}
    from virtsvc.engine.router import NO_SCENARIO
    from virtsvc.engine.store import RuleSet
    from virtsvc.server import VirtualServer

    catalog, compiled, _ = _load(descriptors, scenarios)
    server = VirtualServer(catalog, compiled)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        rules = compile_rules(
            FIVE_RULES, catalog, scenario=NO_SCENARIO, origin="<bench>", key_prefix="inline:"
        )
        server.store.put_rules(NO_SCENARIO, f"test-{i}", RuleSet(rules, source=FIVE_RULES))
        times.append(time.perf_counter() - t0)
    # The rules answer: a call on the last session, through a real server.
    server.start()
    try:
        reply = _first_call(
            server.address, _say_bytes(catalog, name="bob"), ((SESSION_HEADER, f"test-{repeats - 1}"),)
        )
        text = catalog.method("bench.v1.Echo/Say").output_class.FromString(reply).text
    finally:
        server.stop(0)
    if text != "hi bob":
        return {"available": False, "reason": f"the inline rule answered {text!r}, expected 'hi bob'"}
    return {
        "available": True,
        "rules": len(FIVE_RULES),
        "median_ms": statistics.median(times) * 1e3,
        "p99_ms": (percentile(times, 99) or 0.0) * 1e3,
        "first_ms": times[0] * 1e3,
    }


class _Context:
    """The part of grpc.ServicerContext that virtsvc's handlers use on the static-reply path."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"aborted: {code.name}: {details}")

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback: Any) -> bool:
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def send_initial_metadata(self, metadata: Any) -> None:
        pass

    def time_remaining(self) -> float:
        return 10.0


def memory(descriptors: Path, scenarios: Sequence[Path], sessions: int, journal_size: int) -> dict[str, Any]:
    """RSS after creating ``sessions`` sessions, after filling their journals, and after one more round.

    Calls go through the server's own grpc method handler (routing, session, rule, journal entry) with a
    stand-in context, so each entry holds what a real call leaves: fresh request bytes and metadata.
    """
    from virtsvc.server import VirtualServer

    catalog, compiled, _ = _load(descriptors, scenarios)
    server = VirtualServer(catalog, compiled, journal_size=journal_size)
    details = type("Details", (), {"method": SAY, "invocation_metadata": ()})()
    handler = server.dispatcher.service(details)
    assert handler is not None and handler.unary_unary is not None
    unary = handler.unary_unary
    request = _say_bytes(catalog, **SAY_REQUEST)
    agent = f"grpc-python/{grpc.__version__} grpc-c/50.0.0 (linux; chttp2)"

    def one_round() -> None:
        for i in range(sessions):
            metadata = (
                (SCENARIO_HEADER, "static"),
                (SESSION_HEADER, f"session-{i:06d}"),
                ("user-agent", agent[:]),
            )
            reply = unary(bytes(bytearray(request)), _Context(metadata))  # fresh bytes, as grpc hands over
            if not reply:
                raise RuntimeError("the static rule did not answer")

    def settled_rss() -> int:
        gc.collect()
        return rss_bytes()

    rss0 = settled_rss()
    t0 = time.perf_counter()
    one_round()  # creates the sessions, one entry each
    rss1 = settled_rss()
    for _ in range(journal_size - 1):
        one_round()
    rss2 = settled_rss()
    seconds = time.perf_counter() - t0
    one_round()  # the rings are full: one more round must not grow memory
    rss3 = settled_rss()
    entries = len(server.journal)
    # Past the journal's total bound the least recently active sessions' journals are dropped whole.
    bound = server.journal.max_entries
    capped = sessions * journal_size > bound
    if not (bound - journal_size < entries <= bound if capped else entries == sessions * journal_size):
        raise RuntimeError(
            f"{entries} journal entries, expected {min(sessions * journal_size, bound)} "
            f"({sessions} sessions x {journal_size}, at most {bound} in all)"
        )
    # Per entry and per session only where nothing was dropped; a capped run shows the bound holding.
    per_entry = None if capped else (rss2 - rss1) / max(1, sessions * (journal_size - 1))
    per_session = None if per_entry is None else (rss1 - rss0) / sessions - per_entry
    return {
        "sessions": sessions,
        "journal_size": journal_size,
        "max_entries": bound,
        "capped": capped,
        "entries": entries,
        "calls": sessions * (journal_size + 1),
        "seconds": seconds,
        "rss_before": rss0,
        "rss_sessions": rss1,
        "rss_full": rss2,
        "rss_one_more_round": rss3,
        "rss_delta": rss2 - rss0,
        "bytes_per_entry": per_entry,
        "bytes_per_session": per_session,
        "bytes_per_full_session": (rss2 - rss0) / sessions,
        "request_bytes": len(request),
        "metadata_pairs": 3,
    }


def handler_cost(descriptors: Path, scenarios: Sequence[Path], calls: int) -> dict[str, Any]:
    """µs of virtsvc code per call (static, matched) and per streamed message, and where it goes."""
    import cProfile
    import pstats

    from virtsvc.server import VirtualServer

    catalog, compiled, _ = _load(descriptors, scenarios)
    server = VirtualServer(catalog, compiled)

    def method_handler(path: str) -> Any:
        details = type("Details", (), {"method": path, "invocation_metadata": ()})()
        found = server.dispatcher.service(details)
        assert found is not None
        return found

    say = method_handler(SAY).unary_unary
    stream = method_handler("/bench.v1.Echo/Stream").unary_stream
    cases = {
        "static": (say, _say_bytes(catalog, **SAY_REQUEST), "static"),
        "matched": (say, _say_bytes(catalog, name="bob", n=1, tenant="acme"), "matched"),
        "stream1000": (
            stream,
            catalog.method("bench.v1.Echo/Stream").input_class(count=1000).SerializeToString(),
            "stream1000",
        ),
    }
    out: dict[str, Any] = {}
    for name, (fn, request, scenario) in cases.items():
        metadata = ((SCENARIO_HEADER, scenario), ("user-agent", "bench"))
        is_stream = name.startswith("stream")
        n = max(1, calls // 200) if is_stream else calls

        def run(
            count: int,
            fn: Any = fn,
            request: bytes = request,
            metadata: Any = metadata,
            is_stream: bool = is_stream,
            name: str = name,
        ) -> int:
            messages = 0
            for _ in range(count):
                result = fn(bytes(bytearray(request)), _Context(metadata))
                if is_stream:
                    messages += sum(1 for _ in result)
                elif not result:
                    raise RuntimeError(f"{name}: no reply")
                else:
                    messages += 1
            return messages

        run(max(1, n // 10))  # warm-up
        t0 = time.process_time()
        messages = run(n)
        cpu = time.process_time() - t0
        profile = cProfile.Profile()
        profile.runcall(run, max(1, n // 2))
        stats = pstats.Stats(profile)
        table = stats.stats  # type: ignore[attr-defined]
        rows = sorted(table.items(), key=lambda kv: -kv[1][2])[:10]
        total = sum(v[2] for v in table.values()) or 1.0
        packages: dict[str, float] = {}
        for (file, _, _), (_, _, tt, _, _) in table.items():
            packages[_package(file)] = packages.get(_package(file), 0.0) + tt / total
        out[name] = {
            "by_package": dict(sorted(packages.items(), key=lambda kv: -kv[1])),
            "calls": n,
            "us_per_call": cpu / n * 1e6,
            "us_per_message": cpu / messages * 1e6,
            "top_own": [
                {
                    "function": f"{func} ({Path(file).parent.name}/{Path(file).name}:{line})",
                    "share": tt / total,
                }
                for (file, line, func), (_, _, tt, _, _) in rows
            ],
        }
    return out


def _package(file: str) -> str:
    parts = Path(file).parts
    for name in ("virtsvc", "jinja2", "protobuf", "grpc", "structlog"):
        if name in parts:
            return name
    if Path(file).name == "probes.py":
        return "bench driver"
    return "builtins" if file == "~" else "stdlib"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("probe", choices=("startup", "session", "memory", "handler"))
    parser.add_argument("--descriptors", type=Path, required=True)
    parser.add_argument("--scenarios", type=Path, nargs="+", default=[])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--journal-size", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args(argv)
    if args.probe == "startup":
        result = startup(args.descriptors, args.scenarios, args.repeats)
    elif args.probe == "session":
        result = session_rules(args.descriptors, args.scenarios, args.repeats)
    elif args.probe == "handler":
        result = handler_cost(args.descriptors, args.scenarios, args.calls)
    else:
        result = memory(args.descriptors, args.scenarios, args.sessions, args.journal_size)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
