"""Rule effects: a rule that answers may put rules into its call's session, replace them by ``id`` and remove
them (``effects: [{put}, {remove}, {remove_self}]``). Over real grpc on the project's protos, in YAML and
through the Python and pytest builders, on the memory store and on a real redis-server (single and Cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from helpers import fails

from virtsvc.admin import AdminClient
from virtsvc.cli import main
from virtsvc.contracts import Catalog
from virtsvc.engine.store import MemoryStore, Store
from virtsvc.errors import ScenarioError
from virtsvc.scenarios import load_scenarios
from virtsvc.scenarios.loader import compile_text
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
TIMEOUT = 10

STORY = """\
scenario: orders-story
rules:
  - id: place
    method: shop.v1.Orders/PlaceOrder
    reply: {orderId: "o-{{ request.customer_id }}", state: PENDING}
    effects:
      - put:
          id: "order-{{ request.customer_id }}"
          method: shop.v1.Orders/GetOrder
          when: {request: {order_id: "o-{{ request.customer_id }}"}}
          reply:
            orderId: "o-{{ request.customer_id }}"
            customerId: "{{ request.customer_id }}"
            state: PENDING
  - id: ship
    method: shop.v1.Inventory/Reserve
    when: {request: {sku: ship}}
    reply: {reservationId: shipped}
    effects:
      - put:
          id: order-c1                     # replaces what PlaceOrder put for c1
          method: shop.v1.Orders/GetOrder
          when: {request: {order_id: o-c1}}
          reply: {orderId: o-c1, state: SHIPPED}
  - id: cancel
    method: shop.v1.Inventory/Reserve
    when: {request: {sku: cancel}}
    reply: {reservationId: cancelled}
    effects:
      - remove: [order-c1, place]          # the order is gone, and no order can be placed any more
  - method: shop.v1.Orders/GetOrder
    status: {code: NOT_FOUND, message: "no order {{ request.order_id }}"}
  - method: shop.v1.Payments/Charge        # the first charge of a session succeeds, once
    reply: {chargeId: first}
    effects: [{remove_self: true}]
  - method: shop.v1.Payments/Charge
    status: {code: FAILED_PRECONDITION, message: already charged}
"""


def _redis_store(url: str) -> Store:
    from virtsvc.engine.redis_store import RedisStore

    return RedisStore(url)


# Each store: the fixture giving its URL (None: nothing to start) and how to make one from it.
STORES: dict[str, tuple[str | None, Callable[[str | None], Store]]] = {
    "memory": (None, lambda url: MemoryStore()),
    "redis": ("redis_url", lambda url: _redis_store(str(url))),
    "redis-cluster": ("redis_cluster_url", lambda url: _redis_store(str(url))),
}


@pytest.fixture(params=sorted(STORES))
def make_store(request: pytest.FixtureRequest) -> Callable[[], Store]:
    fixture, factory = STORES[request.param]
    url = request.getfixturevalue(fixture) if fixture else None
    return lambda: factory(url)


@pytest.fixture
def channels() -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    try:
        yield opened
    finally:
        for channel in opened:
            channel.close()


@pytest.fixture
def serve(start_server: Callable[..., VirtualServer]) -> Callable[..., VirtualServer]:
    """Starts servers with the admin API (stopped at the end)."""
    return lambda scenarios, store=None: start_server(scenarios, store=store, admin=True)


class Client:
    """The shop's stubs on one server, in one scenario; each call names its session."""

    def __init__(
        self, pb: SimpleNamespace, server: VirtualServer, scenario: str, channels: list[Any]
    ) -> None:
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        self.pb, self.scenario = pb, scenario
        self.orders = pb.orders_grpc.OrdersStub(channel)
        self.inv = pb.inv_grpc.InventoryStub(channel)
        self.pay = pb.pay_grpc.PaymentsStub(channel)
        self.admin = AdminClient(channel)

    def md(self, session: str) -> tuple[tuple[str, str], ...]:
        return (("x-virtsvc-scenario", self.scenario), ("x-virtsvc-session", session))

    def place(self, session: str, customer: str) -> Any:
        request = self.pb.orders.PlaceOrderRequest(customer_id=customer)
        return self.orders.PlaceOrder(request, metadata=self.md(session), timeout=TIMEOUT)

    def get(self, session: str, order_id: str) -> Any:
        request = self.pb.orders.GetOrderRequest(order_id=order_id)
        return self.orders.GetOrder(request, metadata=self.md(session), timeout=TIMEOUT)

    def missing(self, session: str, order_id: str) -> str:
        request = self.pb.orders.GetOrderRequest(order_id=order_id)
        err = fails(self.orders.GetOrder, request, metadata=self.md(session), timeout=TIMEOUT)
        assert err.code() is grpc.StatusCode.NOT_FOUND, err.details()
        return str(err.details())

    def reserve(self, session: str, sku: str) -> str:
        request = self.pb.inv.ReserveRequest(sku=sku)
        return str(self.inv.Reserve(request, metadata=self.md(session), timeout=TIMEOUT).reservation_id)

    def charge(self, session: str) -> str:
        request = self.pb.pay.ChargeRequest()
        try:
            return str(self.pay.Charge(request, metadata=self.md(session), timeout=TIMEOUT).charge_id)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    def reset(self, session: str) -> None:
        assert self.admin.call("ResetSession", scenario=self.scenario, session=session).existed is True


