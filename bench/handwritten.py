"""The baselines: a hand-written sync grpcio servicer of bench.proto, and a generic-handler server.

``--mode servicer``: what a person would write with generated stubs. ``Say`` does the work of the
``matched`` scenario by hand (read name and tenant, compare, format the reply) and answers like the
``static`` scenario otherwise; ``Stream`` yields ``count`` replies.

``--mode generic``: one generic handler, no (de)serialisers, answers pre-serialised bytes: the floor of
what a Python grpcio server costs per call.

``--mode aio-generic``: the same generic handler on grpc.aio, to choose between the two servers by
measurement.

``--redis URL`` (servicer mode): ``Say`` also counts the call in Redis first (``INCR`` of a key per
``x-virtsvc-session``, redis-py with hiredis), as a hand-written service keeping its state in a shared
Redis would: the floor for a server that makes one Redis round trip per call.

Both use the thread pool size of virtsvc's own server (``VirtualServer``'s ``max_workers`` default).
The stubs are compiled into a temporary directory at start. Prints ``{"event": "serving", "port": N}``
on stdout once it accepts calls; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import STREAM_COUNT, compile_stubs


def virtsvc_workers() -> int:
    """The thread pool size virtsvc's server uses by default (64 when virtsvc cannot be imported)."""
    try:
        from virtsvc.server import ServeOptions
    except ImportError:
        try:  # a tree from before ServeOptions: the default was VirtualServer's keyword
            from virtsvc.server import VirtualServer
        except ImportError:
            return 64
        return int(inspect.signature(VirtualServer.__init__).parameters["max_workers"].default)
    return ServeOptions().max_workers


def servicer_server(pb2: Any, pb2_grpc: Any, workers: int, redis_url: str | None = None) -> grpc.Server:
    client = None
    if redis_url is not None:
        import redis

        client = redis.Redis.from_url(redis_url)

    class Echo(pb2_grpc.EchoServicer):  # type: ignore[misc,name-defined]
        def Say(self, request: Any, context: grpc.ServicerContext) -> Any:
            if client is not None:
                session = dict(context.invocation_metadata()).get("x-virtsvc-session", "")
                client.incr(f"bench:{{{session}}}:calls")
            if request.name == "bob" and request.tenant == "acme":
                return pb2.SayReply(text=f"hi {request.name}", n=request.n + 1)
            return pb2.SayReply(text="hello", n=1)

        def Stream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            for _ in range(request.count):
                yield pb2.SayReply(text="m")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="handwritten"))
    pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    return server


def generic_server(pb2: Any, workers: int) -> grpc.Server:
    static = pb2.SayReply(text="hello", n=1).SerializeToString()
    item = pb2.SayReply(text="m").SerializeToString()

    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return static

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in range(STREAM_COUNT):
            yield item

    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generic"))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.v1.Echo", handlers)])
    return server


async def _serve_aio(pb2: Any, host: str, port: int, stop: threading.Event) -> None:
    """The generic handler on grpc.aio: the same pre-serialised answer from a coroutine."""
    static = pb2.SayReply(text="hello", n=1).SerializeToString()
    item = pb2.SayReply(text="m").SerializeToString()

    async def say(request: bytes, context: Any) -> bytes:
        return static

    async def stream(request: bytes, context: Any) -> Any:
        for _ in range(STREAM_COUNT):
            yield item

    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.v1.Echo", handlers)])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(json.dumps({"event": "serving", "port": bound, "mode": "aio-generic"}), flush=True)
    while not stop.is_set():
        await asyncio.sleep(0.5)
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("servicer", "generic", "aio-generic"), default="servicer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-workers", type=int, default=None, help="default: virtsvc's own default")
    parser.add_argument("--redis", metavar="URL", help="servicer mode: count each call in this Redis first")
    args = parser.parse_args(argv)
    if args.redis and args.mode != "servicer":
        parser.error("--redis goes with --mode servicer")
    workers = args.max_workers or virtsvc_workers()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="bench-stubs-") as tmp:
        pb2, pb2_grpc = compile_stubs(Path(tmp))
        if args.mode == "aio-generic":
            asyncio.run(_serve_aio(pb2, args.host, args.port, stop))
            return 0
        server = (
            servicer_server(pb2, pb2_grpc, workers, args.redis)
            if args.mode == "servicer"
            else generic_server(pb2, workers)
        )
        port = server.add_insecure_port(f"{args.host}:{args.port}")
        server.start()
        print(
            json.dumps({"event": "serving", "port": port, "mode": args.mode, "workers": workers}), flush=True
        )
        while not stop.wait(0.5):
            pass
        server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
