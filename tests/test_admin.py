"""The admin API over the wire: a real VirtualServer on loopback, real grpc clients, no mocks."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from virtsvc import admin
from virtsvc.admin import ADMIN_SERVICE, AdminClient, build, messages
from virtsvc.contracts import Catalog
from virtsvc.scenarios import compile_text
from virtsvc.scenarios.model import CompiledScenario, Location, Rule, Step
from virtsvc.server import VirtualServer
from virtsvc.server.admin import add_admin

RESERVE = "shop.v1.Inventory/Reserve"

SHOP_V1 = """\
scenario: shop
version: 1
description: the happy path
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservation_id: r-1, qty_reserved: 2}
"""
SHOP_V2 = SHOP_V1.replace("version: 1", "version: 2").replace("r-1", "r-2")
SHOP_JSON = json.dumps(
    {
        "scenario": "shop-json",
        "version": "v7",
        "rules": [{"method": "shop.v1.Inventory/GetItem", "reply": {"sku": "J-1", "title": "from json"}}],
    }
)
SEQUENCE = """\
scenario: seq
rules:
  - method: shop.v1.Inventory/Reserve
    sequence:
      - reply: {reservation_id: s-1}
      - reply: {reservation_id: s-2}
      - reply: {reservation_id: s-3}
"""
# Line 6 holds the mistake: an unknown field of ReserveResponse.
INVALID = """\
scenario: shop
version: 3
rules:
  - method: shop.v1.Inventory/Reserve
    reply:
      reservation: r-3
"""
INVALID_MESSAGE = (
    '<admin>:6: reply.reservation: unknown field "reservation" of shop.v1.ReserveResponse; '
    'did you mean "reservationId" or "reservation_id"?'
)


@pytest.fixture
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    srv = VirtualServer(catalog, [], admin=True).start()
    yield srv
    srv.stop(0)


@pytest.fixture
def channel(server: VirtualServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def client(channel: grpc.Channel) -> AdminClient:
    return AdminClient(channel)


def refused(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call expected to fail."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def reserve(
    catalog: Catalog,
    channel: grpc.Channel,
    scenario: str | None = "shop",
    session: str | None = None,
    sku: str = "A",
) -> str:
    """Calls the virtual Inventory/Reserve and returns the reservation id."""
    spec = catalog.method(RESERVE)
    call = channel.unary_unary(
        spec.path,
        request_serializer=spec.input_class.SerializeToString,
        response_deserializer=spec.output_class.FromString,
    )
    metadata = []
    if scenario is not None:
        metadata.append(("x-virtsvc-scenario", scenario))
    if session is not None:
        metadata.append(("x-virtsvc-session", session))
    return str(call(spec.input_class(sku=sku, qty=1), metadata=metadata, timeout=5).reservation_id)


# -- the descriptor set ---------------------------------------------------------------------------------


def test_binpb_matches_proto() -> None:
    """admin.binpb is admin.proto compiled: rerun `python virtsvc/admin/build.py` after editing the proto."""
    shipped = build.BINPB.read_bytes()
    assert build.admin_file(shipped) == build.admin_file(build.build())
    assert build.main(["--check"]) == 0


def test_message_classes_come_from_the_private_pool() -> None:
    """No generated modules: the classes live in the admin's own pool, the default pool is untouched."""
    request = messages.PutScenarioRequest(text="x")
    assert request.DESCRIPTOR.full_name == "virtsvc.admin.v1.PutScenarioRequest"
    assert request.DESCRIPTOR.file is admin.admin_file_descriptor()
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("virtsvc.admin.v1.PutScenarioRequest")
    assert set(admin.METHODS) == {
        "ListScenarios", "PutScenario", "DeleteScenario", "ResetSession", "GetJournal", "PutSessionRules",
        "ClearSessionRules", "WatchJournal", "ListStreams", "PushMessage", "EndStream",
        "SetClock", "AdvanceClock", "GetClock",
    }  # fmt: skip


# -- scenarios -----------------------------------------------------------------------------------------


