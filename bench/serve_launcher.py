"""A stand-in for ``virtsvc serve`` on a tree that does not have it yet (run.py uses the real one when
``virtsvc serve --help`` works).

Same flags as the subset of ``virtsvc serve`` the benchmark uses; serves through
``virtsvc.server.assembly.serve_in_process`` and prints the same ``{"event": "serving", "port": N}`` line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--protos", type=Path)
    source.add_argument("--descriptors", type=Path)
    parser.add_argument("--scenarios", type=Path, nargs="+", action="extend", default=[])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--journal-size", type=int, default=500)
    parser.add_argument("--log-format", default="json")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once the scenarios are loaded (to measure what the cyclic GC costs per call)",
    )
    args = parser.parse_args(argv)

    from virtsvc import serve_in_process

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with serve_in_process(
        protos=args.protos,
        scenarios=args.scenarios,
        descriptors=args.descriptors,
        host=args.host,
        port=args.port,
        journal_size=args.journal_size,
    ) as server:
        if args.gc_freeze:
            import gc

            gc.collect()
            gc.freeze()
        print(json.dumps({"event": "serving", "port": server.port, "launcher": "bench"}), flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
