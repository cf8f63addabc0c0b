"""A Python scenario script: rules built in code, and handlers with grpcio's servicer signature.

Module-level Scenario objects are collected. A handler returns a dict (proto3 JSON) or a message, yields
for server and bidi streams, may keep per-session state in ``virtsvc.session()`` and may abort with any
status through ``context``.
"""

import grpc

import virtsvc
from virtsvc import Scenario

scenario = Scenario("interop", version=1, description="stateful handlers written in Python")

scenario.on("shop.v1.Inventory/Ping").reply({})


@scenario.handler("shop.v1.Inventory/Reserve")
def reserve(request, context):
    """Keeps a running total per session and refuses past 10 units."""
    state = virtsvc.session()
    state["reserved"] = state.get("reserved", 0) + request.qty
    if state["reserved"] > 10:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"only 10 units, {state['reserved']} asked")
    return {"reservationId": f"r-{state['reserved']}", "qtyReserved": request.qty}


@scenario.handler("shop.v1.Inventory/Watch")
def watch(request, context):
    """Streams one event per requested SKU."""
    for i, sku in enumerate(request.skus):
        yield {"sku": sku, "onHand": str(10 - i)}
