"""The core: dynamic servicers for every RPC kind, health and reflection, over real sockets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.scenarios import load_scenarios

SCENARIO = """
scenario: core
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: r-1, qtyReserved: 2}
  - method: shop.v1.Inventory/Ping
    reply: {}
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {sku: A, onHand: "5"}
      - reply: {sku: B, delta: "-1"}
  - method: shop.v1.Inventory/BulkUpdate
    reply: {accepted: "{{ requests | length }}"}
  - method: shop.v1.Orders/Track
    each_request: {reply: {orderId: "{{ request.order_id }}", text: "ack {{ request.text }}"}}
"""
MD = (("x-virtsvc-scenario", "core"),)


@pytest.fixture(scope="module")
def server(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualServer]:
    path = tmp_path_factory.mktemp("sc") / "core.yaml"
    path.write_text(SCENARIO)
    with VirtualServer(catalog, load_scenarios([path], catalog)) as srv:
        yield srv


@pytest.fixture
def channel(server: VirtualServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def test_unary_with_generated_stub(channel: grpc.Channel, generated: Path) -> None:
    """A unary call through the user's generated stub answers the scenario's reply."""
    from shop.v1 import inventory_pb2, inventory_pb2_grpc

    reply = inventory_pb2_grpc.InventoryStub(channel).Reserve(
        inventory_pb2.ReserveRequest(sku="ABC-1", qty=2), metadata=MD, timeout=5
    )
    assert reply == inventory_pb2.ReserveResponse(reservation_id="r-1", qty_reserved=2)


def test_well_known_empty(channel: grpc.Channel, generated: Path) -> None:
    """Methods taking and returning google.protobuf.Empty work like any other."""
    from shop.v1 import inventory_pb2_grpc

    assert inventory_pb2_grpc.InventoryStub(channel).Ping(empty_pb2.Empty(), metadata=MD) == empty_pb2.Empty()


def test_server_streaming(channel: grpc.Channel, generated: Path) -> None:
    """A server stream sends each listed message in order, then OK."""
    from shop.v1 import inventory_pb2, inventory_pb2_grpc

    events = list(inventory_pb2_grpc.InventoryStub(channel).Watch(inventory_pb2.WatchRequest(), metadata=MD))
    assert [(e.sku, e.on_hand, e.WhichOneof("change")) for e in events] == [("A", 5, None), ("B", 0, "delta")]
    assert events[1].delta == -1


def test_client_streaming(channel: grpc.Channel, generated: Path) -> None:
    """A client stream is read to its end and answered once; templates see every request."""
    from shop.v1 import inventory_pb2, inventory_pb2_grpc

    counts = [inventory_pb2.StockCount(sku=f"S{i}", count=i) for i in range(7)]
    summary = inventory_pb2_grpc.InventoryStub(channel).BulkUpdate(iter(counts), metadata=MD)
    assert summary.accepted == 7


def test_bidi_streaming(channel: grpc.Channel, generated: Path) -> None:
    """A bidi call answers each incoming message as it arrives."""
    from shop.v1 import orders_pb2, orders_pb2_grpc

    requests = [orders_pb2.TrackRequest(order_id=f"o-{i}", text=f"m{i}") for i in range(3)]
    updates = list(orders_pb2_grpc.OrdersStub(channel).Track(iter(requests), metadata=MD))
    assert [(u.order_id, u.text) for u in updates] == [
        ("o-0", "ack m0"),
        ("o-1", "ack m1"),
        ("o-2", "ack m2"),
    ]


def test_unknown_method_names_it(channel: grpc.Channel) -> None:
    """A method the descriptors do not hold answers UNIMPLEMENTED naming it and the services served."""
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/shop.v1.Inventory/Nope")(b"", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == (
        "unknown method /shop.v1.Inventory/Nope: this virtual server does not serve it; "
        "its services are: shop.v1.Inventory, shop.v1.Orders, shop.v1.Payments"
    )


def test_health_serving(channel: grpc.Channel) -> None:
    """Health answers SERVING for the server and for each virtual service once ready."""
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "shop.v1.Inventory", "grpc.health.v1.Health"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == (
            health_pb2.HealthCheckResponse.SERVING
        )


def test_health_not_serving_while_draining(catalog: Catalog) -> None:
    """During a graceful stop health reports NOT_SERVING."""
    server = VirtualServer(catalog).start()
    server.health.enter_graceful_shutdown()
    with grpc.insecure_channel(server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="")).status
    server.stop(0)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_and_describes(channel: grpc.Channel) -> None:
    """grpcio-reflection's own client lists the services and describes methods and messages."""
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {
        "shop.v1.Inventory",
        "shop.v1.Payments",
        "shop.v1.Orders",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    file = db.FindFileContainingSymbol("shop.v1.Inventory.Watch")  # a method symbol, as grpcurl asks
    assert file.name == "shop/v1/inventory.proto"
    service = next(s for s in file.service if s.name == "Inventory")
    watch = next(m for m in service.method if m.name == "Watch")
    assert watch.server_streaming and watch.input_type == ".shop.v1.WatchRequest"
    # Dependencies resolve through reflection too (grpcurl fetches them to describe messages).
    assert db.FindFileByName("common/v1/types.proto").package == "common.v1"
    assert db.FindFileByName("google/protobuf/timestamp.proto").package == "google.protobuf"


@pytest.mark.parametrize(
    "symbol",
    [
        "grpc.health.v1.Health",
        "google.rpc.Status",
        "google.rpc.RetryInfo",
        "grpc.reflection.v1.ServerReflection",
    ],
)
def test_reflection_resolves_service_support_types(channel: grpc.Channel, symbol: str) -> None:
    """Health, google.rpc error details and reflection itself are describable, so grpcurl can decode them."""
    db = ProtoReflectionDescriptorDatabase(channel)
    assert db.FindFileContainingSymbol(symbol).name


def test_reflection_v1_protocol(channel: grpc.Channel) -> None:
    """The v1 path answers too (grpcurl and Postman try v1 first)."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(
        call(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="shop.v1.Payments.Charge"),
                ]
            ),
            timeout=5,
        )
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert "shop.v1.Payments" in names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in responses[1].file_descriptor_response.file_descriptor_proto
    ]
    assert "shop/v1/payments.proto" in [f.name for f in files]


def test_serving_needs_no_generated_modules(catalog: Catalog) -> None:
    """Message classes come from the descriptors: the catalog's types live in its own pool."""
    spec = catalog.method("/shop.v1.Inventory/Reserve")
    assert spec.kind == "unary"
    assert spec.input_class.DESCRIPTOR.file.pool is catalog.pool
    assert catalog.method("shop.v1.Orders.Track").kind == "bidi_streaming"
    with pytest.raises(KeyError, match=re.escape('did you mean "shop.v1.Inventory/Reserve"')):
        catalog.method("shop.v1.Inventory/Reserv")
