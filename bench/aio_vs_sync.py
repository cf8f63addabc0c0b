"""Sync grpc.server against grpc.aio, the same generic handler answering pre-serialised bytes, under the
same h2load load: the measurement behind virtsvc's choice of the sync server.

    python bench/aio_vs_sync.py [--requests N] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import compile_stubs, grpc_frame, run_h2load, server_processes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aio-vs-sync-") as tmp:
        pb2, _ = compile_stubs(Path(tmp))
        body = Path(tmp) / "say.bin"
        body.write_bytes(grpc_frame(pb2.SayRequest(name="alice", n=1, tenant="acme").SerializeToString()))
        headers = {"content-type": "application/grpc", "te": "trailers"}
        modes = ("generic", "aio-generic")
        specs = [(m, [sys.executable, str(HERE / "handwritten.py"), "--mode", m]) for m in modes]
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        with server_processes(specs) as servers:
            for _ in range(args.repeats):
                for mode, server in zip(modes, servers, strict=True):
                    url = f"http://127.0.0.1:{server.port}/bench.v1.Echo/Say"
                    result = run_h2load(
                        url,
                        body,
                        headers,
                        requests=args.requests,
                        clients=4,
                        streams=16,
                        server_pid=server.proc.pid,
                    )
                    cpu = (result.cpu_seconds or 0.0) / max(result.succeeded, 1) * 1e6
                    runs[mode].append((result.rps, cpu))
    base = statistics.median(r for r, _ in runs["generic"])
    print(f"{'server':28} {'calls/s':>9} {'ratio':>6} {'CPU us/call':>12}")
    for mode in modes:
        rps = statistics.median(r for r, _ in runs[mode])
        cpu = statistics.median(c for _, c in runs[mode])
        print(f"{mode:28} {rps:9,.0f} {rps / base:5.2f}x {cpu:12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
