"""Synthetic data: messages generated from their schema, ``reply: {$generate: ...}``, the seed header, and
``virtsvc fake``."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from _protos_fixture import located, make_call, message_spec, new_site, problems, shop
from _upstream import run_virtsvc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from virtsvc.contracts import Catalog, load_catalog
from virtsvc.engine.store import MemorySession
from virtsvc.scenarios import synthetic
from virtsvc.scenarios.fields import is_map
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.scenarios.model import to_json
from virtsvc.scenarios.synthetic import MAX_DEPTH, MAX_ITEMS, generate
from virtsvc.server import VirtualServer

__all__ = ["shop"]

ROOT = Path(__file__).resolve().parent.parent

# Every field kind protobuf has, with recursion, proto3 optional, oneofs and every well-known type.
KINDS_PROTO = """
syntax = "proto3";
package kinds.v1;
import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

enum Colour { COLOUR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }

message Scalars {
  double d = 1; float f = 2; int32 i32 = 3; int64 i64 = 4; uint32 u32 = 5; uint64 u64 = 6;
  sint32 s32 = 7; sint64 s64 = 8; fixed32 fx32 = 9; fixed64 fx64 = 10; sfixed32 sf32 = 11;
  sfixed64 sf64 = 12; bool b = 13; string s = 14; bytes by = 15; Colour colour = 16;
  optional string nickname = 17;
  repeated int32 many = 18; repeated Colour colours = 19; repeated bytes blobs = 20;
}

message Node {
  string id = 1;
  repeated Node children = 2;
  Node parent = 3;
  map<string, Node> by_name = 4;
}

message Known {
  google.protobuf.Timestamp created_at = 1;
  google.protobuf.Timestamp expires_at = 2;
  google.protobuf.Duration ttl = 3;
  google.protobuf.Empty nothing = 4;
  google.protobuf.Struct attributes = 5;
  google.protobuf.Value value = 6;
  google.protobuf.ListValue list = 7;
  google.protobuf.Any any = 8;
  google.protobuf.FieldMask mask = 9;
  google.protobuf.StringValue email = 10;
  google.protobuf.Int64Value count = 11;
  google.protobuf.BoolValue flag = 12;
  google.protobuf.DoubleValue price = 13;
  google.protobuf.BytesValue blob = 14;
  google.protobuf.UInt32Value u32 = 15;
  google.protobuf.FloatValue f = 16;
  repeated google.protobuf.Timestamp times = 17;
  map<int32, google.protobuf.Timestamp> at_by_n = 18;
}

