"""``virtsvc import gripmock`` on the project's own protos: GripMock stubs of every kind imported, served
in-process and called with real grpc clients; and what cannot be converted reported at ``file:line``.
(GripMock's own example suite, imported and run case by case, is tests/test_gripmock_examples.py.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from helpers import fails

from virtsvc import cli
from virtsvc.contracts import Catalog
from virtsvc.migrate.gotemplate import GoTemplateError, translate
from virtsvc.scenarios import load_scenarios
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TIMEOUT = 10

STUBS = r"""# yaml-language-server: $schema=https://example.invalid/stub.json
- service: Inventory                      # short name: shop.v1.Inventory
  method: Reserve
  input:
    equals: {sku: ABC-1, qty: 2}
  output:
    data: {reservationId: "r-{{.Request.sku}}-{{.Request.qty}}", qty_reserved: "{{.Request.qty}}"}
- service: shop.v1.Inventory
  method: Reserve
  priority: 5
  input:
    matches: {sku: "^VIP-\\d+$"}
  output:
    data: {reservation_id: vip}
- service: Inventory                      # the catch-all: an error with details; its headers are trailers
  method: Reserve
  input: {contains: {}}
  output:
    error: "out of stock: {{.Request.sku}}"
    code: 9
    details:
      - type: type.googleapis.com/google.rpc.ErrorInfo
        reason: OUT_OF_STOCK
        domain: shop.example
    headers: {x-reason: stock}
- service: Inventory
  method: Reserve
  headers: {equals: {X-Tenant: acme}}
  input: {glob: {sku: "ACME-*"}}
  output: {data: {reservation_id: "acme {{index .Headers \"x-tenant\"}}"}}
- service: Inventory
  method: GetItem
  priority: 10
  options: {times: 2}
  input: {equals: {sku: retry}}
  output: {error: warming up, code: 14}
- service: Inventory
  method: GetItem
  input: {equals: {sku: retry}}
  output:
    data: {sku: retry, tags: [a, b], availability: IN_STOCK, on_hand: 9223372036854775807}
    headers: {x-served: gripmock}
- service: Inventory
  method: ListItems
  input:
    ignoreArrayOrder: true
    equals: {tags: [x, y]}
  output: {data: {items: [{sku: unordered}]}}
- service: Inventory
  method: Watch
  input: {contains: {skus: [A]}}
  output:
    delay: 30ms
    stream:
      - {sku: A, on_hand: 1}
      - _gripmock: {error: feed lost, code: 14}
      - {sku: never}
- service: Inventory
  method: BulkUpdate
  inputs:
    - equals: {sku: A}
    - matches: {count: "\\d+"}
  output:
    data: {accepted: "{{len .Requests}}", rejected_skus: ["{{(index .Requests 1).sku}}"]}
- service: Inventory
  method: BulkUpdate
  input: {equals: {sku: BAD}}
  output: {data: {rejected: 1}}
- service: Orders
  method: Track
  input: {equals: {text: hi}}
  output: {data: {text: "hello {{.MessageIndex}}"}}
- service: Orders
  method: Track
  input: {equals: {text: many}}
  output: {stream: [{text: one}, {text: two}]}
- id: place
  service: Orders
  method: PlaceOrder
  input: {equals: {customer_id: c1}}
  output: {data: {order_id: o-1, state: PENDING}}
  effects:
    - action: upsert
      stub:
        id: order-o1
        service: Orders
        method: GetOrder
        input: {equals: {order_id: o-1}}
        output: {data: {order_id: o-1, customer_id: c1}}
    - action: delete
      id: place