def test_put_list_call_replace_delete(catalog: Catalog, channel: grpc.Channel, client: AdminClient) -> None:
    """A put scenario answers the next call; a new version the one after; after a delete, NOT_FOUND."""
    assert list(client.call("PutScenario", text=SHOP_V1).names) == ["shop"]
    listed = client.call("ListScenarios").scenarios
    assert [(s.name, s.version, s.description, s.source, list(s.methods), s.rule_count) for s in listed] == [
        ("shop", "1", "the happy path", "<admin>:1", [RESERVE], 1)
    ]
    assert reserve(catalog, channel) == "r-1"

    reply = client.call("PutScenario", text=SHOP_V2)
    assert (list(reply.names), list(reply.replaced)) == (["shop"], ["shop"])
    assert reserve(catalog, channel) == "r-2"
    assert client.call("ListScenarios").scenarios[0].version == "2"

    client.call("DeleteScenario", name="shop")
    assert client.call("ListScenarios").scenarios == []
    code, details = refused(reserve, catalog, channel)
    assert code is grpc.StatusCode.NOT_FOUND
    assert details == 'unknown scenario "shop"; loaded scenarios: none'


def test_put_json(catalog: Catalog, channel: grpc.Channel, client: AdminClient) -> None:
    """JSON text is accepted like YAML; ListScenarios sorts by name."""
    client.call("PutScenario", text=SHOP_V1)
    assert list(client.call("PutScenario", text=SHOP_JSON).names) == ["shop-json"]
    listed = client.call("ListScenarios").scenarios
    assert [(s.name, s.version) for s in listed] == [("shop", "1"), ("shop-json", "v7")]
    spec = catalog.method("shop.v1.Inventory/GetItem")
    item = channel.unary_unary(
        spec.path,
        request_serializer=spec.input_class.SerializeToString,
        response_deserializer=spec.output_class.FromString,
    )(spec.input_class(sku="J-1"), metadata=[("x-virtsvc-scenario", "shop-json")], timeout=5)
    assert (item.sku, item.title) == ("J-1", "from json")


def test_invalid_put_leaves_the_loaded_scenario(
    catalog: Catalog, channel: grpc.Channel, client: AdminClient
) -> None:
    """Invalid text answers INVALID_ARGUMENT with the located problems; the old version keeps answering."""
    client.call("PutScenario", text=SHOP_V1)
    code, details = refused(client.call, "PutScenario", text=INVALID)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == INVALID_MESSAGE
    assert reserve(catalog, channel) == "r-1"
    assert client.call("ListScenarios").scenarios[0].version == "1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "<admin>: no scenario in the text (expected a mapping with scenario: and rules:)"),
        ("scenario: shop\nrules: [oops", "<admin>:"),
        ("from virtsvc import Scenario\nscenario = Scenario('py')\n", "<admin>:"),
    ],
    ids=["empty", "broken-yaml", "python"],
)
def test_put_refuses_bad_text(client: AdminClient, text: str, expected: str) -> None:
    """Empty text, broken YAML and Python source are all INVALID_ARGUMENT with located text."""
    code, details = refused(client.call, "PutScenario", text=text)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(expected)
    assert client.call("ListScenarios").scenarios == []


def test_several_documents_all_or_none(client: AdminClient) -> None:
    """Several YAML documents are put together, or (one invalid) none of them."""
    two = SHOP_V1 + "---\n" + SEQUENCE
    assert list(client.call("PutScenario", text=two).names) == ["shop", "seq"]
    client.call("DeleteScenario", name="shop")
    client.call("DeleteScenario", name="seq")
    code, details = refused(client.call, "PutScenario", text=SEQUENCE + "---\n" + INVALID)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("<admin>:")
    assert client.call("ListScenarios").scenarios == []


def test_extends(catalog: Catalog, channel: grpc.Channel, client: AdminClient) -> None:
    """A put scenario may extend a loaded one; the parent cannot be deleted while extended; no cycles."""
    client.call("PutScenario", text=SHOP_V1)
    child = "scenario: child\nextends: shop\nrules:\n  - method: shop.v1.Inventory/Ping\n    reply: {}\n"
    client.call("PutScenario", text=child)
    assert reserve(catalog, channel, scenario="child") == "r-1"
    info = {s.name: s for s in client.call("ListScenarios").scenarios}["child"]
    assert (info.extends, list(info.methods), info.rule_count) == (
        "shop",
        ["shop.v1.Inventory/Ping", RESERVE],
        1,
    )

    code, details = refused(client.call, "DeleteScenario", name="shop")
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert details == 'scenario "shop" is extended by "child": delete them or change their extends first'

    cycle = SHOP_V1.replace("version: 1", "version: 1\nextends: child")
    code, details = refused(client.call, "PutScenario", text=cycle)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "<admin>:3: extends: the scenarios extend each other in a cycle: shop -> child -> shop"

    client.call("DeleteScenario", name="child")
    client.call("DeleteScenario", name="shop")