message Choice {
  oneof pick { string email = 1; Scalars scalars = 2; Known known = 3; Colour colour = 4; }
  map<int64, string> names = 5;
  map<bool, Colour> flags = 6;
  map<uint32, bytes> blobs = 7;
}
"""


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("kinds")
    (root / "kinds.proto").write_text(KINDS_PROTO)
    return load_catalog(protos=root)


def message_types(catalog: Catalog) -> list[Descriptor]:
    out: list[Descriptor] = []

    def walk(desc: Descriptor) -> None:
        if not desc.GetOptions().map_entry:
            out.append(desc)
        for nested in desc.nested_types:
            walk(nested)

    for proto in catalog.file_set.file:
        if proto.package.startswith("google."):
            continue
        for desc in catalog.pool.FindFileByName(proto.name).message_types_by_name.values():
            walk(desc)
    return out


def check_shape(msg: Message, depth: int = 0) -> None:
    """Every field set but one per oneof, enums valid and non-zero, repeated fields within bounds."""
    desc = msg.DESCRIPTOR
    for oneof in desc.oneofs:
        if len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name:
            continue
        assert msg.WhichOneof(oneof.name) is not None, f"{desc.full_name}.{oneof.name}: no member set"
    for field in desc.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            n = len(value)
            if field.message_type is not None and not is_map(field) and depth + 1 > MAX_DEPTH:
                assert n == 0
            elif field.message_type is None or field.message_type.full_name != "google.protobuf.Any":
                assert 1 <= n <= MAX_ITEMS or depth >= MAX_DEPTH, f"{desc.full_name}.{field.name}: {n}"
            if field.enum_type is not None:
                assert all(v != 0 for v in value)
            if field.message_type is not None and not is_map(field):
                for item in value:
                    check_shape(item, depth + 1)
        elif field.enum_type is not None and field.containing_oneof is None:
            assert value in {v.number for v in field.enum_type.values if v.number}
        elif field.type == FieldDescriptor.TYPE_STRING and field.containing_oneof is None:
            assert value, f"{desc.full_name}.{field.name} left empty"
        elif (
            field.message_type is not None
            and field.message_type.full_name.startswith("kinds.")
            and msg.HasField(field.name)
        ):
            check_shape(value, depth + 1)


@pytest.mark.parametrize("which", ["shop", "kinds"])
def test_every_type_round_trips_through_the_wire(which: str, request: pytest.FixtureRequest) -> None:
    """Every message type of protos/ (and one of every field kind) generates a valid message: its bytes
    parse back to an equal message, its proto3 JSON parses back too, and its shape holds."""
    catalog: Catalog = request.getfixturevalue(which)
    types = message_types(catalog)
    assert len(types) >= 4
    for desc in types:
        for seed in range(5):
            msg = generate(desc, seed)
            raw = msg.SerializeToString()
            back = type(msg)()
            back.ParseFromString(raw)
            assert back == msg, desc.full_name
            again = json_format.ParseDict(
                json_format.MessageToDict(msg, descriptor_pool=catalog.pool), type(msg)(),
                descriptor_pool=catalog.pool,
            )  # fmt: skip
            assert again == msg, desc.full_name
            check_shape(msg)


def test_field_names_choose_realistic_values(shop: Catalog) -> None:
    """Ids carry their field's stem, emails look like emails, money has an ISO code, times are set."""
    order = generate(shop.pool.FindMessageTypeByName("shop.v1.Order"), 11)
    assert order.order_id.startswith("order-") and len(order.order_id) == len("order-") + 8
    assert order.customer_id.startswith("customer-")
    assert len(order.total.currency_code) == 3 and order.total.currency_code.isupper()
    assert order.total.units >= 100
    assert order.audit.created_at.seconds > 1_700_000_000
    card = generate(shop.pool.FindMessageTypeByName("shop.v1.Card"), 2)
    assert 1 <= card.exp_month <= 12 and 2025 <= card.exp_year <= 2032
    assert card.number.isdigit()


def test_recursive_messages_end(kinds: Catalog) -> None:
    """A message holding itself is filled down to the depth bound, then left unset."""
    node = generate(kinds.pool.FindMessageTypeByName("kinds.v1.Node"), 3)
    depth = 0
    while node.HasField("parent"):
        node, depth = node.parent, depth + 1
    assert depth == MAX_DEPTH
    assert len(node.children) == 0 and len(node.by_name) == 0


def test_oneof_gets_one_member_of_each_kind_over_seeds(kinds: Catalog) -> None:
    """Across seeds each oneof member is chosen sometimes, and never two at once."""
    desc = kinds.pool.FindMessageTypeByName("kinds.v1.Choice")
    seen = {generate(desc, seed).WhichOneof("pick") for seed in range(60)}
    assert seen == {"email", "scalars", "known", "colour"}


def test_same_seed_same_message_other_seed_other(shop: Catalog) -> None:
    """Generation is a function of (seed, index): equal for equal arguments, different otherwise."""
    desc = shop.pool.FindMessageTypeByName("shop.v1.Item")
    a = generate(desc, 7).SerializeToString(deterministic=True)
    assert generate(desc, 7).SerializeToString(deterministic=True) == a
    assert generate(desc, 8).SerializeToString(deterministic=True) != a
    assert generate(desc, 7, 1).SerializeToString(deterministic=True) != a


# -- reply: {$generate: ...}


def compiled(shop: Catalog, method: str, value: Any) -> Any:
    site = new_site()
    out = synthetic.compile_generate(value, shop.method(method).output, site, "reply")
    assert not problems(site), problems(site)
    return out


def test_override_is_written_over_the_generated_message(shop: Catalog) -> None:
    """Overridden fields take the override (templates included); nested overrides keep their siblings."""
    spec = shop.method("shop.v1.Inventory/GetItem")
    value = {"$generate": {"seed": 7, "override": {"sku": "{{ request.sku }}", "dimensions": {"width_cm": 3},
                                                   "tags": ["a"]}}}  # fmt: skip
    body = compiled(shop, "shop.v1.Inventory/GetItem", value)
    out = body.render_json(make_call(spec, {"sku": "ABC-9"}), 0)
    base = to_json(generate(spec.output, 7))
    assert out["sku"] == "ABC-9"
    assert out["tags"] == ["a"]
    assert out["dimensions"] == {**base["dimensions"], "width_cm": 3.0}
    assert out["title"] == base["title"] and out["audit"] == base["audit"]


