"""Matching every message of a client stream, the list, glob and ``$anyOf`` operators, and the per-scenario
``unmatched`` status: in YAML, JSON, the Python builder and the test-side builders, over real grpc calls;
``virtsvc check`` reports their misuse at ``file:line``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import fails

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.scenarios import Scenario, load_scenarios, status
from virtsvc.scenarios.loader import check_paths
from virtsvc.testing import VirtualService

TIMEOUT = 5.0

STREAMS_YAML = """\
scenario: streams
rules:
  - method: shop.v1.Inventory/BulkUpdate            # rule: exact
    when:
      requests:
        - {sku: A}
        - {sku: B, count: {$gte: 2}}
    reply: {accepted: 2}
  - method: shop.v1.Inventory/BulkUpdate            # rule: every
    when:
      every_request: {warehouse: {$glob: "ams-?"}}
    reply: {accepted: 100}
  - method: shop.v1.Inventory/BulkUpdate            # rule: any
    when:
      any_request: {sku: STOP}
    reply: {rejected: 1, rejected_skus: [STOP]}
  - method: shop.v1.Inventory/ListItems             # rule: all
    when: {request: {tags: {$all: [red, big]}}}
    reply: {items: [{sku: all}]}
  - method: shop.v1.Inventory/ListItems             # rule: unordered
    when: {request: {tags: {$unordered: [x, y]}}}
    reply: {items: [{sku: unordered}]}
  - method: shop.v1.Inventory/ListItems             # rule: each-regex
    when: {request: {tags: {$regex: ["^v\\\\d+$", "^(eu|us)$"]}}}
    reply: {items: [{sku: each-regex}]}
  - method: shop.v1.Inventory/Reserve               # rule: any-of
    when:
      metadata: {x-env: prod}
      $anyOf:
        - metadata: {x-role: admin}
        - metadata: {x-user: {$regex: "^root"}}
    reply: {reservation_id: privileged}
  - method: shop.v1.Inventory/Reserve               # rule: number-regex
    when: {request: {qty: {$regex: "^1\\\\d$"}, sku: {$anyOf: [A, {$glob: "b*"}]}}}
    reply: {reservation_id: teen}
"""

UNMATCHED_YAML = """\
scenario: gone
unmatched: {code: NOT_FOUND, message: No matching stub found}
rules:
  - method: shop.v1.Inventory/Reserve               # rule: gone-reserve
    when: {request: {sku: A}}
    reply: {reservation_id: a}
---
scenario: gone-child
extends: gone
rules: []
---
scenario: plain-unmatched
unmatched: FAILED_PRECONDITION
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: A}}
    reply: {reservation_id: a}
"""


def at(path: Path, marker: str) -> str:
    """``file:line`` of the rule tagged ``# rule: MARKER``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.rstrip().endswith(f"# rule: {marker}"):
            return f"{path}:{number}"
    raise AssertionError(marker)