def _state(order: Any) -> str:
    return str(order.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[order.state].name)


# -- the story in YAML, on each store -----------------------------------------------------------------


def test_create_then_get(
    serve: Callable[..., VirtualServer],
    make_store: Callable[[], Store],
    catalog: Catalog,
    pb: SimpleNamespace,
    channels: list[Any],
) -> None:
    """PlaceOrder puts the GetOrder rule that finds the order (its templates rendered from the PlaceOrder
    call); a later put of the same id replaces it; remove takes it and PlaceOrder's own rule away."""
    server = serve(compile_text(STORY, catalog, "story.yaml"), make_store())
    client = Client(pb, server, "orders-story", channels)
    assert client.missing("s", "o-c1") == "no order o-c1"
    assert client.place("s", "c1").order_id == "o-c1"
    got = client.get("s", "o-c1")
    assert (got.order_id, got.customer_id, _state(got)) == ("o-c1", "c1", "PENDING")
    assert client.place("s", "c2").order_id == "o-c2"  # a second put: both orders are found
    assert client.get("s", "o-c2").customer_id == "c2"
    assert client.get("s", "o-c1").customer_id == "c1"
    assert client.missing("s", "o-c3") == "no order o-c3"

    assert client.reserve("s", "ship") == "shipped"
    assert _state(client.get("s", "o-c1")) == "SHIPPED"  # replaced by id
    assert client.get("s", "o-c2").customer_id == "c2"

    assert client.reserve("s", "cancel") == "cancelled"
    assert client.missing("s", "o-c1") == "no order o-c1"
    assert client.get("s", "o-c2").customer_id == "c2"
    md = client.md("s")
    err = fails(client.orders.PlaceOrder, pb.orders.PlaceOrderRequest(customer_id="c4"), metadata=md)
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED  # no rule places orders in this session now


def test_sessions_are_isolated_and_reset_restores_the_scenario(
    serve: Callable[..., VirtualServer],
    make_store: Callable[[], Store],
    catalog: Catalog,
    pb: SimpleNamespace,
    channels: list[Any],
) -> None:
    server = serve(compile_text(STORY, catalog, "story.yaml"), make_store())
    client = Client(pb, server, "orders-story", channels)
    client.place("a", "c1")
    assert client.get("a", "o-c1").customer_id == "c1"
    assert client.missing("b", "o-c1") == "no order o-c1"  # another session: untouched
    assert [client.charge("a"), client.charge("a")] == ["first", "FAILED_PRECONDITION: already charged"]
    assert client.charge("b") == "first"  # remove_self took the rule away in session a only

    client.reset("a")
    assert client.missing("a", "o-c1") == "no order o-c1"
    assert client.charge("a") == "first"
    client.place("a", "c1")
    assert client.get("a", "o-c1").customer_id == "c1"


