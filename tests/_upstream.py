"""A real upstream for passthrough and recording tests: a hand-written grpcio servicer of protos/ (shop.v1
Inventory, Orders and Payments, with generated stubs) on loopback, with reflection (v1 and v1alpha).

Its answers carry what forwarding must keep: initial metadata, trailing metadata, rich error details, enum,
map, bytes and nested fields, and counters (so identical requests get different answers).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status


def every_kind(
    pb: SimpleNamespace, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> list:
    """One call of each RPC kind (and a rich error), as the caller sees them: messages, headers, trailers,
    status, details."""
    inv = pb.inv_grpc.InventoryStub(channel)
    orders = pb.orders_grpc.OrdersStub(channel)
    seen: list[Any] = []

    def outcome(call: Any, replies: Any) -> None:
        seen.append(
            (
                [r.SerializeToString() for r in replies],
                tuple(call.initial_metadata() or ()),
                tuple(call.trailing_metadata() or ()),
                call.code(),
                call.details(),
            )
        )

    reply, call = inv.Reserve.with_call(pb.inv.ReserveRequest(sku="A", qty=2), metadata=metadata, timeout=5)
    outcome(call, [reply])
    try:
        inv.Reserve(pb.inv.ReserveRequest(sku="NONE"), metadata=metadata, timeout=5)
    except grpc.RpcError as err:
        outcome(err, [])
        status = rpc_status.from_call(err)
        assert status is not None
        seen.append([d.SerializeToString() for d in status.details])
    stream = inv.Watch(pb.inv.WatchRequest(skus=["a", "b", "c"]), metadata=metadata, timeout=5)
    outcome(stream, list(stream))
    counts = [pb.inv.StockCount(sku="a", count=1), pb.inv.StockCount(sku="b", count=-1)]
    reply, call = inv.BulkUpdate.with_call(iter(counts), metadata=metadata, timeout=5)
    outcome(call, [reply])
    track = orders.Track(
        iter(
            [
                pb.orders.TrackRequest(order_id="o1", text="hi"),
                pb.orders.TrackRequest(order_id="o1", text="ho"),
            ]
        ),
        metadata=metadata,
        timeout=5,
    )
    outcome(track, list(track))
    return seen


class Upstream:
    """The running real service: ``address``, ``port``, and ``seen`` (the metadata of every call)."""

    def __init__(self, server: grpc.Server, port: int, seen: list[dict[str, Any]]) -> None:
        self.server = server
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.seen = seen

    def stop(self) -> None:
        self.server.stop(0).wait()


def _seen(context: grpc.ServicerContext, seen: list[dict[str, Any]], method: str) -> dict[str, Any]:
    metadata = dict(context.invocation_metadata())
    seen.append({"method": method, "metadata": metadata, "timeout": context.time_remaining()})
    return metadata


def start_upstream(pb: SimpleNamespace, port: int = 0, *, variant: str = "v1") -> Upstream:
    """Starts the real service on 127.0.0.1 (``port`` 0 picks one). ``variant`` changes some answers, as a
    new release of the service would."""
    seen: list[dict[str, Any]] = []
    counter = itertools.count(1)
    lock = threading.Lock()

    def next_n() -> int:
        with lock:
            return next(counter)

    class Inventory(pb.inv_grpc.InventoryServicer):  # type: ignore[name-defined,misc]
        def Reserve(self, request: Any, context: grpc.ServicerContext) -> Any:
            md = _seen(context, seen, "Reserve")
            context.send_initial_metadata(
                (
                    ("x-real", "inventory"),
                    ("x-seen-tenant", md.get("x-tenant", "")),
                    ("set-cookie", "sid=s3cr3t"),
                )
            )
            if request.sku == "NONE":
                detail = any_pb2.Any()
                detail.Pack(
                    error_details_pb2.ErrorInfo(reason="OUT_OF_STOCK", domain="inventory.example.com")
                )
                context.set_trailing_metadata((("x-trace", "t-none"),))
                context.abort_with_status(
                    rpc_status.to_status(
                        status_pb2.Status(
                            code=code_pb2.RESOURCE_EXHAUSTED, message="no stock for NONE", details=[detail]
                        )
                    )
                )
            context.set_trailing_metadata((("x-trace", f"t-{request.sku}"), ("x-api-key", "k-12345")))
            prefix = "real" if variant == "v1" else "real2"
            return pb.inv.ReserveResponse(
                reservation_id=f"{prefix}-{request.sku}-{request.qty}", qty_reserved=request.qty
            )

        def GetItem(self, request: Any, context: grpc.ServicerContext) -> Any:
            _seen(context, seen, "GetItem")
            if request.sku == "MISSING":
                context.abort(grpc.StatusCode.NOT_FOUND, f"no item {request.sku}")
            n = next_n()
            return pb.inv.Item(
                sku=request.sku,
                title="Widget",
                on_hand=n,
                availability=pb.inv.Item.IN_STOCK,
                dimensions=pb.inv.Item.Dimensions(width_cm=1.5, height_cm=2.0),
                tags=["a", "b"],
                stock_by_warehouse={"w1": 3},
                thumbnail=b"\x00\x01png",
            )

        def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            _seen(context, seen, "Watch")
            context.send_initial_metadata((("x-real", "watch"),))
            for i, sku in enumerate(request.skus):
                yield pb.inv.StockEvent(sku=sku, on_hand=10 + i, delta=i + 1)
            context.set_trailing_metadata((("x-count", str(len(request.skus))),))

        def BulkUpdate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            _seen(context, seen, "BulkUpdate")
            accepted, rejected = 0, []
            for item in request_iterator:
                if item.count < 0:
                    rejected.append(item.sku)
                else:
                    accepted += 1
            context.set_trailing_metadata((("x-accepted", str(accepted)),))
            return pb.inv.BulkUpdateSummary(accepted=accepted, rejected=len(rejected), rejected_skus=rejected)

        def Ping(self, request: Any, context: grpc.ServicerContext) -> Any:
            md = _seen(context, seen, "Ping")
            if "x-sleep" in md:
                time.sleep(float(md["x-sleep"]))
            if "x-wait" in md:  # waits until the call ends, and notes that it was cancelled
                ended = threading.Event()
                context.add_callback(ended.set)
                ended.wait(float(md["x-wait"]))
                seen[-1]["cancelled"] = not context.is_active()
            return empty_pb2.Empty()

    class Orders(pb.orders_grpc.OrdersServicer):  # type: ignore[name-defined,misc]
        def Track(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            _seen(context, seen, "Track")
            context.send_initial_metadata((("x-real", "track"),))
            for i, item in enumerate(request_iterator):
                yield pb.orders.TrackUpdate(
                    order_id=item.order_id, text=f"{item.text} #{i}", state=pb.orders.Order.SHIPPED
                )

        def GetOrder(self, request: Any, context: grpc.ServicerContext) -> Any:
            _seen(context, seen, "GetOrder")
            return pb.orders.Order(order_id=request.order_id, state=pb.orders.Order.CONFIRMED)

    class Payments(pb.pay_grpc.PaymentsServicer):  # type: ignore[name-defined,misc]
        def Charge(self, request: Any, context: grpc.ServicerContext) -> Any:
            md = _seen(context, seen, "Charge")
            context.send_initial_metadata((("authorization", "Bearer up-secret"),))
            return pb.pay.ChargeResponse(
                charge_id=f"ch-{request.account}-{md.get('x-tenant', '')}",
                outcome=pb.pay.ChargeResponse.APPROVED,
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb.inv_grpc.add_InventoryServicer_to_server(Inventory(), server)
    pb.orders_grpc.add_OrdersServicer_to_server(Orders(), server)
    pb.pay_grpc.add_PaymentsServicer_to_server(Payments(), server)
    names = [
        pb.inv.DESCRIPTOR.services_by_name["Inventory"].full_name,
        pb.orders.DESCRIPTOR.services_by_name["Orders"].full_name,
        pb.pay.DESCRIPTOR.services_by_name["Payments"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"cannot bind 127.0.0.1:{port}"
    server.start()
    return Upstream(server, bound, seen)


# -- `virtsvc serve` and `virtsvc record` as real subprocesses --------------------------------------------


class Process:
    """A virtsvc subprocess logging JSON lines: its ``serving`` event, its lines, a clean stop."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.process = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_serving(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == "serving":
                    self.ready = event
                    return event
            if self.process.poll() is not None:
                time.sleep(0.1)
                raise AssertionError(f"{self.argv[1:3]} exited {self.process.returncode}: {self.lines}")
            time.sleep(0.02)
        raise AssertionError(f"never served: {self.lines}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ready['port']}"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def virtsvc_command() -> list[str]:
    script = shutil.which("virtsvc")
    return [script] if script else [sys.executable, "-m", "virtsvc.cli"]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(*args)`` runs ``virtsvc --log-format json ARGS`` (not yet waited on); killed at teardown."""
    started: list[Process] = []

    def start(*args: str, cwd: Path | None = None) -> Process:
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        process = Process([*virtsvc_command(), "--log-format", "json", *args], cwd or tmp_path, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def run_virtsvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``virtsvc ARGS`` to completion."""
    return subprocess.run([*virtsvc_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