def test_delete_unknown_and_empty(client: AdminClient) -> None:
    """NOT_FOUND names the loaded scenarios (and the closest one); an empty name is INVALID_ARGUMENT."""
    client.call("PutScenario", text=SHOP_V1)
    assert refused(client.call, "DeleteScenario", name="shopp") == (
        grpc.StatusCode.NOT_FOUND,
        'unknown scenario "shopp"; did you mean "shop"?; loaded scenarios: shop',
    )
    assert refused(client.call, "DeleteScenario", name="") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "give the name of the scenario to delete; loaded scenarios: shop",
    )


def test_delete_drops_sessions_and_journal(
    catalog: Catalog, channel: grpc.Channel, client: AdminClient, server: VirtualServer
) -> None:
    client.call("PutScenario", text=SEQUENCE)
    reserve(catalog, channel, scenario="seq", session="a")
    reserve(catalog, channel, scenario="seq", session="b")
    assert client.call("DeleteScenario", name="seq").sessions_dropped == 2
    assert client.call("GetJournal", scenario="seq").entries == []
    client.call("PutScenario", text=SEQUENCE)
    assert reserve(catalog, channel, scenario="seq", session="a") == "s-1"  # a fresh start


def test_script_scenario_can_be_replaced(catalog: Catalog) -> None:
    """A scenario loaded from a Python script may be replaced through the API (it becomes YAML's)."""
    spec = catalog.method(RESERVE)

    class Static:
        static = spec.output_class(reservation_id="from-script").SerializeToString()
        needs_request = False

    where = Location("scenarios/shop.py", 4)
    rule = Rule("shop", "0", RESERVE, where, steps=(Step(where, body=Static()),))  # type: ignore[arg-type]
    scripted = CompiledScenario("shop", Location("scenarios/shop.py", 3), (rule,), from_script=True)
    with VirtualServer(catalog, [scripted], admin=True) as srv, grpc.insecure_channel(srv.address) as ch:
        client = AdminClient(ch)
        listed = client.call("ListScenarios").scenarios[0]
        assert (listed.source, listed.from_script, listed.version) == ("scenarios/shop.py:3", True, "")
        assert reserve(catalog, ch) == "from-script"
        client.call("PutScenario", text=SHOP_V1)
        assert reserve(catalog, ch) == "r-1"
        assert client.call("ListScenarios").scenarios[0].from_script is False


