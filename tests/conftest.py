"""Shared fixtures: the example estate compiled once per test process, and servers on loopback port 0."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from _redis import redis_cluster, redis_cluster_url, redis_server, redis_url  # noqa: F401 - real Redis
from _upstream import spawn  # noqa: F401 - a fixture: virtsvc serve/record as real processes
from _workers import launch  # noqa: F401 - a fixture: commands (serve --workers) whose processes are stopped

from virtsvc.contracts import Catalog
from virtsvc.contracts import protoc as _protoc
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SCENARIOS = ROOT / "scenarios"


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``virtsvc gen protos/`` into a temporary OUT, importable (``from shop.v1 import inventory_pb2``)."""
    out = tmp_path_factory.mktemp("generated")
    _protoc.generate(PROTOS, out)
    sys.path.insert(0, str(out))
    return out


@pytest.fixture(scope="session")
def catalog(generated: Path) -> Catalog:
    return Catalog.from_file(generated / "descriptors.binpb")


@pytest.fixture
def channel_to() -> Iterator[object]:
    """``channel_to(address)`` opens a channel closed at teardown."""
    channels: list[grpc.Channel] = []

    def open_channel(address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


@pytest.fixture(scope="session")
def pb(generated: Path) -> SimpleNamespace:
    """The estate's generated modules: ``pb.inv.ReserveRequest``, ``pb.pay_grpc.PaymentsStub``..."""
    from common.v1 import money_pb2, types_pb2
    from shop.v1 import (
        inventory_pb2,
        inventory_pb2_grpc,
        orders_pb2,
        orders_pb2_grpc,
        payments_pb2,
        payments_pb2_grpc,
    )

    return SimpleNamespace(
        inv=inventory_pb2,
        inv_grpc=inventory_pb2_grpc,
        orders=orders_pb2,
        orders_grpc=orders_pb2_grpc,
        pay=payments_pb2,
        pay_grpc=payments_pb2_grpc,
        money=money_pb2,
        types=types_pb2,
    )


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    """A channel to the module's own ``server`` fixture."""
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def inv(channel: grpc.Channel, pb: SimpleNamespace) -> Any:
    return pb.inv_grpc.InventoryStub(channel)


@pytest.fixture(scope="module")
def pay(channel: grpc.Channel, pb: SimpleNamespace) -> Any:
    return pb.pay_grpc.PaymentsStub(channel)


@pytest.fixture(scope="module")
def orders(channel: grpc.Channel, pb: SimpleNamespace) -> Any:
    return pb.orders_grpc.OrdersStub(channel)


@pytest.fixture
def sid() -> str:
    """A session id of this test's own: state never leaks between tests sharing a server."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_server(catalog: Catalog) -> Iterator[Callable[..., VirtualServer]]:
    """Starts servers of the example catalog on loopback port 0 (``VirtualServer`` options as keywords);
    all are stopped at the end."""
    started: list[VirtualServer] = []

    def start(scenarios: Any = (), **options: Any) -> VirtualServer:
        server = VirtualServer(catalog, scenarios, port=0, **options).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop(0)