"""


def _import(*argv: str) -> int:
    return cli.main(["import", "gripmock", *argv])


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    stubs = tmp_path_factory.mktemp("stubs") / "shop-stubs"
    stubs.mkdir()
    (stubs / "stubs.yaml").write_text(STUBS)
    out = tmp_path_factory.mktemp("out")
    assert _import(str(stubs), "-o", str(out), "--protos", str(PROTOS)) == 0
    return out / "shop-stubs.yaml"


@pytest.fixture(scope="module")
def server(imported: Path) -> Iterator[VirtualServer]:
    catalog = Catalog.from_protos(PROTOS)
    server = VirtualServer(catalog, load_scenarios(imported, catalog), default_scenario="shop-stubs")
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=None)


@pytest.fixture
def stubs(server: VirtualServer, pb: SimpleNamespace, sid: str) -> Iterator[SimpleNamespace]:
    channel = grpc.insecure_channel(server.address)
    md = (("x-virtsvc-session", sid),)
    try:
        yield SimpleNamespace(
            inv=pb.inv_grpc.InventoryStub(channel), orders=pb.orders_grpc.OrdersStub(channel), md=md
        )
    finally:
        channel.close()


def test_the_import_names_the_scenario_after_the_directory_and_passes_check(
    imported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One scenario per directory, named after it; ``virtsvc check`` passes the file; each rule says which
    stub it came from."""
    text = imported.read_text()
    assert text.count("# ") >= 13 and "stubs.yaml:2\n" in text
    assert "scenario: shop-stubs" in text
    assert cli.main(["check", str(imported), "--protos", str(PROTOS)]) == 0
    assert "checked 1 scenario, 13 rules: ok" in capsys.readouterr().out


