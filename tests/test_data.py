"""Data sets: a scenario's ``data:`` collections read by its rules' templates, changed per session by Python
handlers, restored by a reset, checked by ``virtsvc check``; served by real grpc servers on loopback."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog
from virtsvc.engine.store import Store
from virtsvc.errors import ScenarioError
from virtsvc.scenarios.loader import check_paths, load_scenarios
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent

SHOP = """\
scenario: shop-data
data:
  items:
    key: sku
    type: shop.v1.Item
    records:
      - {sku: LAMP-1, title: Desk lamp, onHand: 4, tags: [home]}
      - {sku: CHAIR-2, title: Chair, on_hand: 0}
  orders:
    key: order_id
    $generate:
      type: shop.v1.Order
      count: 6
      seed: 3
      override:
        lines: [{sku: "{{ pick(data.items).sku }}", qty: 1}]
        customer_id: "cust-{{ index % 2 }}"
rules:
  - method: shop.v1.Inventory/GetItem
    reply: "{{ data.items[request.sku] }}"
  - method: shop.v1.Inventory/ListItems
    when: {request: {tags: [in-stock]}}
    reply: {items: "{{ data.items | selectattr('onHand') | list }}"}
  - method: shop.v1.Inventory/ListItems
    reply: {items: "{{ data.items | list }}"}
  - method: shop.v1.Orders/GetOrder
    reply: "{{ data.orders[request.order_id] }}"
"""

# Handlers change the session's data: PlaceOrder puts an order, Refund (of an order id) removes it.
HANDLERS = """\
import virtsvc
from virtsvc import Scenario

scenario = Scenario("shop-handlers", extends="shop-data")

@scenario.handler("shop.v1.Orders/PlaceOrder")
def place(request, context):
    orders = virtsvc.data("orders")
    order = {"order_id": f"new-{len(orders)}", "customer_id": request.customer_id,
             "state": "PENDING", "lines": [{"sku": l.sku, "qty": l.qty} for l in request.lines]}
    for line in request.lines:
        virtsvc.data("items")[line.sku]  # NOT_FOUND for an unknown item, as a real service answers
    return orders.put(order)

@scenario.handler("shop.v1.Payments/Refund")
def refund(request, context):
    removed = virtsvc.data().orders.remove(request.charge_id)
    return {"refund_id": "gone" if removed else "none"}
"""


def _md(scenario: str, session: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "shop.yaml").write_text(SHOP)
    (root / "handlers.py").write_text(HANDLERS)
    return root


def _serve(catalog: Catalog, files: Path, store: Store | None = None) -> VirtualServer:
    return VirtualServer(catalog, load_scenarios([files], catalog), store=store, admin=True)


@pytest.fixture(scope="module")
def server(catalog: Catalog, files: Path) -> Iterator[VirtualServer]:
    with _serve(catalog, files) as srv:
        yield srv


def test_list_get_and_foreign_keys_agree(
    catalog: Catalog, files: Path, channel: grpc.Channel, pb: Any, sid: str
) -> None:
    """ListItems, GetItem and GetOrder answer from one data set: every listed item is found by its sku with
    the same fields, and every order's lines name skus ListItems lists."""
    inv = pb.inv_grpc.InventoryStub(channel)
    orders = pb.orders_grpc.OrdersStub(channel)
    md = _md("shop-data", sid)
    listed = inv.ListItems(pb.inv.ListItemsRequest(), metadata=md, timeout=10).items
    assert [i.sku for i in listed] == ["LAMP-1", "CHAIR-2"]
    for item in listed:
        assert inv.GetItem(pb.inv.GetItemRequest(sku=item.sku), metadata=md, timeout=10) == item
    assert listed[0].on_hand == 4 and list(listed[0].tags) == ["home"]
    in_stock = inv.ListItems(pb.inv.ListItemsRequest(tags=["in-stock"]), metadata=md, timeout=10).items
    assert [i.sku for i in in_stock] == ["LAMP-1"]
    skus = {i.sku for i in listed}
    ids = _order_ids(catalog, files)
    assert len(ids) == 6
    for order_id in ids:
        order = orders.GetOrder(pb.orders.GetOrderRequest(order_id=order_id), metadata=md, timeout=10)
        assert order.order_id == order_id and order.lines and {line.sku for line in order.lines} <= skus
        assert order.customer_id in ("cust-0", "cust-1")


