"""A Python scenario script for tests/test_engine.py: handlers of every RPC kind, one that raises."""

import virtsvc
from virtsvc import Scenario

scenario = Scenario("scripted", version=2)


@scenario.handler("shop.v1.Inventory/GetItem")  # rule: explode
def explode(request, context):
    """Fails the way a buggy handler does."""
    raise ValueError(f"no stock data for {request.sku}")


@scenario.handler("shop.v1.Inventory/BulkUpdate")
def bulk(request_iterator, context):
    """Client streaming: reads every message."""
    skus = [r.sku for r in request_iterator]
    return {"accepted": len(skus), "rejectedSkus": skus[::-1]}


@scenario.handler("shop.v1.Orders/Track")
def track(request_iterator, context):
    """Bidi: answers each message, numbering them per session across calls."""
    state = virtsvc.session()
    for request in request_iterator:
        state["seen"] = state.get("seen", 0) + 1
        yield {"orderId": request.order_id, "text": f"{state['seen']}:{request.text}"}
