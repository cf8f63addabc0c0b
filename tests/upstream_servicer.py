"""A real shop.v1 service built from whatever proto tree a test compiled: a hand-written grpcio servicer.

Unlike ``_upstream`` (generated stubs of ``protos/``), its message classes come from a Catalog, so a test can
run the service of a changed contract (a field renamed, an enum value removed) and compare it with
scenarios written against the original. ``variant`` changes behaviour as a new release would: ``renamed``
(Item.title is sent as Item.name), ``status`` (an unknown item is INVALID_ARGUMENT, not NOT_FOUND),
``no-backorder`` (nothing is on backorder any more). It offers reflection (v1alpha) of the catalog it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_reflection.v1alpha import reflection

from virtsvc.contracts.catalog import Catalog, MethodSpec

Json = dict[str, Any]


class CatalogUpstream:
    """The running service: ``address`` and ``seen`` (method and metadata of every call)."""

    def __init__(self, catalog: Catalog, variant: frozenset[str], *, with_reflection: bool = True) -> None:
        self.catalog = catalog
        self.variant = variant
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for name, answer in self._answers().items():
            spec = catalog.method(name)
            handlers.setdefault(spec.service, {})[spec.name] = _handler(spec, answer, self.seen)
        for service, methods in handlers.items():
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        if with_reflection:
            reflection.enable_server_reflection(
                [*handlers, reflection.SERVICE_NAME], self.server, catalog.pool
            )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait()

    # -- behaviour ----------------------------------------------------------------------------------

    def _answers(self) -> dict[str, Callable[..., Any]]:
        v = self.variant

        def get_item(request: Json, metadata: dict[str, str], context: grpc.ServicerContext) -> Json:
            sku = request.get("sku", "")
            if sku == "MISSING":
                if "status" in v:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad sku {sku}")
                context.abort(grpc.StatusCode.NOT_FOUND, f"no item {sku}")
            backorder = sku.startswith("B") and "no-backorder" not in v
            return {
                "sku": sku,
                ("name" if "renamed" in v else "title"): "Widget",
                "onHand": "5",
                "availability": "BACKORDER" if backorder else "IN_STOCK",
                "tags": ["a", "b"],
                "stockByWarehouse": {"w1": "3"},
                "dimensions": {"widthCm": 1.5},
            }

        def watch(request: Json, metadata: dict[str, str], context: grpc.ServicerContext) -> Iterator[Json]:
            for i, sku in enumerate(request.get("skus", [])):
                yield {"sku": sku, "onHand": str(10 + i), "delta": str(i + 1)}

        def bulk_update(
            requests: Iterator[Json], metadata: dict[str, str], context: grpc.ServicerContext
        ) -> Json:
            counts = list(requests)
            rejected = [c["sku"] for c in counts if int(c.get("count", "0")) < 0]
            return {
                "accepted": len(counts) - len(rejected),
                "rejected": len(rejected),
                "rejectedSkus": rejected,
            }

        def track(
            requests: Iterator[Json], metadata: dict[str, str], context: grpc.ServicerContext
        ) -> Iterator[Json]:
            for i, item in enumerate(requests):
                yield {
                    "orderId": item.get("orderId", ""),
                    "text": f"{item.get('text', '')} #{i}",
                    "state": "SHIPPED",
                }

        def reserve(request: Json, metadata: dict[str, str], context: grpc.ServicerContext) -> Json:
            tenant = metadata.get("x-tenant", "none")
            return {
                "reservationId": f"r-{request.get('sku', '')}-{tenant}",
                "qtyReserved": request.get("qty", 0),
            }

        def ping(request: Json, metadata: dict[str, str], context: grpc.ServicerContext) -> Json:
            return {}

        return {
            "shop.v1.Inventory/GetItem": get_item,
            "shop.v1.Inventory/Watch": watch,
            "shop.v1.Inventory/BulkUpdate": bulk_update,
            "shop.v1.Orders/Track": track,
            "shop.v1.Inventory/Reserve": reserve,
            "shop.v1.Inventory/Ping": ping,
        }


def _handler(spec: MethodSpec, answer: Callable[..., Any], seen: list[tuple[str, dict[str, str]]]) -> Any:
    """A grpc method handler of ``spec``'s kind: requests in as proto3 JSON, answers out from JSON."""

    def decode(raw: bytes) -> Json:
        return json_format.MessageToDict(spec.input_class.FromString(raw))

    def encode(data: Json) -> bytes:
        return json_format.ParseDict(data, spec.output_class()).SerializeToString()

    def note(context: grpc.ServicerContext) -> dict[str, str]:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        seen.append((spec.full_name, metadata))
        return metadata

    if spec.kind == "unary":
        return grpc.unary_unary_rpc_method_handler(
            lambda raw, context: encode(answer(decode(raw), note(context), context))
        )
    if spec.kind == "server_streaming":
        return grpc.unary_stream_rpc_method_handler(
            lambda raw, context: (encode(m) for m in answer(decode(raw), note(context), context))
        )
    if spec.kind == "client_streaming":
        return grpc.stream_unary_rpc_method_handler(
            lambda raws, context: encode(answer((decode(r) for r in raws), note(context), context))
        )
    return grpc.stream_stream_rpc_method_handler(
        lambda raws, context: (encode(m) for m in answer((decode(r) for r in raws), note(context), context))
    )