def test_session_rules_put_or_cleared_drop_the_effects_changes(
    serve: Callable[..., VirtualServer],
    make_store: Callable[[], Store],
    catalog: Catalog,
    pb: SimpleNamespace,
    channels: list[Any],
) -> None:
    server = serve(compile_text(STORY, catalog, "story.yaml"), make_store())
    client = Client(pb, server, "orders-story", channels)
    own = "rules:\n  - method: shop.v1.Inventory/GetItem\n    reply: {sku: own}\n"
    for admin_call, args in (("PutSessionRules", {"text": own}), ("ClearSessionRules", {})):
        client.place(admin_call, "c1")
        assert [client.get(admin_call, "o-c1").customer_id, client.charge(admin_call)] == ["c1", "first"]
        client.admin.call(admin_call, scenario="orders-story", session=admin_call, **args)
        assert client.missing(admin_call, "o-c1") == "no order o-c1"
        assert client.charge(admin_call) == "first"  # the rule that removed itself is back


def test_replicas_on_one_redis_see_each_other_s_effects(
    serve: Callable[..., VirtualServer],
    request: pytest.FixtureRequest,
    catalog: Catalog,
    pb: SimpleNamespace,
    channels: list[Any],
) -> None:
    """The rule one replica's effect put is compiled and answered by another (single server and Cluster):
    the changes live in Redis."""
    for fixture in ("redis_url", "redis_cluster_url"):
        url = request.getfixturevalue(fixture)
        scenarios = compile_text(STORY, catalog, "story.yaml")
        first, second = (
            Client(pb, serve(scenarios, _redis_store(url)), "orders-story", channels) for _ in range(2)
        )
        session = f"replicas-{fixture}"
        first.place(session, "c1")
        assert second.get(session, "o-c1").customer_id == "c1"
        assert second.reserve(session, "ship") == "shipped"
        assert _state(first.get(session, "o-c1")) == "SHIPPED"
        assert [first.charge(session), second.charge(session)] == [
            "first",
            "FAILED_PRECONDITION: already charged",
        ]
        second.reset(session)
        assert first.missing(session, "o-c1") == "no order o-c1"
        assert second.charge(session) == "first"


def test_a_put_rule_counts_its_own_times_and_keeps_raw_templates(
    serve: Callable[..., VirtualServer],
    make_store: Callable[[], Store],
    catalog: Catalog,
    pb: SimpleNamespace,
    channels: list[Any],
) -> None:
    """A put rule's ``times`` start when it is put; ``{% raw %}`` keeps a template for its own calls; a
    single ``{{ expr }}`` keeps its value's type."""
    text = """\
scenario: counted
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: "r-{{ request.qty }}"}
    effects:
      - put:
          id: item
          method: shop.v1.Inventory/GetItem
          times: "{{ request.qty }}"
          reply: {sku: "{% raw %}{{ request.sku }}{% endraw %}-{{ request.sku }}"}
"""
    client = Client(pb, serve(compile_text(text, catalog, "counted.yaml"), make_store()), "counted", channels)
    md = client.md("s")
    client.inv.Reserve(pb.inv.ReserveRequest(sku="first", qty=2), metadata=md, timeout=TIMEOUT)
    skus = [client.inv.GetItem(pb.inv.GetItemRequest(sku=s), metadata=md).sku for s in ("x", "y")]
    assert skus == ["x-first", "y-first"]
    err = fails(client.inv.GetItem, pb.inv.GetItemRequest(sku="z"), metadata=md)
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED  # times: 2, used up
    client.inv.Reserve(pb.inv.ReserveRequest(sku="again", qty=1), metadata=md, timeout=TIMEOUT)
    assert client.inv.GetItem(pb.inv.GetItemRequest(sku="z"), metadata=md).sku == "z-again"  # counts anew