def test_list_names_the_default_scenario(catalog: Catalog, client: AdminClient) -> None:
    """ListScenarios says which scenario answers calls naming none, and nothing when none does."""
    assert client.call("ListScenarios").default_scenario == ""
    (shop,) = compile_text(SHOP_V1, catalog)
    with (
        VirtualServer(catalog, [shop], admin=True, default_scenario="shop") as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        assert AdminClient(ch).call("ListScenarios").default_scenario == "shop"
        assert reserve(catalog, ch, scenario=None) == "r-1"


# -- sessions ------------------------------------------------------------------------------------------


def test_reset_session_restarts_a_sequence(
    catalog: Catalog, channel: grpc.Channel, client: AdminClient
) -> None:
    """Replacing a scenario keeps its sessions' counters; ResetSession restarts them."""
    client.call("PutScenario", text=SEQUENCE)
    assert [reserve(catalog, channel, "seq") for _ in range(2)] == ["s-1", "s-2"]
    client.call("PutScenario", text=SEQUENCE.replace("s-3", "s-3b"))  # counters kept (documented)
    assert reserve(catalog, channel, "seq") == "s-3b"
    assert client.call("ResetSession", scenario="seq").existed is True  # empty session: "default"
    assert reserve(catalog, channel, "seq") == "s-1"
    assert client.call("ResetSession", scenario="seq", session="never-used").existed is False
    assert refused(client.call, "ResetSession", scenario="sq", session="x") == (
        grpc.StatusCode.NOT_FOUND,
        'unknown scenario "sq"; did you mean "seq"?; loaded scenarios: seq',
    )


def test_reset_touches_one_session_only(catalog: Catalog, channel: grpc.Channel, client: AdminClient) -> None:
    client.call("PutScenario", text=SEQUENCE)
    assert reserve(catalog, channel, "seq", "a") == "s-1"
    assert reserve(catalog, channel, "seq", "b") == "s-1"
    client.call("ResetSession", scenario="seq", session="a")
    assert reserve(catalog, channel, "seq", "a") == "s-1"
    assert reserve(catalog, channel, "seq", "b") == "s-2"
    assert [e.session for e in client.call("GetJournal", scenario="seq").entries] == ["b", "a", "b"]


SESSION_RULES = """\
- method: shop.v1.Inventory/Reserve
  reply: {reservation_id: from-session}
- method: shop.v1.Inventory/Reserve
  priority: 5
  when: {request: {sku: VIP}}
  reply: {reservation_id: vip}
"""


def test_session_rules_win_for_their_session_only(
    catalog: Catalog, channel: grpc.Channel, client: AdminClient
) -> None:
    client.call("PutScenario", text=SHOP_V1)
    assert client.call("PutSessionRules", scenario="shop", session="s1", text=SESSION_RULES).rule_count == 2
    assert reserve(catalog, channel, session="s1") == "from-session"
    assert reserve(catalog, channel, session="s1", sku="VIP") == "vip"  # priority first
    assert reserve(catalog, channel, session="s2") == "r-1"  # another session: the scenario's rules
    assert reserve(catalog, channel) == "r-1"
    # A reset drops the session with its rules.
    assert client.call("ResetSession", scenario="shop", session="s1").existed is True
    assert reserve(catalog, channel, session="s1") == "r-1"


def test_session_rules_replace_and_keep_counters(
    catalog: Catalog, channel: grpc.Channel, client: AdminClient
) -> None:
    """Re-putting rules keeps the counters of rules at the same position; ClearSessionRules restarts them."""
    client.call("PutScenario", text=SHOP_V1)
    rules = (
        "rules:\n  - method: shop.v1.Inventory/Reserve\n"
        "    sequence: [{reply: {reservation_id: q-1}}, {reply: {reservation_id: q-2}}]\n"
    )
    client.call("PutSessionRules", scenario="shop", session="s", text=rules)
    assert [reserve(catalog, channel, session="s") for _ in range(2)] == ["q-1", "q-2"]
    client.call("PutSessionRules", scenario="shop", session="s", text=rules)  # the sequence goes on
    assert reserve(catalog, channel, session="s") == "q-2"
    client.call("ClearSessionRules", scenario="shop", session="s")
    client.call("PutSessionRules", scenario="shop", session="s", text=rules)  # cleared: starts over
    assert reserve(catalog, channel, session="s") == "q-1"
    once = "- method: shop.v1.Inventory/Reserve\n  times: 1\n  reply: {reservation_id: once}\n"
    client.call("PutSessionRules", scenario="shop", session="s", text=once)  # replaces, not adds
    assert [reserve(catalog, channel, session="s") for _ in range(2)] == ["once", "r-1"]


def test_clear_session_rules(catalog: Catalog, channel: grpc.Channel, client: AdminClient) -> None:
    client.call("PutScenario", text=SHOP_V1)
    client.call("PutSessionRules", scenario="shop", session="s1", text=SESSION_RULES)
    assert client.call("ClearSessionRules", scenario="shop", session="s1").rule_count == 2
    assert reserve(catalog, channel, session="s1") == "r-1"
    assert client.call("ClearSessionRules", scenario="shop", session="nobody").rule_count == 0


def test_session_rules_without_a_scenario(
    catalog: Catalog, channel: grpc.Channel, client: AdminClient
) -> None:
    """With an empty scenario, the session header alone selects the session's own rules."""
    client.call("PutSessionRules", scenario="", session="t1", text=SESSION_RULES)
    assert reserve(catalog, channel, scenario=None, session="t1") == "from-session"
    code, details = refused(reserve, catalog, channel, scenario=None, session="t2")
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("no scenario selected")
    client.call("ClearSessionRules", scenario="", session="t1")
    assert (
        refused(reserve, catalog, channel, scenario=None, session="t1")[0]
        is grpc.StatusCode.FAILED_PRECONDITION
    )
    client.call("PutSessionRules", scenario="", text=SESSION_RULES)  # empty session: "default"
    assert reserve(catalog, channel, scenario=None) == "from-session"
    assert client.call("ResetSession").existed is True
    assert refused(reserve, catalog, channel, scenario=None)[0] is grpc.StatusCode.FAILED_PRECONDITION


def test_session_rules_refusals(client: AdminClient) -> None:
    client.call("PutScenario", text=SHOP_V1)
    assert refused(client.call, "PutSessionRules", scenario="shoq", session="s", text=SESSION_RULES) == (
        grpc.StatusCode.NOT_FOUND,
        'unknown scenario "shoq"; did you mean "shop"?; loaded scenarios: shop',
    )
    bad = (
        "- method: shop.v1.Inventory/Reserve\n  reply: {reservation_id: x}\n"
        "- method: shop.v1.Inventory/Reserv\n  reply: {}\n"
    )
    code, details = refused(client.call, "PutSessionRules", scenario="shop", session="s", text=bad)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        '<admin>:3: unknown method "shop.v1.Inventory/Reserv"; did you mean "shop.v1.Inventory/Reserve"?'
    )
    assert (
        refused(client.call, "ClearSessionRules", scenario="nope", session="s")[0]
        is grpc.StatusCode.NOT_FOUND
    )