def md(scenario: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", scenario), *((k.replace("_", "-"), v) for k, v in extra.items()))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("stream-matching")
    (root / "streams.yaml").write_text(STREAMS_YAML)
    (root / "unmatched.yaml").write_text(UNMATCHED_YAML)
    return SimpleNamespace(root=root, streams=root / "streams.yaml", unmatched=root / "unmatched.yaml")


@pytest.fixture(scope="module")
def server(catalog: Catalog, files: SimpleNamespace) -> Iterator[VirtualServer]:
    scenarios = load_scenarios([files.streams, files.unmatched], catalog)
    with VirtualServer(catalog, scenarios) as srv:
        yield srv


def counts(pb: SimpleNamespace, *items: tuple[str, int, str]) -> Iterator[Any]:
    for sku, count, warehouse in items:
        yield pb.inv.StockCount(sku=sku, count=count, warehouse=warehouse)


def test_requests_matches_element_by_element_with_the_count(
    inv: Any, pb: SimpleNamespace, files: SimpleNamespace
) -> None:
    """``when.requests`` holds when message i meets condition i and the stream has exactly that many."""
    summary = inv.BulkUpdate(counts(pb, ("A", 1, ""), ("B", 2, "")), metadata=md("streams"), timeout=TIMEOUT)
    assert summary.accepted == 2
    err = fails(inv.BulkUpdate, counts(pb, ("A", 1, "")), metadata=md("streams"), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert (
        f"  closest: rule at {at(files.streams, 'exact')} (1 of 4 conditions held): "
        "requests: expected 2 messages, got 1"
    ) in err.details()
    err = fails(inv.BulkUpdate, counts(pb, ("A", 1, ""), ("B", 1, ""), ("C", 1, "")), metadata=md("streams"))
    assert (
        f"rule at {at(files.streams, 'exact')} (2 of 4 conditions held): requests: expected 2 messages, "
        "got 3; requests[1].count: expected >= 2, got 1"
    ) in err.details()


def test_every_and_any_request(inv: Any, pb: SimpleNamespace, files: SimpleNamespace) -> None:
    """``every_request`` needs each message to match, ``any_request`` one; misses say which message."""
    assert (
        inv.BulkUpdate(counts(pb, ("A", 1, "ams-1"), ("Z", 9, "ams-2")), metadata=md("streams")).accepted
        == 100
    )
    reply = inv.BulkUpdate(counts(pb, ("A", 1, "ams-1"), ("STOP", 0, "lhr")), metadata=md("streams"))
    assert list(reply.rejected_skus) == ["STOP"]
    err = fails(inv.BulkUpdate, counts(pb, ("X", 1, "ams-1"), ("Y", 1, "ams-22")), metadata=md("streams"))
    assert (
        f"rule at {at(files.streams, 'every')} (0 of 1 conditions held): message 1: "
        'every_request.warehouse: expected to match the glob "ams-?", got "ams-22"'
    ) in err.details()
    assert (
        f"rule at {at(files.streams, 'any')} (0 of 1 conditions held): no message matched (closest, "
        'message 0: any_request.sku: expected "STOP", got "X")'
    ) in err.details()


@pytest.mark.parametrize(
    ("tags", "answered_by"),
    [
        (["big", "small", "red"], "all"),  # every listed tag, any order, others allowed
        (["y", "x"], "unordered"),  # the same tags, any order
        (["v12", "eu"], "each-regex"),  # pattern i matches tag i
    ],
)
def test_repeated_field_operators(inv: Any, pb: SimpleNamespace, tags: list[str], answered_by: str) -> None:
    """``$all``, ``$unordered`` and a list of ``$regex`` patterns match repeated fields."""
    reply = inv.ListItems(pb.inv.ListItemsRequest(tags=tags), metadata=md("streams"), timeout=TIMEOUT)
    assert [i.sku for i in reply.items] == [answered_by]


def test_repeated_field_operators_explain_misses(
    inv: Any, pb: SimpleNamespace, files: SimpleNamespace
) -> None:
    """A list that none of them accepts: each rule's failure names the list it got."""
    err = fails(inv.ListItems, pb.inv.ListItemsRequest(tags=["x", "y", "x"]), metadata=md("streams"))
    details = err.details()
    assert (
        f"rule at {at(files.streams, 'unordered')} (0 of 1 conditions held): "
        'request.tags: expected ["x", "y"] in any order, got ["x", "y", "x"]'
    ) in details
    assert (
        f"rule at {at(files.streams, 'all')} (0 of 1 conditions held): "
        'request.tags: expected to contain all of ["red", "big"], got ["x", "y", "x"]'
    ) in details
    assert (
        f"rule at {at(files.streams, 'each-regex')} (0 of 1 conditions held): "
        'request.tags: expected 2 elements, got ["x", "y", "x"]'
    ) in details


def test_any_of_and_regex_on_numbers(inv: Any, pb: SimpleNamespace, files: SimpleNamespace) -> None:
    """``$anyOf`` ORs whole when blocks, or values of a field; ``$regex`` reads a number's text."""
    req = pb.inv.ReserveRequest(sku="none", qty=1)
    assert (
        inv.Reserve(req, metadata=md("streams", x_env="prod", x_role="admin")).reservation_id == "privileged"
    )
    assert (
        inv.Reserve(req, metadata=md("streams", x_env="prod", x_user="rooty")).reservation_id == "privileged"
    )
    teen = pb.inv.ReserveRequest(sku="bolt", qty=13)
    assert inv.Reserve(teen, metadata=md("streams")).reservation_id == "teen"
    err = fails(inv.Reserve, pb.inv.ReserveRequest(sku="C", qty=21), metadata=md("streams", x_env="prod"))
    details = err.details()
    assert (
        f"rule at {at(files.streams, 'any-of')} (1 of 2 conditions held): $anyOf: none of the 2 alternatives "
        'held: (1) metadata.x-role: expected "admin", got nothing | (2) metadata.x-user: expected to match '
        "/^root/, got nothing"
    ) in details
    assert (
        f"rule at {at(files.streams, 'number-regex')} (0 of 2 conditions held): request.qty: expected to "
        "match /^1\\d$/, got 21; request.sku: $anyOf: none of the 2 alternatives held: (1) request.sku: "
        'expected "A", got "C" | (2) request.sku: expected to match the glob "b*", got "C"'
    ) in details


def test_unmatched_status_keeps_the_near_miss_in_a_detail(
    server: VirtualServer, inv: Any, pb: SimpleNamespace, files: SimpleNamespace
) -> None:
    """``unmatched:`` sets the code and message of unmatched calls (also for a scenario extending it); the
    near-miss report travels as a DebugInfo detail and stays the journal's near miss."""
    for scenario in ("gone", "gone-child"):
        err = fails(inv.Reserve, pb.inv.ReserveRequest(sku="B"), metadata=md(scenario), timeout=TIMEOUT)
        assert err.code() is grpc.StatusCode.NOT_FOUND
        assert err.details() == "No matching stub found"
        rich = rpc_status.from_call(err)
        assert rich is not None
        info = error_details_pb2.DebugInfo()
        assert rich.details[0].Unpack(info)
        assert info.detail == (
            f'no rule matched shop.v1.Inventory/Reserve in scenario "{scenario}", session "default"\n'
            f"  closest: rule at {at(files.unmatched, 'gone-reserve')} (0 of 1 conditions held): "
            'request.sku: expected "A", got "B"'
        )
        entry = server.journal.entries()[-1]
        assert entry.near_miss == info.detail
    # a method the scenario has no rule for is unmatched too; with no message, the text is the near miss
    err = fails(inv.Ping, empty_pb2.Empty(), metadata=md("plain-unmatched"), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith('no rule for shop.v1.Inventory/Ping in scenario "plain-unmatched"')


def test_json_and_python_builders(catalog: Catalog, tmp_path: Path, pb: SimpleNamespace) -> None:
    """The same conditions written as JSON and with the Python builder answer alike."""
    (tmp_path / "s.json").write_text(
        json.dumps(
            {
                "scenario": "json-streams",
                "unmatched": {"code": "NOT_FOUND"},
                "rules": [
                    {
                        "method": "shop.v1.Inventory/BulkUpdate",
                        "when": {"every_request": {"count": {"$regex": "^[0-9]+$"}}},
                        "reply": {"accepted": 7},
                    }
                ],
            }
        )
    )
    built = Scenario("py-streams", unmatched=status("NOT_FOUND", "nothing here"))
    built.on(
        "shop.v1.Inventory/BulkUpdate",
        when={"requests": [{"sku": {"$glob": "[a-c]*"}}], "any_request": {"warehouse": "w"}},
    ).reply({"accepted": 8})
    scenarios = load_scenarios(tmp_path / "s.json", catalog)
    (tmp_path / "built.json").write_text(json.dumps(built.to_data(handlers=False)))
    scenarios += load_scenarios(tmp_path / "built.json", catalog)
    with VirtualServer(catalog, scenarios) as srv, grpc.insecure_channel(srv.address) as channel:
        inv = pb.inv_grpc.InventoryStub(channel)
        assert (
            inv.BulkUpdate(counts(pb, ("a", 1, ""), ("b", 22, "")), metadata=md("json-streams")).accepted == 7
        )
        assert inv.BulkUpdate(counts(pb, ("bolt", 1, "w")), metadata=md("py-streams")).accepted == 8
        err = fails(inv.BulkUpdate, counts(pb, ("d", 1, "w")), metadata=md("py-streams"))
        assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "nothing here")
        # every_request holds for an empty stream; any_request does not
        assert inv.BulkUpdate(iter(()), metadata=md("json-streams")).accepted == 7
        err = fails(inv.BulkUpdate, iter(()), metadata=md("py-streams"))
        assert err.code() is grpc.StatusCode.NOT_FOUND


def test_inline_rules_of_the_test_helper(catalog: Catalog, pb: SimpleNamespace) -> None:
    """``VirtualService.on(when=...)`` (the plugin's ``virtual_service``) takes the stream conditions."""
    with VirtualServer(catalog, []) as server, VirtualService(server) as service:
        service.on("shop.v1.Inventory/BulkUpdate", when={"any_request": {"sku": "X"}}).reply({"accepted": 1})
        service.on("shop.v1.Inventory/BulkUpdate", when={"every_request": {"sku": "Y"}}).reply(
            {"accepted": 2}
        )
        inv = pb.inv_grpc.InventoryStub(service.channel())
        assert inv.BulkUpdate(counts(pb, ("Y", 1, ""), ("X", 1, "")), timeout=TIMEOUT).accepted == 1
        assert inv.BulkUpdate(counts(pb, ("Y", 1, ""), ("Y", 1, "")), timeout=TIMEOUT).accepted == 2
        service.assert_called("shop.v1.Inventory/BulkUpdate", times=2)


MISUSE_YAML = """\
scenario: misuse
unmatched: {code: OK}
rules:
  - method: shop.v1.Inventory/Reserve
    when:
      requests: [{sku: A}]
    reply: {}
  - method: shop.v1.Inventory/BulkUpdate
    when:
      requests: {sku: A}
      any_request: [1]
      every_request: {skuu: A}
      $anyOf: []
    reply: {}
  - method: shop.v1.Inventory/ListItems
    when:
      request:
        tags: {$unordered: x, $all: [1], $glob: "[ab"}
        page: {$anyOf: [{page_size: x}]}
    reply: {}
  - method: shop.v1.Orders/Track
    when: {every_request: {text: hi}}
    each_request: {reply: {}}
"""


def test_check_reports_misuse_at_file_and_line(catalog: Catalog, tmp_path: Path) -> None:
    """``virtsvc check`` names each misuse of the new conditions at its own line."""
    path = tmp_path / "misuse.yaml"
    path.write_text(MISUSE_YAML)
    assert [str(p) for p in check_paths([path], catalog)] == [
        f"{path}:2: unmatched: a call no rule answers fails; give an error code (e.g. NOT_FOUND), not OK",
        f"{path}:6: when.requests: shop.v1.Inventory/Reserve is a unary method; requests matches the "
        "messages of a client stream (use when.request for the first message)",
        f"{path}:10: when.requests: expected a list of request conditions, one per message, got "
        '{"sku": "A"}',
        f"{path}:11: when.any_request: expected a mapping of request fields, got [1]",
        f'{path}:12: when.every_request.skuu: unknown field "skuu" of shop.v1.StockCount; '
        'did you mean "sku"?',
        f"{path}:13: when.$anyOf: expected a list of alternative when blocks, got []",
        f"{path}:18: when.request.tags.$all[0]: expected a string, got 1",
        f'{path}:18: when.request.tags.$glob: unclosed [ in the glob pattern "[ab"',
        f'{path}:18: when.request.tags.$unordered: expected a list of elements, got "x"',
        f'{path}:19: when.request.page.$anyOf[0].page_size: expected an integer (int32), got "x"',
        f"{path}:22: when.every_request: shop.v1.Orders/Track is a bidi method; every_request matches the "
        "messages of a client stream (use when.request for the first message)",
    ]