def test_effects_of_parallel_calls_all_take_hold(
    serve: Callable[..., VirtualServer],
    request: pytest.FixtureRequest,
    make_store: Callable[[], Store],
    catalog: Catalog,
    pb: SimpleNamespace,
    channels: list[Any],
) -> None:
    """Twenty orders placed at once in one session (on Redis, through two replicas in turn): every put
    lands, none is lost to another's read-modify-write."""
    from concurrent.futures import ThreadPoolExecutor

    scenarios = compile_text(STORY, catalog, "story.yaml")
    first = serve(scenarios, make_store())
    shared = "memory" not in request.node.callspec.id
    servers = [first, serve(scenarios, make_store())] if shared else [first]
    clients = [Client(pb, s, "orders-story", channels) for s in servers]
    customers = [f"c{i}" for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: clients[i % len(clients)].place("par", customers[i]), range(20)))
    found = [clients[-1].get("par", f"o-{c}").customer_id for c in customers]
    assert found == customers


def test_an_effect_that_fails_at_run_time_names_itself(
    serve: Callable[..., VirtualServer], catalog: Catalog, pb: SimpleNamespace, channels: list[Any]
) -> None:
    """A put rule rendered wrong from the triggering call fails that call INTERNAL, naming the effect's
    line, and changes nothing in the session."""
    text = """\
scenario: failing
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: r}
    effects:
      - put: {id: item, method: shop.v1.Inventory/GetItem, times: "{{ request.qty }}", reply: {}}
  - method: shop.v1.Inventory/GetItem
    reply: {sku: scenario}
"""
    client = Client(pb, serve(compile_text(text, catalog, "failing.yaml")), "failing", channels)
    md = client.md("s")
    err = fails(client.inv.Reserve, pb.inv.ReserveRequest(qty=0), metadata=md)
    assert err.code() is grpc.StatusCode.INTERNAL
    assert err.details() == (
        "the effect at failing.yaml:6 (of the rule at failing.yaml:3) failed: "
        "failing.yaml:6: times: expected a positive integer, got 0"
    )
    assert client.inv.GetItem(pb.inv.GetItemRequest(), metadata=md).sku == "scenario"


def test_a_per_message_rule_s_effects_apply_at_its_message(
    serve: Callable[..., VirtualServer], catalog: Catalog, pb: SimpleNamespace, channels: list[Any]
) -> None:
    """On a bidi call answered per message, the rule that answers a message applies its effects then: the
    call's next message already meets the rules they changed."""
    text = """\
scenario: track
rules:
  - method: shop.v1.Orders/Track
    per_message: true
    when: {request: {text: ship}}
    reply: {text: "shipping {{ request.order_id }}"}
    effects:
      - put:
          id: shipped
          method: shop.v1.Orders/Track
          per_message: true
          priority: 1
          reply: {text: "{{ request.order_id }} is on its way"}
  - method: shop.v1.Orders/Track
    per_message: true
    reply: {text: pending}
"""
    client = Client(pb, serve(compile_text(text, catalog, "track.yaml")), "track", channels)
    asks = [pb.orders.TrackRequest(order_id="o-1", text=t) for t in ("where", "ship", "where")]
    replies = client.orders.Track(iter(asks), metadata=client.md("s"), timeout=TIMEOUT)
    assert [r.text for r in replies] == ["pending", "shipping o-1", "o-1 is on its way"]


# -- the Python builders ----------------------------------------------------------------------------


SCRIPT = """\
from virtsvc import Scenario
from virtsvc.scenarios.builder import rule

scenario = Scenario("orders-py")
scenario.on("shop.v1.Orders/PlaceOrder", id="place").reply(
    {"orderId": "o-{{ request.customer_id }}"}
).put(
    rule("shop.v1.Orders/GetOrder", id="order", when={"request": {"order_id": "o-{{ request.customer_id }}"}})
    .reply({"orderId": "o-{{ request.customer_id }}", "customerId": "{{ request.customer_id }}"})
)
scenario.on("shop.v1.Inventory/Reserve").reply({"reservationId": "gone"}).remove("order").remove_self()
scenario.on("shop.v1.Orders/GetOrder").fail("NOT_FOUND", "no order {{ request.order_id }}")
"""