def _order_ids(catalog: Catalog, files: Path) -> list[str]:
    """The ids of the generated orders, as loading the scenario makes them."""
    (shop,) = [s for s in load_scenarios([files], catalog) if s.name == "shop-data"]
    assert shop.data is not None
    return list(shop.data["orders"].index)


def test_a_key_that_is_not_there_is_not_found(channel: grpc.Channel, pb: Any, sid: str) -> None:
    """A Get of an unknown key answers NOT_FOUND naming the collection, the key field and the closest key."""
    inv = pb.inv_grpc.InventoryStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        inv.GetItem(pb.inv.GetItemRequest(sku="LAMP-2"), metadata=_md("shop-data", sid), timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert info.value.details() == 'data.items has no record with sku "LAMP-2"; did you mean "LAMP-1"?'


def test_handler_put_then_get_agrees_per_session_and_a_reset_restores(
    catalog: Catalog, files: Path, channel: grpc.Channel, pb: Any, sid: str
) -> None:
    """A handler's put is seen by the next Get of the same session only; remove takes it away again; a
    reset (admin ResetSession) brings the initial data back."""
    orders = pb.orders_grpc.OrdersStub(channel)
    pay = pb.pay_grpc.PaymentsStub(channel)
    md = _md("shop-handlers", sid)
    line = pb.orders.OrderLine(sku="LAMP-1", qty=2)
    placed = orders.PlaceOrder(
        pb.orders.PlaceOrderRequest(customer_id="ada", lines=[line]), metadata=md, timeout=10
    )
    assert placed.order_id == "new-6" and placed.state == pb.orders.Order.PENDING
    got = orders.GetOrder(pb.orders.GetOrderRequest(order_id="new-6"), metadata=md, timeout=10)
    assert got == placed and got.customer_id == "ada" and got.lines[0].qty == 2
    other = _md("shop-handlers", sid + "-other")
    with pytest.raises(grpc.RpcError) as info:
        orders.GetOrder(pb.orders.GetOrderRequest(order_id="new-6"), metadata=other, timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND

    first = _order_ids(catalog, files)[0]
    assert pay.Refund(pb.pay.RefundRequest(charge_id=first), metadata=md, timeout=10).refund_id == "gone"
    assert pay.Refund(pb.pay.RefundRequest(charge_id=first), metadata=md, timeout=10).refund_id == "none"
    with pytest.raises(grpc.RpcError):
        orders.GetOrder(pb.orders.GetOrderRequest(order_id=first), metadata=md, timeout=10)

    AdminClient(channel).call("ResetSession", scenario="shop-handlers", session=sid)
    assert (
        orders.GetOrder(pb.orders.GetOrderRequest(order_id=first), metadata=md, timeout=10).order_id == first
    )
    with pytest.raises(grpc.RpcError) as info:
        orders.GetOrder(pb.orders.GetOrderRequest(order_id="new-6"), metadata=md, timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_handler_s_lookup_of_an_unknown_key_is_not_found(channel: grpc.Channel, pb: Any, sid: str) -> None:
    """``virtsvc.data("items")[sku]`` in a handler answers NOT_FOUND too, and puts nothing."""
    orders = pb.orders_grpc.OrdersStub(channel)
    md = _md("shop-handlers", sid)
    bad = pb.orders.PlaceOrderRequest(customer_id="x", lines=[pb.orders.OrderLine(sku="NOPE")])
    with pytest.raises(grpc.RpcError) as info:
        orders.PlaceOrder(bad, metadata=md, timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert 'data.items has no record with sku "NOPE"' in (info.value.details() or "")


def test_session_data_live_in_redis_for_every_replica(
    catalog: Catalog, files: Path, pb: Any, redis_url: str, sid: str
) -> None:
    """With the Redis store, an order one replica's handler puts is what another replica's Get answers."""
    from virtsvc.engine.redis_store import RedisStore

    stores = [RedisStore(redis_url), RedisStore(redis_url)]
    try:
        with _serve(catalog, files, stores[0]) as a, _serve(catalog, files, stores[1]) as b:
            md = _md("shop-handlers", sid)
            with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
                request = pb.orders.PlaceOrderRequest(
                    customer_id="ada", lines=[pb.orders.OrderLine(sku="CHAIR-2")]
                )
                placed = pb.orders_grpc.OrdersStub(ca).PlaceOrder(request, metadata=md, timeout=10)
                got = pb.orders_grpc.OrdersStub(cb).GetOrder(
                    pb.orders.GetOrderRequest(order_id=placed.order_id), metadata=md, timeout=10
                )
                assert got == placed
    finally:
        for store in stores:
            store.close()


# -- generated collections


def test_generated_collections_are_deterministic_by_seed(catalog: Catalog, tmp_path: Path) -> None:
    """The same seed gives the same records in every load; another seed others; the relationship holds."""
    one = load_scenarios([_write(tmp_path / "a.yaml", SHOP)], catalog)[0].data
    two = load_scenarios([_write(tmp_path / "b.yaml", SHOP)], catalog)[0].data
    assert one is not None and two is not None
    assert [dict(r) for r in one["orders"].records] == [dict(r) for r in two["orders"].records]
    other = load_scenarios([_write(tmp_path / "c.yaml", SHOP.replace("seed: 3", "seed: 4"))], catalog)[0].data
    assert other is not None
    assert [r["order_id"] for r in other["orders"].records] != [r["order_id"] for r in one["orders"].records]
    for record in one["orders"].records:
        assert {line["sku"] for line in record["lines"]} <= set(one["items"].index)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# -- virtsvc check

BAD = """\
scenario: bad-data
data:
  dupes:
    - {id: a}
    - {id: a}
  keyless:
    - {sku: A}
  typed: {type: shop.v1.Item, key: sku, records: [{sku: A, onHand: lots}]}
  made: {$generate: {type: shop.v1.Item, count: 2}}
rules:
  - method: shop.v1.Inventory/GetItem
    reply: {sku: x}
"""

# Data that load, used where they do not fit: checked against the type the rule fills with them.
BAD_USES = """\
scenario: bad-uses
data:
  items:
    key: sku
    records:
      - {sku: it-1, title: Lamp}
      - {sku: it-2, titel: Chair}
rules:
  - method: shop.v1.Inventory/GetItem
    reply: "{{ data.items[request.sku] }}"
  - method: shop.v1.Inventory/ListItems
    reply: {items: "{{ data.itemz | list }}"}
"""


def test_check_locates_data_problems(catalog: Catalog, tmp_path: Path) -> None:
    """Duplicate or missing keys, a bad typed record and a generated type without the key field: each at
    its file:line, saying how to fix it."""
    path = _write(tmp_path / "bad.yaml", BAD)
    found = [str(p).replace(str(path), "bad.yaml") for p in check_paths([path], catalog)]
    assert found == [
        'bad.yaml:5: data.dupes[1]: id "a" again (record 0 has it); keys are unique in a collection',
        'bad.yaml:7: data.keyless[0]: no "id" to find the record by (its fields: sku); name another key '
        "field with key: FIELD",
        'bad.yaml:8: data.typed[0].onHand: expected an integer (int64), got "lots"',
        'bad.yaml:9: data.made: shop.v1.Item has no field "id" to find records by; name the key with '
        "key: FIELD",
    ]


def test_check_locates_records_that_do_not_fit_their_use(catalog: Catalog, tmp_path: Path) -> None:
    """A record with a field the type the rule fills does not have, and an unknown collection: each at
    its file:line with the closest name."""
    path = _write(tmp_path / "uses.yaml", BAD_USES)
    found = [str(p).replace(str(path), "uses.yaml") for p in check_paths([path], catalog)]
    assert found == [
        'uses.yaml:7: data.items[1].titel: unknown field "titel" of shop.v1.Item; did you mean "title"? '
        "(the rule at uses.yaml:9 fills shop.v1.Item with data.items)",
        'uses.yaml:12: reply.items: data has no collection "itemz"; did you mean "items"?',
    ]


def test_load_refuses_bad_data_with_every_problem(catalog: Catalog, tmp_path: Path) -> None:
    """Loading raises one ScenarioError with the same problems."""
    with pytest.raises(ScenarioError) as info:
        load_scenarios([_write(tmp_path / "bad.yaml", BAD)], catalog)
    assert len(info.value.problems) == 4


# -- the README's example


def _readme_block(lang: str, after: str) -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(readme, readme.index(after))
    assert match, f"no {lang} block after {after!r} in README.md"
    return match.group(1)


def test_readme_data_set_example_agrees_across_methods(
    catalog: Catalog, tmp_path: Path, pb: Any, sid: str
) -> None:
    """The README's scenario and handler as written: ListItems, GetItem and GetOrder agree; a PlaceOrder
    is found by the next GetOrder of its session only."""
    (tmp_path / "shop.yaml").write_text(_readme_block("yaml", "tests/test_data.py serves this scenario"))
    (tmp_path / "orders.py").write_text(_readme_block("python", "A Python handler changes"))
    scenarios = load_scenarios([tmp_path], catalog)
    (shop,) = [s for s in scenarios if s.name == "shop-data"]
    assert shop.data is not None
    order_ids = list(shop.data["orders"].index)
    with VirtualServer(catalog, scenarios) as server, grpc.insecure_channel(server.address) as channel:
        inv = pb.inv_grpc.InventoryStub(channel)
        orders = pb.orders_grpc.OrdersStub(channel)
        md = _md("shop-orders", sid)
        listed = inv.ListItems(pb.inv.ListItemsRequest(), metadata=md, timeout=10).items
        assert [(i.sku, i.on_hand) for i in listed] == [("LAMP-1", 4), ("CHAIR-2", 0)]
        assert all(
            inv.GetItem(pb.inv.GetItemRequest(sku=i.sku), metadata=md, timeout=10) == i for i in listed
        )
        assert len(order_ids) == 5
        for order_id in order_ids:
            order = orders.GetOrder(pb.orders.GetOrderRequest(order_id=order_id), metadata=md, timeout=10)
            assert order.order_id == order_id
            assert [line.sku for line in order.lines] and {line.sku for line in order.lines} <= {
                "LAMP-1",
                "CHAIR-2",
            }
        request = pb.orders.PlaceOrderRequest(
            customer_id="ada", lines=[pb.orders.OrderLine(sku="LAMP-1", qty=2)]
        )
        placed = orders.PlaceOrder(request, metadata=md, timeout=10)
        assert placed.order_id == "new-5" and placed.customer_id == "ada"
        got = orders.GetOrder(pb.orders.GetOrderRequest(order_id="new-5"), metadata=md, timeout=10)
        assert got == placed
        with pytest.raises(grpc.RpcError) as info:
            orders.GetOrder(
                pb.orders.GetOrderRequest(order_id="new-5"),
                metadata=_md("shop-orders", sid + "-b"),
                timeout=10,
            )
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        bad = pb.orders.PlaceOrderRequest(customer_id="ada", lines=[pb.orders.OrderLine(sku="LAMP-9")])
        with pytest.raises(grpc.RpcError) as info:
            orders.PlaceOrder(bad, metadata=md, timeout=10)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert info.value.details() == 'data.items has no record with sku "LAMP-9"; did you mean "LAMP-1"?'