def test_unary_matchers_ranking_templates_and_errors(stubs: SimpleNamespace, pb: SimpleNamespace) -> None:
    """equals beats the catch-all, a priority-5 regex beats it too, a header+glob stub outranks it; the
    catch-all's error carries its details and its headers arrive as trailers."""
    reserve = stubs.inv.Reserve
    answer = reserve(pb.inv.ReserveRequest(sku="ABC-1", qty=2), metadata=stubs.md, timeout=TIMEOUT)
    assert (answer.reservation_id, answer.qty_reserved) == ("r-ABC-1-2", 2)
    answer = reserve(pb.inv.ReserveRequest(sku="VIP-7"), metadata=stubs.md, timeout=TIMEOUT)
    assert answer.reservation_id == "vip"
    tenant = (*stubs.md, ("x-tenant", "acme"))
    answer = reserve(pb.inv.ReserveRequest(sku="ACME-9"), metadata=tenant, timeout=TIMEOUT)
    assert answer.reservation_id == "acme acme"

    err = fails(reserve, pb.inv.ReserveRequest(sku="ACME-9"), metadata=stubs.md, timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and err.details() == "out of stock: ACME-9"
    trailers = dict(err.trailing_metadata())
    assert trailers["x-reason"] == "stock"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and (info.reason, info.domain) == ("OUT_OF_STOCK", "shop.example")


def test_times_then_the_next_stub_with_big_numbers_enums_and_headers(
    stubs: SimpleNamespace, pb: SimpleNamespace
) -> None:
    """options.times: 2 answers UNAVAILABLE twice, then the lower-priority stub answers."""
    request = pb.inv.GetItemRequest(sku="retry")
    for _ in range(2):
        err = fails(stubs.inv.GetItem, request, metadata=stubs.md, timeout=TIMEOUT)
        assert err.code() is grpc.StatusCode.UNAVAILABLE and err.details() == "warming up"
    item, call = stubs.inv.GetItem.with_call(request, metadata=stubs.md, timeout=TIMEOUT)
    assert (item.on_hand, list(item.tags), item.availability) == (2**63 - 1, ["a", "b"], pb.inv.Item.IN_STOCK)
    assert dict(call.initial_metadata())["x-served"] == "gripmock"


def test_ignore_array_order(stubs: SimpleNamespace, pb: SimpleNamespace) -> None:
    """ignoreArrayOrder: the listed elements in any order, and no others."""
    for tags in (["y", "x"], ["x", "y"]):
        answer = stubs.inv.ListItems(pb.inv.ListItemsRequest(tags=tags), metadata=stubs.md, timeout=TIMEOUT)
        assert [i.sku for i in answer.items] == ["unordered"]
    err = fails(stubs.inv.ListItems, pb.inv.ListItemsRequest(tags=["x", "y", "z"]), metadata=stubs.md)
    assert err.code() is grpc.StatusCode.NOT_FOUND and err.details() == "No matching stub found"


def test_server_stream_delay_and_the_error_marker(stubs: SimpleNamespace, pb: SimpleNamespace) -> None:
    """Messages up to the _gripmock marker, each after the output's delay, then the marker's status."""
    started = time.monotonic()
    call = stubs.inv.Watch(pb.inv.WatchRequest(skus=["A", "B"]), metadata=stubs.md, timeout=TIMEOUT)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for event in call:
            received.append(event.sku)
    assert received == ["A"]
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE and info.value.details() == "feed lost"
    assert time.monotonic() - started >= 0.03


def test_client_stream_inputs_and_input(stubs: SimpleNamespace, pb: SimpleNamespace) -> None:
    """inputs: message i meets element i, with the count; input: any message."""
    counts = [pb.inv.StockCount(sku="A", count=1), pb.inv.StockCount(sku="Z", count=5)]
    summary = stubs.inv.BulkUpdate(iter(counts), metadata=stubs.md, timeout=TIMEOUT)
    assert (summary.accepted, list(summary.rejected_skus)) == (2, ["Z"])
    mixed = [pb.inv.StockCount(sku="ok"), pb.inv.StockCount(sku="BAD")]
    assert stubs.inv.BulkUpdate(iter(mixed), metadata=stubs.md, timeout=TIMEOUT).rejected == 1
    three = [*counts, pb.inv.StockCount(sku="C")]
    err = fails(stubs.inv.BulkUpdate, iter(three), metadata=stubs.md, timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.NOT_FOUND


def test_bidi_answered_per_message(stubs: SimpleNamespace, pb: SimpleNamespace) -> None:
    """Each incoming message answered by the stub it matches: one reply or several."""
    texts = ["hi", "many", "hi"]
    replies = stubs.orders.Track(
        iter(pb.orders.TrackRequest(text=t) for t in texts), metadata=stubs.md, timeout=TIMEOUT
    )
    assert [r.text for r in replies] == ["hello 0", "one", "two", "hello 2"]


def test_effects_upsert_and_self_delete(stubs: SimpleNamespace, pb: SimpleNamespace) -> None:
    """PlaceOrder upserts a GetOrder stub and deletes itself: the order answers, placing again does not."""
    get = pb.orders.GetOrderRequest(order_id="o-1")
    assert fails(stubs.orders.GetOrder, get, metadata=stubs.md).code() is grpc.StatusCode.NOT_FOUND
    placed = stubs.orders.PlaceOrder(pb.orders.PlaceOrderRequest(customer_id="c1"), metadata=stubs.md)
    assert placed.order_id == "o-1"
    assert stubs.orders.GetOrder(get, metadata=stubs.md, timeout=TIMEOUT).customer_id == "c1"
    err = fails(stubs.orders.PlaceOrder, pb.orders.PlaceOrderRequest(customer_id="c1"), metadata=stubs.md)
    assert err.code() is grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------------------------------------
# what cannot be converted

BAD = """\
- service: Inventory
  method: Reserve
  output: {data: {reservation_id: ok}}
- service: Inventory
  method: Reserve
  session: abc
  output: {data: {reservation_id: bound}}
- service: Inventry
  method: Reserve
  output: {data: {}}
- service: Inventory
  method: reserve
  output: {data: {}}
- service: Inventory
  method: GetItem
  input: {equals: {sku: x}}
  output:
    data: {title: "{{if .Request.sku}}yes{{end}}"}
- service: Inventory
  method: GetItem
  output: {data: {no_such_field: 1}}
"""


@pytest.fixture
def bad_stubs(tmp_path: Path) -> Path:
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "stubs.yaml").write_text(BAD)
    return directory


def test_unconvertible_stubs_are_reported_at_their_line_and_nothing_is_written(
    bad_stubs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem at its stub's file:line, exit 1, no file written."""
    out = tmp_path / "out"
    assert _import(str(bad_stubs), "-o", str(out), "--protos", str(PROTOS)) == 1
    err = capsys.readouterr().err
    f = bad_stubs / "stubs.yaml"
    assert f"{f}:6: session: stubs bound to a GripMock session are not imported" in err
    assert f"{f}:8: service 'Inventry' is not in the contracts (their services: shop.v1.Inventory," in err
    assert f"{f}:12: method 'reserve' is not a method of shop.v1.Inventory (methods: Reserve," in err
    assert "GripMock's method names are case-sensitive" in err
    assert f"{f}:18: output.data: data.title: {{{{ if }}}} actions are not translated" in err
    assert f"{f}:19: imported as " in err and "no_such_field" in err
    assert "nothing written; fix the stubs above or give --partial" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_partial_writes_what_converts(
    bad_stubs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--partial: the problems are still listed, the convertible stubs are written and pass check."""
    out = tmp_path / "out"
    assert _import(str(bad_stubs), "-o", str(out), "--protos", str(PROTOS), "--partial") == 0
    captured = capsys.readouterr()
    assert "session: stubs bound" in captured.err
    assert (
        "imported 6 stubs into" in captured.out
        and "(scenario bad, 1 rule, 5 problems left out)" in captured.out
    )
    assert cli.main(["check", str(out), "--protos", str(PROTOS)]) == 0


def test_several_directories_in_one_named_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--scenario NAME gathers every PATH into one scenario; JSON stub files, one stub per file, too."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    stub = {"service": "Inventory", "method": "Ping", "input": {"contains": {}}, "output": {"data": {}}}
    (a / "ping.json").write_text(json.dumps(stub))
    (b / "reserve.yml").write_text(
        "service: Inventory\nmethod: Reserve\n"
        "input: {equals: {sku: A}}\noutput: {data: {reservation_id: r}}\n"
    )
    out = tmp_path / "out"
    assert _import(str(a), str(b), "-o", str(out), "--scenario", "legacy", "--protos", str(PROTOS)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["legacy.yaml"]
    assert "imported 2 stubs into" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("go", "jinja"),
    [
        ("{{.Request.id}}", "{{ request.id }}"),
        ("{{len .Requests}}", "{{ requests|length }}"),
        ('ORDER_{{index (split .Request.user_id "_") 1}}', 'ORDER_{{ request.user_id.split("_")[1] }}'),
        ("{{(index .Requests 0).value}}", "{{ requests[0].value }}"),
        ("{{sum (extract .Requests `value`)}}", '{{ requests|map(attribute="value")|list|sum }}'),
        ("{{mul (len .Request.items) 25.50}}", "{{ request.items|length * 25.50 }}"),
        ("{{div .Request.a .Request.b}}", "{{ request.a / request.b if request.b else 0 }}"),
        ('{{index .Headers "x-user"}}', '{{ metadata["x-user"] }}'),
        ("{{.MessageIndex}}", "{{ index }}"),
        (
            "{{faker.Person.FirstName}} {{faker.Number.IntRange 1 9}}",
            '{{ fake("first_name") }} {{ randint(1, 9) }}',
        ),
        ("{{ .Request.name | upper }}", "{{ request.name|upper }}"),
    ],
)
def test_go_templates_translate(go: str, jinja: str) -> None:
    """GripMock's template expressions -> the Jinja2 virtsvc renders."""
    assert translate(go) == jinja


@pytest.mark.parametrize(
    ("go", "message"),
    [
        ("{{range .Requests}}x{{end}}", "{{ range }} actions are not translated"),
        ("{{$x := 1}}", "template variables are not translated"),
        ("{{.Session}}", "unknown template field .Session"),
        ("{{frobnicate .Request}}", "unknown template function 'frobnicate'"),
        ("{{faker.Pet.Name}}", "unknown faker key faker.Pet.Name"),
    ],
)
def test_untranslatable_templates_say_why(go: str, message: str) -> None:
    with pytest.raises(
        GoTemplateError, match=message.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")
    ):
        translate(go)