def test_the_python_builders(
    serve: Callable[..., VirtualServer],
    catalog: Catalog,
    tmp_path: Path,
    pb: SimpleNamespace,
    channels: list[Any],
) -> None:
    path = tmp_path / "orders_py.py"
    path.write_text(SCRIPT)
    client = Client(pb, serve(load_scenarios([path], catalog)), "orders-py", channels)
    client.place("s", "c1")
    assert client.get("s", "o-c1").customer_id == "c1"
    assert client.reserve("s", "x") == "gone"
    assert client.missing("s", "o-c1") == "no order o-c1"
    err = fails(client.inv.Reserve, pb.inv.ReserveRequest(sku="x"), metadata=client.md("s"))
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED  # it removed itself


def test_a_bad_put_rule_is_reported_at_the_builder_s_line(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "bad_put.py"
    path.write_text(
        "from virtsvc import Scenario\n"
        "from virtsvc.scenarios.builder import rule\n"
        "scenario = Scenario('bad-put')\n"
        "scenario.on('shop.v1.Orders/PlaceOrder').reply({}).put(\n"
        "    rule('shop.v1.Orders/GetOrder', id='o').reply({'orderid': 'x'})\n"
        ")\n"
    )
    with pytest.raises(ScenarioError) as err:
        load_scenarios([path], catalog)
    assert str(err.value).startswith(f'{path}:5: reply.orderid: unknown field "orderid" of shop.v1.Order')


def _line_of(text: str) -> int:
    return next(n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1) if text in line)


def test_the_builders_write_the_file_format() -> None:
    from virtsvc import Scenario
    from virtsvc.scenarios.builder import rule

    scenario = Scenario("shapes")
    built = (
        scenario.on("shop.v1.Payments/Charge", id="charge", times=1)
        .reply({"chargeId": "c"})
        .put(rule("shop.v1.Payments/Refund", id="refund", priority=5).fail("NOT_FOUND"))
        .remove(["a", "b"])
        .remove_self()
    )
    put = built.data["effects"][0]["put"]
    assert put.pop("$location") == f"{__file__}:{_line_of('.put(rule(')}"  # its problems are reported there
    assert built.data == {
        "method": "shop.v1.Payments/Charge",
        "id": "charge",
        "times": 1,
        "reply": {"chargeId": "c"},
        "effects": [
            {
                "put": {
                    "method": "shop.v1.Payments/Refund",
                    "id": "refund",
                    "priority": 5,
                    "status": {"code": "NOT_FOUND"},
                }
            },
            {"remove": ["a", "b"]},
            {"remove_self": True},
        ],
    }


PLUGIN_TEST = """\
import grpc
import pytest
from virtsvc.scenarios.builder import rule

PLACE, GET = "shop.v1.Orders/PlaceOrder", "shop.v1.Orders/GetOrder"


def test_story(virtual_service, rpc):
    virtual_service.on(PLACE, id="place").reply({"orderId": "o-1"}).put(
        rule(GET, id="order-1", when={"request": {"order_id": "o-1"}})
        .reply({"orderId": "o-1", "customerId": "{{ request.customer_id }}"})
    ).remove_self()
    virtual_service.on(PLACE).fail("ALREADY_EXISTS", "one order per test")
    virtual_service.on(GET).fail("NOT_FOUND", "no such order")
    with pytest.raises(grpc.RpcError) as err:
        rpc(GET, order_id="o-1")
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert rpc(PLACE, customer_id="c1").order_id == "o-1"
    assert rpc(GET, order_id="o-1").customer_id == "c1"
    with pytest.raises(grpc.RpcError) as err:
        rpc(PLACE, customer_id="c2")
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS  # the first rule removed itself


def test_the_next_test_starts_from_the_rules_as_written(virtual_service, rpc):
    virtual_service.on(GET).fail("NOT_FOUND", "no such order")
    with pytest.raises(grpc.RpcError) as err:
        rpc(GET, order_id="o-1")
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
"""