def test_misuse_is_located_with_the_closest_name(shop: Catalog) -> None:
    """An unknown $generate key or override field is reported at its line with the closest name."""
    doc = located(
        textwrap.dedent(
            """\
            reply:
              $generate:
                sede: 3
                override:
                  reservaton_id: r-1
            """
        )
    )
    site = new_site()
    synthetic.compile_generate(doc["reply"], shop.method("shop.v1.Inventory/Reserve").output, site, "reply")
    assert problems(site) == [
        'scenario.yaml:3: reply.$generate: unknown key "sede"; did you mean "seed"?; '
        "valid keys: seed, override",
        "scenario.yaml:5: reply.$generate.override.reservaton_id: unknown field "
        '"reservaton_id" of shop.v1.ReserveResponse; did you mean "reservation_id" or "reservationId"?',
    ]  # fmt: skip


SCENARIO = """\
scenario: synth
rules:
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: FIXED}}
    reply: {$generate: {seed: 7, override: {sku: "{{ request.sku }}"}}}
  - method: shop.v1.Inventory/GetItem
    reply: {$generate: {override: {sku: "{{ request.sku }}"}}}
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {$generate: {}}
      - reply: {$generate: {}}
"""
MD = (("x-virtsvc-scenario", "synth"),)


@pytest.fixture(scope="module")
def server(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualServer]:
    path = tmp_path_factory.mktemp("synth") / "synth.yaml"
    path.write_text(SCENARIO)
    with VirtualServer(catalog, load_scenarios([path], catalog)) as srv:
        yield srv


def get_item(
    server: VirtualServer, pb: Any, sku: str, *metadata: tuple[str, str]
) -> tuple[Any, dict[str, str]]:
    with grpc.insecure_channel(server.address) as ch:
        stub = pb.inv_grpc.InventoryStub(ch)
        reply, call = stub.GetItem.with_call(
            pb.inv.GetItemRequest(sku=sku), metadata=(*MD, *metadata), timeout=10
        )
        return reply, dict(call.initial_metadata())


def test_seeded_reply_over_grpc(server: VirtualServer, pb: Any, catalog: Catalog) -> None:
    """A seeded rule answers the generated message (with its override) on every call, and sends no seed."""
    first, headers = get_item(server, pb, "FIXED")
    second, _ = get_item(server, pb, "FIXED")
    expected = generate(catalog.pool.FindMessageTypeByName("shop.v1.Item"), 7)
    expected.sku = "FIXED"
    assert first.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert second == first
    assert "x-virtsvc-seed" not in headers


def test_seed_header_reproduces_an_unseeded_reply(server: VirtualServer, pb: Any) -> None:
    """Without a seed each call draws one and sends it back; a request carrying it gets the same reply."""
    a, headers_a = get_item(server, pb, "S-1")
    b, headers_b = get_item(server, pb, "S-1")
    assert headers_a["x-virtsvc-seed"] != headers_b["x-virtsvc-seed"] and a != b
    again, headers = get_item(server, pb, "S-1", ("x-virtsvc-seed", headers_a["x-virtsvc-seed"]))
    assert again == a and headers["x-virtsvc-seed"] == headers_a["x-virtsvc-seed"]
    assert a.sku == "S-1"


def test_bad_seed_header_is_a_clear_status(server: VirtualServer, pb: Any) -> None:
    """A seed header that is no integer fails the call with a message naming the header."""
    with pytest.raises(grpc.RpcError) as info:
        get_item(server, pb, "S-1", ("x-virtsvc-seed", "abc"))
    assert "x-virtsvc-seed: expected an integer seed" in (info.value.details() or "")


def test_generated_stream_items_differ_and_reproduce(server: VirtualServer, pb: Any) -> None:
    """Each generated stream message is its own (seeded by position); the seed header repeats the stream."""
    with grpc.insecure_channel(server.address) as ch:
        stub = pb.inv_grpc.InventoryStub(ch)
        call = stub.Watch(pb.inv.WatchRequest(skus=["A"]), metadata=MD, timeout=10)
        first = list(call)
        seed = dict(call.initial_metadata())["x-virtsvc-seed"]
        again = list(stub.Watch(pb.inv.WatchRequest(), metadata=(*MD, ("x-virtsvc-seed", seed)), timeout=10))
    assert len(first) == 2 and first[0] != first[1]
    assert again == first