# -- journal -------------------------------------------------------------------------------------------


def test_journal_filters_limit_and_fields(
    catalog: Catalog, channel: grpc.Channel, client: AdminClient
) -> None:
    client.call("PutScenario", text=SHOP_V1)
    reserve(catalog, channel, session="a", sku="A-1")
    reserve(catalog, channel, session="b", sku="B-1")
    reserve(catalog, channel, session="a", sku="A-2")
    item = catalog.method("shop.v1.Inventory/GetItem")
    metadata = [("x-virtsvc-scenario", "shop"), ("x-virtsvc-session", "a")]
    code, _ = refused(channel.unary_unary(item.path), b"", metadata=metadata, timeout=5)
    assert code is grpc.StatusCode.UNIMPLEMENTED

    def skus(**filters: Any) -> list[str]:
        entries = client.call("GetJournal", **filters).entries
        return [json_format.MessageToDict(e.request).get("sku", e.method) for e in entries]

    assert skus() == ["A-1", "B-1", "A-2", "shop.v1.Inventory/GetItem"]  # oldest first
    assert skus(session="a") == ["A-1", "A-2", "shop.v1.Inventory/GetItem"]
    assert skus(method=RESERVE, session="a") == ["A-1", "A-2"]
    assert (
        skus(method="/shop.v1.Inventory/Reserve")
        == skus(method="shop.v1.Inventory.Reserve")
        == ["A-1", "B-1", "A-2"]
    )
    assert skus(limit=2) == ["A-2", "shop.v1.Inventory/GetItem"]  # the newest
    assert skus(scenario="other") == []

    entries = client.call("GetJournal", session="a").entries
    ok, missed = entries[0], entries[-1]
    assert (ok.scenario, ok.scenario_version.number_value, ok.session, ok.method, ok.kind) == (
        "shop",
        1,
        "a",
        RESERVE,
        "unary",
    )
    assert (ok.code, ok.message, ok.rule, ok.near_miss, ok.matched) == ("OK", "", "<admin>:5", "", True)
    assert ok.metadata["x-virtsvc-session"] == "a"
    assert json_format.MessageToDict(ok.request) == {"sku": "A-1", "qty": 1.0}
    assert [json_format.MessageToDict(r) for r in ok.requests] == [{"sku": "A-1", "qty": 1.0}]
    assert json_format.MessageToDict(ok.reply) == {"reservationId": "r-1", "qtyReserved": 2.0}
    assert len(ok.replies) == 1
    assert ok.started_at.seconds > 1_600_000_000 and ok.duration.ToNanoseconds() > 0
    assert entries[0].seq < entries[1].seq
    assert (missed.code, missed.matched, missed.rule, missed.HasField("reply")) == (
        "UNIMPLEMENTED",
        False,
        "",
        False,
    )
    assert missed.near_miss == missed.message and "no rule for shop.v1.Inventory/GetItem" in missed.near_miss


def test_journal_unknown_method(client: AdminClient) -> None:
    code, details = refused(client.call, "GetJournal", method="shop.v1.Inventory/Reserv")
    assert code is grpc.StatusCode.NOT_FOUND
    assert details == ('unknown method "shop.v1.Inventory/Reserv"; did you mean "shop.v1.Inventory/Reserve"?')