@pytest.mark.parametrize("where", ["in-process", "sidecar"])
def test_the_plugin_builders(pytester: pytest.Pytester, catalog: Catalog, where: str) -> None:
    """Inline rules with effects, on the plugin's in-process server and against a sidecar."""
    from test_plugin import project

    project(pytester, scenario="scenario: shop\nrules: []\n")
    pytester.makepyfile(test_inner=PLUGIN_TEST)
    args = ["-p", "no:cacheprovider", "-p", "no:randomly"]
    if where == "in-process":
        result = pytester.runpytest_subprocess(*args, "-o", "virtsvc_default_scenario=shop")
    else:
        empty = compile_text("scenario: shop\nrules: []\n", catalog)
        sidecar = VirtualServer(catalog, empty, port=0, admin=True).start()
        try:
            result = pytester.runpytest_subprocess(*args, "--virtsvc-address", sidecar.address)
        finally:
            sidecar.stop(0)
    result.assert_outcomes(passed=2)


# -- virtsvc check ----------------------------------------------------------------------------------


MISUSE = """\
scenario: misuse
rules:
  - id: place
    method: shop.v1.Orders/PlaceOrder
    reply: {}
    effects:
      - put: {method: shop.v1.Orders/GetOrder, reply: {}}
      - remove: plase
      - remov: x
      - put: {id: get, method: shop.v1.Orders/GetOrder, reply: {orderid: x}}
      - remove_self: yes please
  - id: place
    method: shop.v1.Orders/GetOrder
    reply: {}
  - id: "bad id"
    method: shop.v1.Orders/GetOrder
    reply: {}
    effects: {remove: place}
"""


def test_check_locates_misuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each misuse is one line, ``file:line: message``, at the line that has it."""
    path = tmp_path / "misuse.yaml"
    path.write_text(MISUSE)
    assert main(["check", "--protos", str(ROOT / "protos"), str(path)]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    expected = [
        f"{path}:7: effects[0].put: a rule an effect puts needs an id",
        f'{path}:8: effects: remove: no rule has the id "plase"; did you mean "place"?',
        f'{path}:9: effects[2]: unknown effect "remov"; did you mean "remove"?',
        f'{path}:10: reply.orderid: unknown field "orderid" of shop.v1.Order',
        f"{path}:11: effects[4].remove_self: expected true",
        f'{path}:12: id: "place" is already the id of the rule at {path}:3',
        f'{path}:15: id: bad rule id "bad id"',
        f"{path}:18: effects: expected a list of effects",
    ]
    for line in expected:
        assert any(shown.startswith(line) for shown in text.splitlines()), (line, text)


# -- the README's example ---------------------------------------------------------------------------


def test_readme_effects_example(
    serve: Callable[..., VirtualServer], catalog: Catalog, pb: SimpleNamespace, channels: list[Any]
) -> None:
    """The README's scenario, served, answers the calls as the README says."""
    start = README.index("tests/test_effects.py serves this scenario")
    block = README[start:].split("```yaml\n", 1)[1].split("```", 1)[0]
    client = Client(pb, serve(compile_text(block, catalog, "README.md")), "orders-story", channels)
    assert client.missing("s", "o-c1") == "no order o-c1"
    client.place("s", "c1")
    assert client.get("s", "o-c1").customer_id == "c1"
    assert client.reserve("s", "cancel-c1") == "cancelled"
    assert client.missing("s", "o-c1") == "no order o-c1"
    err = fails(
        client.orders.PlaceOrder, pb.orders.PlaceOrderRequest(customer_id="c1"), metadata=client.md("s")
    )
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert [client.charge("s"), client.charge("s")] == ["first", "FAILED_PRECONDITION: already charged"]