def test_seed_is_drawn_from_the_session(shop: Catalog) -> None:
    """The call's seed is memoised: the header and the body of one call agree."""
    spec = shop.method("shop.v1.Inventory/GetItem")
    body = compiled(shop, "shop.v1.Inventory/GetItem", {"$generate": None})
    call = make_call(spec, {"sku": "x"}, session=MemorySession("s", "one"))
    seed = int(body.seed_header.render(call, 0))
    assert body.render(call, 0) == generate(spec.output, seed).SerializeToString(deterministic=True)


# -- virtsvc fake


def test_fake_prints_json_lines(tmp_path: Path) -> None:
    """``virtsvc fake TYPE --count N --seed S`` prints N messages, the same for the same seed."""
    args = ("fake", "shop.v1.Order", "--count", "3", "--seed", "5", "--protos", str(ROOT / "protos"))
    done = run_virtsvc(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    orders = [json.loads(line) for line in lines]
    assert orders[0]["order_id"].startswith("order-") and len({o["order_id"] for o in orders}) == 3
    assert run_virtsvc(*args, cwd=tmp_path).stdout == done.stdout


def test_fake_unknown_type_is_one_line(tmp_path: Path) -> None:
    """An unknown type is one line naming the closest types, exit 2, no traceback."""
    done = run_virtsvc("fake", "shop.v1.Itme", "--protos", str(ROOT / "protos"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        'virtsvc fake: unknown message type "shop.v1.Itme"; did you mean "shop.v1.Item" or '
        '"shop.v1.Order" or "shop.v1.Item.Dimensions"?'
    ]
    short = run_virtsvc("fake", "Item", "--protos", str(ROOT / "protos"), cwd=tmp_path)
    assert short.stderr.strip() == 'virtsvc fake: unknown message type "Item"; did you mean "shop.v1.Item"?'


def test_message_spec_fixture_is_usable(shop: Catalog) -> None:
    """A generated message fills any type as a reply body (the stand-in method of the test helpers)."""
    spec = message_spec(shop, "common.v1.Audit")
    body = compiled_any(shop, spec)
    out = body.render_json(make_call(spec), 0)
    assert out["actor"] and out["created_at"].startswith("2025-")


def compiled_any(shop: Catalog, spec: Any) -> Any:
    site = new_site()
    out = synthetic.compile_generate({"$generate": {"seed": 1}}, spec.output, site, "reply")
    assert not problems(site)
    return out


# -- the README's examples

README = (ROOT / "README.md").read_text()


def readme_block(lang: str, after: str) -> str:
    start = README.index(after)
    body = README[README.index(f"```{lang}\n", start) + len(lang) + 4 :]
    return body[: body.index("```")]


def test_readme_fake_example_prints_what_it_shows(tmp_path: Path) -> None:
    """The README's `virtsvc fake` console example prints exactly what it shows."""
    block = readme_block("console", "**`virtsvc fake`**").strip().splitlines()
    command, output = block[0].removeprefix("$ virtsvc ").split(), block[1:]
    done = run_virtsvc(*command, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == output
    unknown = run_virtsvc("fake", "Item", "--protos", "protos", cwd=ROOT)
    assert unknown.returncode == 2 and unknown.stderr.strip() in README


def test_readme_generated_replies_example(catalog: Catalog, pb: Any, tmp_path: Path) -> None:
    """The README's $generate scenario serves: the seeded rule repeats, the unseeded one reproduces by its
    header, and the stream's items differ."""
    path = tmp_path / "synthetic.yaml"
    path.write_text(readme_block("yaml", "**Generated replies.**"))
    md = (("x-virtsvc-scenario", "synthetic"),)
    with (
        VirtualServer(catalog, load_scenarios([path], catalog)) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb.inv_grpc.InventoryStub(ch)
        a = stub.GetItem(pb.inv.GetItemRequest(sku="FIXED-1"), metadata=md, timeout=10)
        assert stub.GetItem(pb.inv.GetItemRequest(sku="FIXED-1"), metadata=md, timeout=10) == a
        assert a.sku == "FIXED-1" and a.dimensions.width_cm == 30 and a.dimensions.height_cm > 0
        b, call = stub.GetItem.with_call(pb.inv.GetItemRequest(sku="X"), metadata=md, timeout=10)
        seed = dict(call.initial_metadata())["x-virtsvc-seed"]
        again = stub.GetItem(
            pb.inv.GetItemRequest(sku="X"), metadata=(*md, ("x-virtsvc-seed", seed)), timeout=10
        )
        assert again == b
        items = list(stub.Watch(pb.inv.WatchRequest(), metadata=md, timeout=10))
        assert len(items) == 2 and items[0] != items[1]