# -- token ---------------------------------------------------------------------------------------------


def test_token(catalog: Catalog) -> None:
    """With a token every admin call needs it; the refusal never shows it; virtual calls need no token."""
    with (
        VirtualServer(catalog, [], admin=True, admin_token="s3cret-t0ken") as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        for client in (AdminClient(ch), AdminClient(ch, token="wrong")):
            code, details = refused(client.call, "ListScenarios")
            assert (code, details) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "admin calls need authorization: Bearer <token>",
            )
        code, _ = refused(AdminClient(ch).call, "PutScenario", text=SHOP_V1)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        client = AdminClient(ch, token="s3cret-t0ken")
        client.call("PutScenario", text=SHOP_V1)
        assert reserve(catalog, ch) == "r-1"
        lower = ch.unary_unary(
            f"/{ADMIN_SERVICE}/ListScenarios",
            request_serializer=messages.ListScenariosRequest.SerializeToString,
            response_deserializer=messages.ListScenariosResponse.FromString,
        )
        reply = lower(messages.ListScenariosRequest(), metadata=[("authorization", "bearer s3cret-t0ken")])
        assert [s.name for s in reply.scenarios] == ["shop"]


def test_token_given_to_add_admin(catalog: Catalog) -> None:
    """add_admin(server, vserver, token) on a grpc server of one's own."""
    from concurrent import futures

    vserver = VirtualServer(catalog, [])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    assert add_admin(server, vserver, token="t") == ADMIN_SERVICE
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert (
                refused(AdminClient(ch, token="u").call, "ListScenarios")[0]
                is grpc.StatusCode.UNAUTHENTICATED
            )
            assert AdminClient(ch, token="t").call("ListScenarios").scenarios == []
    finally:
        server.stop(None)


# -- reflection and grpcurl ----------------------------------------------------------------------------


def test_reflection_lists_and_describes_admin(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    assert ADMIN_SERVICE in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName(ADMIN_SERVICE)
    assert set(service.methods_by_name) == set(admin.METHODS)
    # A client that knows only reflection and JSON (what grpcurl does) can call it.
    method = service.methods_by_name["PutScenario"]
    request = json_format.Parse(
        json.dumps({"text": SHOP_V1}), message_factory.GetMessageClass(method.input_type)()
    )
    call = channel.unary_unary(
        f"/{ADMIN_SERVICE}/PutScenario",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
    )
    assert json_format.MessageToDict(call(request, timeout=5)) == {"names": ["shop"]}


def test_admin_file_joins_the_catalog_pool(catalog: Catalog, server: VirtualServer) -> None:
    assert catalog.pool.FindFileByName("virtsvc/admin/v1/admin.proto").package == "virtsvc.admin.v1"
    assert admin.admin_file_descriptor().name == "virtsvc/admin/v1/admin.proto"


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl(catalog: Catalog, server: VirtualServer, channel: grpc.Channel) -> None:
    """The documented grpcurl lines work: JSON in, JSON out, through reflection."""

    def grpcurl(method: str, body: dict[str, Any]) -> Any:
        out = subprocess.run(
            ["grpcurl", "-plaintext", "-d", json.dumps(body), server.address, f"{ADMIN_SERVICE}/{method}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(out.stdout)

    assert grpcurl("PutScenario", {"text": SHOP_V1}) == {"names": ["shop"]}
    assert reserve(catalog, channel, session="g") == "r-1"
    journal = grpcurl("GetJournal", {"session": "g", "limit": 1})
    [entry] = journal["entries"]
    assert entry["reply"] == {"reservationId": "r-1", "qtyReserved": 2}
    assert entry["scenarioVersion"] == 1
    assert entry["code"] == "OK" and entry["duration"].endswith("s") and entry["startedAt"].endswith("Z")
    assert grpcurl("ListScenarios", {})["scenarios"][0]["name"] == "shop"
    assert grpcurl("PutSessionRules", {"scenario": "shop", "session": "g", "text": SESSION_RULES}) == {
        "ruleCount": 2
    }
    assert grpcurl("ClearSessionRules", {"scenario": "shop", "session": "g"}) == {"ruleCount": 2}
    assert grpcurl("ResetSession", {"scenario": "shop", "session": "g"}) == {"existed": True}
    assert grpcurl("DeleteScenario", {"name": "shop"}) == {}
