"""Compiled ``when`` conditions: every operator and field kind, exact failure texts, located problems."""

from __future__ import annotations

import time
from typing import Any

import pytest
from _protos_fixture import located, make_call, message_spec, new_site, problems, shop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtsvc.contracts import Catalog, MethodSpec
from virtsvc.scenarios.fields import show
from virtsvc.scenarios.matching import MAX_REGEX, compile_when
from virtsvc.scenarios.model import Call, MatchResult

__all__ = ["shop"]  # the fixture, imported for pytest


def when(spec: MethodSpec, node: Any) -> Any:
    site = new_site()
    matcher = compile_when(node, spec, site)
    assert not problems(site), problems(site)
    assert matcher is not None
    return matcher


def check(spec: MethodSpec, node: Any, *requests: Any, metadata: dict[str, str] | None = None) -> MatchResult:
    return when(spec, node).check(make_call(spec, *requests, metadata=metadata))


# (method, when, request, failures); an empty tuple of failures means the call matches.
RESERVE = "shop.v1.Inventory/Reserve"
CASES: list[tuple[str, dict[str, Any], dict[str, Any], tuple[str, ...]]] = [
    # literals
    (RESERVE, {"sku": "ABC-1"}, {"sku": "ABC-1"}, ()),
    (RESERVE, {"sku": "ABC-1"}, {"sku": "XYZ"}, ('request.sku: expected "ABC-1", got "XYZ"',)),
    (RESERVE, {"sku": "ABC-1"}, {}, ('request.sku: expected "ABC-1", got nothing',)),
    (RESERVE, {"sku": ""}, {}, ()),  # absent means the default
    (RESERVE, {"qty": 3}, {"qty": 3}, ()),
    (RESERVE, {"qty": 3}, {"qty": 2}, ("request.qty: expected 3, got 2",)),
    (RESERVE, {"qty": 0}, {}, ()),
    # $eq / $ne
    (RESERVE, {"sku": {"$eq": "A"}}, {"sku": "A"}, ()),
    (RESERVE, {"sku": {"$eq": "A"}}, {"sku": "B"}, ('request.sku: expected "A", got "B"',)),
    (RESERVE, {"sku": {"$ne": "X"}}, {"sku": "Y"}, ()),
    (RESERVE, {"sku": {"$ne": "X"}}, {"sku": "X"}, ('request.sku: expected not "X", got "X"',)),
    (RESERVE, {"sku": {"$ne": "X"}}, {}, ()),
    # ordering
    (RESERVE, {"qty": {"$gt": 0}}, {"qty": 1}, ()),
    (RESERVE, {"qty": {"$gt": 0}}, {}, ("request.qty: expected > 0, got 0",)),
    (RESERVE, {"qty": {"$gte": 2}}, {"qty": 2}, ()),
    (RESERVE, {"qty": {"$gte": 2}}, {"qty": 1}, ("request.qty: expected >= 2, got 1",)),
    (RESERVE, {"qty": {"$lt": 5}}, {"qty": 4}, ()),
    (RESERVE, {"qty": {"$lt": 5}}, {"qty": 5}, ("request.qty: expected < 5, got 5",)),
    (RESERVE, {"qty": {"$lte": 5}}, {"qty": 5}, ()),
    (RESERVE, {"qty": {"$lte": 5}}, {"qty": 6}, ("request.qty: expected <= 5, got 6",)),
    (RESERVE, {"qty": {"$gt": 0, "$lt": 10}}, {"qty": 12}, ("request.qty: expected < 10, got 12",)),
    (RESERVE, {"sku": {"$gt": "B"}}, {"sku": "C"}, ()),  # text compares as text
    (RESERVE, {"sku": {"$gt": "B"}}, {"sku": "A"}, ('request.sku: expected > "B", got "A"',)),
    (RESERVE, {"sku": {"$gte": 10}}, {"sku": "9"}, ('request.sku: expected >= 10, got "9"',)),  # as a number
    # $in
    (RESERVE, {"sku": {"$in": ["A", "B"]}}, {"sku": "B"}, ()),
    (
        RESERVE,
        {"sku": {"$in": ["A", "B"]}},
        {"sku": "C"},
        ('request.sku: expected one of ["A", "B"], got "C"',),
    ),
    (RESERVE, {"qty": {"$in": [1, 2]}}, {"qty": 3}, ("request.qty: expected one of [1, 2], got 3",)),
    # $regex
    (RESERVE, {"sku": {"$regex": "^A"}}, {"sku": "ABC"}, ()),
    (RESERVE, {"sku": {"$regex": "^A"}}, {"sku": "B"}, ('request.sku: expected to match /^A/, got "B"',)),
    (RESERVE, {"sku": {"$regex": "B"}}, {"sku": "ABC"}, ()),  # re.search, not re.match
    (RESERVE, {"sku": {"$regex": "^A"}}, {}, ("request.sku: expected to match /^A/, got nothing",)),
    (RESERVE, {"region": {"$regex": "_EU$"}}, {"region": 1}, ()),  # enums match by name
    # $contains on text
    (RESERVE, {"sku": {"$contains": "x"}}, {"sku": "axb"}, ()),
    (
        RESERVE,
        {"sku": {"$contains": "x"}},
        {"sku": "abc"},
        ('request.sku: expected to contain "x", got "abc"',),
    ),
    # $exists on scalars
    (RESERVE, {"sku": {"$exists": True}}, {"sku": "x"}, ()),
    (RESERVE, {"sku": {"$exists": True}}, {}, ("request.sku: expected to be present, got nothing",)),
    (RESERVE, {"sku": {"$exists": False}}, {}, ()),
    (RESERVE, {"sku": {"$exists": False}}, {"sku": "x"}, ('request.sku: expected to be absent, got "x"',)),
    # enums: by name or number; absent is the first value
    (RESERVE, {"region": "REGION_EU"}, {"region": 1}, ()),
    (RESERVE, {"region": 1}, {"region": 1}, ()),
    (
        RESERVE,
        {"region": "REGION_EU"},
        {"region": 2},
        ('request.region: expected "REGION_EU", got "REGION_US"',),
    ),
    (RESERVE, {"region": "REGION_EU"}, {}, ('request.region: expected "REGION_EU", got nothing',)),
    (RESERVE, {"region": "REGION_UNSPECIFIED"}, {}, ()),
    (RESERVE, {"region": {"$in": ["REGION_EU", 2]}}, {"region": 2}, ()),
    (
        RESERVE,
        {"region": {"$ne": 0}},
        {},
        ('request.region: expected not "REGION_UNSPECIFIED", got nothing',),
    ),
    # JSON names
    (RESERVE, {"orderId": "o-1"}, {"order_id": "o-1"}, ()),
    (RESERVE, {"orderId": "o-1"}, {"order_id": "o-2"}, ('request.orderId: expected "o-1", got "o-2"',)),
    # Duration: as JSON text, ordered by length of time
    (RESERVE, {"holdFor": "1.5s"}, {"hold_for": {"seconds": 1, "nanos": 500_000_000}}, ()),
    (RESERVE, {"hold_for": {"$lt": "10s"}}, {"hold_for": {"seconds": 9}}, ()),
    (
        RESERVE,
        {"hold_for": {"$gt": "1.5s"}},
        {"hold_for": {"seconds": 1}},
        ('request.hold_for: expected > "1.5s", got "1s"',),
    ),
    (RESERVE, {"hold_for": {"$gt": "1s"}}, {}, ('request.hold_for: expected > "1s", got nothing',)),
    (RESERVE, {"hold_for": {"$exists": True}}, {"hold_for": {}}, ()),  # set, even to zero
    # maps: a subset of the entries
    (RESERVE, {"labels": {"env": "prod"}}, {"labels": {"env": "prod", "team": "a"}}, ()),
    (
        RESERVE,
        {"labels": {"env": "prod"}},
        {"labels": {"env": "dev"}},
        ('request.labels.env: expected "prod", got "dev"',),
    ),
    (RESERVE, {"labels": {"env": "prod"}}, {}, ('request.labels.env: expected "prod", got nothing',)),
    (RESERVE, {"labels": {"env": {"$regex": "^pr"}}}, {"labels": {"env": "prod"}}, ()),
    (RESERVE, {"labels": {"$exists": True}}, {"labels": {"a": "b"}}, ()),
    (RESERVE, {"labels": {"$exists": True}}, {}, ("request.labels: expected to be present, got nothing",)),
    (
        RESERVE,
        {"labels": {"$exists": False}},
        {"labels": {"a": "b"}},
        ('request.labels: expected to be absent, got {"a": "b"}',),
    ),
    (RESERVE, {"labels": {"$contains": "a"}}, {"labels": {"a": "b"}}, ()),
    (
        RESERVE,
        {"labels": {"$eq": {"a": "b"}}},
        {"labels": {"a": "b", "c": "d"}},
        ('request.labels: expected {"a": "b"}, got {"a": "b", "c": "d"}',),
    ),
    # repeated: a list is an equal list; $contains is membership
    ("shop.v1.Inventory/ListItems", {"tags": ["a", "b"]}, {"tags": ["a", "b"]}, ()),
    (
        "shop.v1.Inventory/ListItems",
        {"tags": ["a", "b"]},
        {"tags": ["b", "a"]},
        ('request.tags: expected ["a", "b"], got ["b", "a"]',),
    ),
    ("shop.v1.Inventory/ListItems", {"tags": []}, {}, ()),
    ("shop.v1.Inventory/ListItems", {"tags": {"$contains": "x"}}, {"tags": ["a", "x"]}, ()),
    (
        "shop.v1.Inventory/ListItems",
        {"tags": {"$contains": "x"}},
        {"tags": ["a"]},
        ('request.tags: expected to contain "x", got ["a"]',),
    ),
    (
        "shop.v1.Inventory/ListItems",
        {"tags": {"$contains": "x"}},
        {},
        ('request.tags: expected to contain "x", got nothing',),
    ),
    ("shop.v1.Inventory/ListItems", {"tags": {"$exists": True}}, {"tags": ["a"]}, ()),
    (
        "shop.v1.Inventory/ListItems",
        {"tags": {"$exists": False}},
        {"tags": ["a"]},
        ('request.tags: expected to be absent, got ["a"]',),
    ),
    # nested messages: a subset, recursively; $exists on the message
    ("shop.v1.Inventory/ListItems", {"page": {"page_size": {"$gte": 10}}}, {"page": {"page_size": 20}}, ()),
    (
        "shop.v1.Inventory/ListItems",
        {"page": {"pageSize": 10}},
        {"page": {"page_size": 20}},
        ("request.page.pageSize: expected 10, got 20",),
    ),
    (
        "shop.v1.Inventory/ListItems",
        {"page": {"pageSize": 10}},
        {},
        ("request.page.pageSize: expected 10, got nothing",),
    ),
    ("shop.v1.Inventory/ListItems", {"page": {"$exists": True}}, {"page": {}}, ()),
    (
        "shop.v1.Inventory/ListItems",
        {"page": {"$exists": True}},
        {},
        ("request.page: expected to be present, got nothing",),
    ),
    (
        "shop.v1.Inventory/ListItems",
        {"page": {"$exists": False}},
        {"page": {"page_token": "t"}},
        ('request.page: expected to be absent, got {"page_token": "t"}',),
    ),
    ("shop.v1.Inventory/ListItems", {"page": {"$eq": {"pageSize": 5}}}, {"page": {"page_size": 5}}, ()),
    # int64 (JSON text) compares as a number
    ("shop.v1.Inventory/BulkUpdate", {"count": {"$gt": 9}}, {"count": 10}, ()),
    ("shop.v1.Inventory/BulkUpdate", {"count": {"$gt": "9"}}, {"count": 10}, ()),
    (
        "shop.v1.Inventory/BulkUpdate",
        {"count": {"$gt": 9}},
        {"count": 5},
        ("request.count: expected > 9, got 5",),
    ),
    ("shop.v1.Inventory/BulkUpdate", {"count": {"$lt": 0}}, {}, ("request.count: expected < 0, got 0",)),
    ("shop.v1.Inventory/BulkUpdate", {"count": 10}, {"count": 10}, ()),
    ("shop.v1.Inventory/BulkUpdate", {"count": "10"}, {"count": 10}, ()),
    ("shop.v1.Inventory/BulkUpdate", {"count": 10}, {"count": 11}, ("request.count: expected 10, got 11",)),
    ("shop.v1.Inventory/BulkUpdate", {"count": {"$in": [1, "2"]}}, {"count": 2}, ()),
    ("shop.v1.Inventory/BulkUpdate", {"count": {"$gt": 2**62}}, {"count": 2**62 + 1}, ()),  # exact, not float
    # bytes compare as base64 text
    ("shop.v1.Orders/PlaceOrder", {"signature": "aGk="}, {"signature": b"hi"}, ()),
    ("shop.v1.Orders/PlaceOrder", {"signature": "aGk"}, {"signature": b"hi"}, ()),  # padding optional
    (
        "shop.v1.Orders/PlaceOrder",
        {"signature": "aGk="},
        {"signature": b"ho"},
        ('request.signature: expected "aGk=", got "aG8="',),
    ),
    ("shop.v1.Orders/PlaceOrder", {"signature": {"$exists": True}}, {"signature": b"x"}, ()),
    (
        "shop.v1.Orders/PlaceOrder",
        {"signature": {"$exists": True}},
        {},
        ("request.signature: expected to be present, got nothing",),
    ),
    # repeated messages: an equal list, defaults inside left out on both sides
    ("shop.v1.Orders/PlaceOrder", {"lines": [{"sku": "A", "qty": 0}]}, {"lines": [{"sku": "A"}]}, ()),
    (
        "shop.v1.Orders/PlaceOrder",
        {"lines": [{"sku": "A"}]},
        {"lines": [{"sku": "B"}]},
        ('request.lines: expected [{"sku": "A"}], got [{"sku": "B"}]',),
    ),
    (
        "shop.v1.Orders/PlaceOrder",
        {"lines": {"$contains": {"sku": "B", "unitPrice": {"units": 5}}}},
        {"lines": [{"sku": "A"}, {"sku": "B", "unit_price": {"units": 5}}]},
        (),
    ),
    # oneof members and Struct (a subset of the JSON object)
    ("shop.v1.Payments/Charge", {"card": {"exp_year": {"$gte": 2030}}}, {"card": {"exp_year": 2031}}, ()),
    (
        "shop.v1.Payments/Charge",
        {"walletToken": {"$exists": True}},
        {"card": {}},
        ("request.walletToken: expected to be present, got nothing",),
    ),
    (
        "shop.v1.Payments/Charge",
        {"metadata": {"source": "web", "n": {"$gt": 1}}},
        {"metadata": {"source": "web", "n": 2, "x": 1}},
        (),
    ),
    (
        "shop.v1.Payments/Charge",
        {"metadata": {"a": {"b": True}}},
        {"metadata": {"a": {"b": False}}},
        ("request.metadata.a.b: expected true, got false",),
    ),
    (
        "shop.v1.Payments/Charge",
        {"amount": {"units": {"$gte": 100}, "currencyCode": "EUR"}},
        {"amount": {"units": 150, "currency_code": "EUR"}},
        (),
    ),
]


@pytest.mark.parametrize(("method", "condition", "request_fields", "failures"), CASES)
def test_request_conditions(
    shop: Catalog,
    method: str,
    condition: dict[str, Any],
    request_fields: dict[str, Any],
    failures: tuple[str, ...],
) -> None:
    spec = shop.method(method)
    result = check(spec, {"request": condition}, request_fields)
    assert result.failures == failures
    assert result.ok is (not failures)
    assert result.total - result.passed == len(failures)


ITEM_CASES: list[tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]] = [
    # Timestamps: equal as JSON text (normalised), ordered chronologically
    (
        {"audit": {"created_at": "2024-01-01T01:00:00+01:00"}},
        {"audit": {"created_at": {"seconds": 1704067200}}},
        (),
    ),
    # "...00.500Z" sorts before "...00Z" as text; chronologically it is later
    (
        {"audit": {"createdAt": {"$gt": "2024-01-01T00:00:00Z"}}},
        {"audit": {"created_at": {"seconds": 1704067200, "nanos": 500_000_000}}},
        (),
    ),
    (
        {"audit": {"createdAt": {"$lt": "2024-01-01T00:00:00Z"}}},
        {"audit": {"created_at": {"seconds": 1704067200, "nanos": 500_000_000}}},
        ('request.audit.createdAt: expected < "2024-01-01T00:00:00Z", got "2024-01-01T00:00:00.500Z"',),
    ),
    (
        {"audit": {"createdAt": {"$gte": "2024-01-01T00:00:00Z"}}},
        {},
        ('request.audit.createdAt: expected >= "2024-01-01T00:00:00Z", got nothing',),
    ),
    # int64 map values, doubles, enums nested in the message
    ({"stock_by_warehouse": {"eu": {"$gte": 5}}}, {"stock_by_warehouse": {"eu": 7}}, ()),
    (
        {"stockByWarehouse": {"eu": 5}},
        {"stock_by_warehouse": {"eu": 7}},
        ("request.stockByWarehouse.eu: expected 5, got 7",),
    ),
    ({"dimensions": {"width_cm": {"$lt": 10.5}}}, {"dimensions": {"width_cm": 10.25}}, ()),
    ({"dimensions": {"width_cm": 2}}, {"dimensions": {"width_cm": 2.0}}, ()),
    ({"availability": "IN_STOCK"}, {"availability": 1}, ()),
    ({"onHand": {"$lte": -1}}, {"on_hand": -3}, ()),
    ({"thumbnail": {"$exists": False}}, {}, ()),
]


@pytest.mark.parametrize(("condition", "request_fields", "failures"), ITEM_CASES)
def test_item_conditions(
    shop: Catalog, condition: dict[str, Any], request_fields: dict[str, Any], failures: tuple[str, ...]
) -> None:
    spec = message_spec(shop, "shop.v1.Item")
    assert check(spec, {"request": condition}, request_fields).failures == failures


METADATA_CASES: list[tuple[dict[str, Any], dict[str, str], tuple[str, ...]]] = [
    ({"x-tenant": "acme"}, {"x-tenant": "acme"}, ()),
    ({"X-Tenant": "acme"}, {"x-tenant": "acme"}, ()),  # keys are lower-cased
    ({"x-tenant": "acme"}, {}, ('metadata.x-tenant: expected "acme", got nothing',)),
    ({"x-tenant": "acme"}, {"x-tenant": "umbrella"}, ('metadata.x-tenant: expected "acme", got "umbrella"',)),
    ({"x-version": 2}, {"x-version": "2"}, ()),  # YAML numbers are text here
    (
        {"x-tenant": {"$in": ["a", "b"]}},
        {"x-tenant": "c"},
        ('metadata.x-tenant: expected one of ["a", "b"], got "c"',),
    ),
    ({"x-tenant": {"$regex": "^ac"}}, {"x-tenant": "acme"}, ()),
    ({"x-tenant": {"$ne": "acme"}}, {}, ()),
    (
        {"x-tenant": {"$exists": False}},
        {"x-tenant": "a"},
        ('metadata.x-tenant: expected to be absent, got "a"',),
    ),
    ({"x-tenant": {"$exists": True}}, {}, ("metadata.x-tenant: expected to be present, got nothing",)),
    ({"x-tenant": {"$contains": "cm"}}, {"x-tenant": "acme"}, ()),
    ({"x-version": {"$gte": 2}}, {"x-version": "10"}, ()),  # numbers compare as numbers
    ({"x-version": {"$gte": "2"}}, {"x-version": "10"}, ('metadata.x-version: expected >= "2", got "10"',)),
    ({"x-version": {"$gt": 1}}, {}, ("metadata.x-version: expected > 1, got nothing",)),
]


@pytest.mark.parametrize(("condition", "metadata", "failures"), METADATA_CASES)
def test_metadata_conditions(
    shop: Catalog, condition: dict[str, Any], metadata: dict[str, str], failures: tuple[str, ...]
) -> None:
    spec = shop.method(RESERVE)
    result = check(spec, {"metadata": condition}, {}, metadata=metadata)
    assert result.failures == failures


def test_counts_rank_near_misses(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    node = {"request": {"sku": "A", "qty": {"$gt": 1, "$lt": 9}}, "metadata": {"x-tenant": "acme"}}
    result = check(spec, node, {"sku": "A", "qty": 10}, metadata={})
    assert (result.ok, result.passed, result.total) == (False, 2, 4)
    assert result.failures == (
        "request.qty: expected < 9, got 10",
        'metadata.x-tenant: expected "acme", got nothing',
    )
    assert check(spec, node, {"sku": "A", "qty": 5}, metadata={"x-tenant": "acme"}) == MatchResult(
        True, 4, 4, ()
    )


def test_metadata_only_matcher_never_decodes_the_request(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    matcher = when(spec, {"metadata": {"x-tenant": "acme"}})
    assert matcher.needs_request is False
    call = Call(
        method=spec,
        scenario="s",
        session=make_call(spec).session,
        metadata={"x-tenant": "acme"},
        raw_requests=[b"\xff\xff not protobuf"],
    )
    assert call.__dict__.get("request_json") is None
    assert matcher.check(call).ok
    assert "request_json" not in call.__dict__ and "request_messages" not in call.__dict__
    assert when(spec, {"request": {"sku": "a"}}).needs_request is True
    assert when(spec, {}).needs_request is False


def test_regex_input_is_bounded(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    # the pattern only matches past the first 64 KiB, which is never looked at
    matcher = when(spec, {"request": {"sku": {"$regex": "y"}}})
    assert not matcher.check(make_call(spec, {"sku": "x" * 70_000 + "y"})).ok
    assert matcher.check(make_call(spec, {"sku": "x" * 1000 + "y"})).ok
    # a pathological pattern over a bounded input stays bounded (and fast enough here)
    slow = when(spec, {"request": {"sku": {"$regex": "^(a|a)*$"}}})
    started = time.perf_counter()
    slow.check(make_call(spec, {"sku": "a" * 20 + "b"}))
    assert time.perf_counter() - started < 5


PROBLEMS_YAML = """\
when:
  request:
    skuu: A
    qty: five
    region: EUU
    sku:
      $regex: "("
      $gtt: 1
    labels:
      env: 5
    holdFor: soon
    orderId: {$in: o-1}
    order_id: x
  metadat: {}
"""


def test_problems_are_located_at_the_offending_key(shop: Catalog) -> None:
    node = located(PROBLEMS_YAML)
    site = new_site("s.yaml")
    assert compile_when(node["when"], shop.method(RESERVE), site) is None
    assert problems(site) == [
        's.yaml:3: when.request.skuu: unknown field "skuu" of shop.v1.ReserveRequest; did you mean "sku"?',
        's.yaml:4: when.request.qty: expected an integer (int32), got "five"',
        's.yaml:5: when.request.region: unknown value "EUU" of enum common.v1.Region; expected one of '
        "REGION_UNSPECIFIED, REGION_EU, REGION_US, REGION_APAC",
        "s.yaml:7: when.request.sku.$regex: invalid regular expression: missing ), unterminated subpattern "
        "at position 0",
        's.yaml:8: when.request.sku.$gtt: unknown operator "$gtt"; did you mean "$gt" or "$gte"?',
        "s.yaml:10: when.request.labels.env: expected a string, got 5",
        's.yaml:11: when.request.holdFor: expected a duration such as "1.5s", got "soon"',
        's.yaml:12: when.request.orderId.$in: expected a list of values, got "o-1"',
        's.yaml:13: when.request.order_id: "orderId" and "order_id" name the same field',
        's.yaml:14: when.metadat: unknown key "metadat"; did you mean "metadata"?',
    ]


@pytest.mark.parametrize(
    ("method", "request_node", "message"),
    [
        (RESERVE, {"qty": {"$gt": "x"}}, 'when.request.qty.$gt: expected a number, got "x"'),
        (RESERVE, {"qty": 1.5}, "when.request.qty: expected an integer (int32), got 1.5"),
        (RESERVE, {"qty": 2**40}, "when.request.qty: 1099511627776 is out of range for int32"),
        (RESERVE, {"sku": 5}, "when.request.sku: expected a string, got 5"),
        (RESERVE, {"sku": {"$exists": "yes"}}, 'when.request.sku.$exists: expected true or false, got "yes"'),
        (
            RESERVE,
            {"sku": {"$regex": "a" * (MAX_REGEX + 1)}},
            "when.request.sku.$regex: regular expression longer than 1000 characters",
        ),
        (
            RESERVE,
            {"region": {"$gt": 1}},
            "when.request.region.$gt: $gt compares numbers, text, timestamps and durations, "
            "not common.v1.Region",
        ),
        (
            RESERVE,
            {"labels": {"$regex": "x"}},
            "when.request.labels.$regex: $regex matches text, not map<string, string>",
        ),
        (
            RESERVE,
            {"qty": {"$contains": 1}},
            "when.request.qty.$contains: $contains applies to repeated fields, maps and strings, not int32",
        ),
        (
            RESERVE,
            {"sku": {"$eq": "a", "sku": 1}},
            "when.request.sku: mixes operators ($eq) and field names (sku); use one or the other",
        ),
        (
            RESERVE,
            {"holdFor": {"$lt": "never"}},
            'when.request.holdFor.$lt: expected a duration such as "1.5s", got "never"',
        ),
        (
            "shop.v1.Inventory/ListItems",
            {"tags": "a"},
            'when.request.tags: expected a list (repeated string), got "a"',
        ),
        (
            "shop.v1.Inventory/ListItems",
            {"tags": {"$gt": 1}},
            "when.request.tags.$gt: $gt compares numbers, text, timestamps and durations, "
            "not repeated string",
        ),
        (
            "shop.v1.Inventory/ListItems",
            {"page": {"size": 1}},
            'when.request.page.size: unknown field "size" of common.v1.PageRequest; '
            'did you mean "page_size"?',
        ),
        (
            "shop.v1.Inventory/ListItems",
            {"page": "x"},
            'when.request.page: expected a mapping (common.v1.PageRequest), got "x"',
        ),
        (
            "shop.v1.Orders/PlaceOrder",
            {"signature": "%%"},
            'when.request.signature: expected base64 text (bytes), got "%%"',
        ),
        (
            "shop.v1.Orders/PlaceOrder",
            {"lines": [{"sku": 1}]},
            "when.request.lines[0].sku: expected a string, got 1",
        ),
        (
            "shop.v1.Orders/PlaceOrder",
            {"lines": {"$contains": {"qty": "x"}}},
            'when.request.lines.$contains.qty: expected an integer (int32), got "x"',
        ),
        (
            "shop.v1.Inventory/Ping",
            {"x": 1},
            'when.request.x: unknown field "x" of google.protobuf.Empty; it has no fields',
        ),
    ],
)
def test_problem_messages(shop: Catalog, method: str, request_node: dict[str, Any], message: str) -> None:
    site = new_site("f.yaml", 7)
    assert compile_when({"request": request_node}, shop.method(method), site) is None
    assert problems(site) == [f"f.yaml:7: {message}"]


# -- properties: any input compiles or gives located problems, never another exception

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["$gt", "$in", "$regex", "$exists", "$contains", "REGION_EU", "1.5s", "(", "aGk="]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "sku",
                    "qty",
                    "region",
                    "labels",
                    "holdFor",
                    "tags",
                    "page",
                    "lines",
                    "count",
                    "$eq",
                    "$ne",
                    "$gt",
                    "$in",
                    "$regex",
                    "$contains",
                    "$exists",
                    "x",
                    "env",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=3,
        )
    ),
    max_leaves=12,
)

METHODS = [
    RESERVE,
    "shop.v1.Inventory/ListItems",
    "shop.v1.Orders/PlaceOrder",
    "shop.v1.Payments/Charge",
    "shop.v1.Inventory/BulkUpdate",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), request_node=json_values, metadata_node=json_values)
def test_any_when_compiles_or_reports(
    shop: Catalog, method: str, request_node: Any, metadata_node: Any
) -> None:
    spec = shop.method(method)
    site = new_site()
    matcher = compile_when({"request": request_node, "metadata": metadata_node}, spec, site)
    if matcher is None:
        assert problems(site)
        assert all(p.startswith("scenario.yaml:1: when") for p in problems(site))
    else:
        assert not problems(site)
        result = matcher.check(make_call(spec, {}, metadata={"x": "1"}))
        assert result.total >= result.passed >= 0
        assert len(result.failures) == result.total - result.passed


# The quick path (top-level literals and metadata keys, decided by dict look-ups) agrees with the leaf tests.
_literal_conditions = st.fixed_dictionaries(
    {},
    optional={
        "sku": st.sampled_from(["", "A", "B"]),
        "qty": st.integers(-1, 2),
        "region": st.sampled_from(["REGION_UNSPECIFIED", "REGION_EU", "REGION_US", 1]),
        "orderId": st.sampled_from(["", "o-1"]),
    },
)
_literal_requests = st.fixed_dictionaries(
    {},
    optional={
        "sku": st.sampled_from(["", "A", "B"]),
        "qty": st.integers(-1, 2),
        "region": st.integers(0, 2),
        "order_id": st.sampled_from(["", "o-1"]),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    condition=_literal_conditions,
    request_fields=_literal_requests,
    wanted=st.dictionaries(st.sampled_from(["x-a", "x-b"]), st.sampled_from(["1", "2"]), max_size=2),
    sent=st.dictionaries(st.sampled_from(["x-a", "x-b"]), st.sampled_from(["1", "2"]), max_size=2),
)
def test_quick_match_agrees_with_the_leaf_tests(
    shop: Catalog,
    condition: dict[str, Any],
    request_fields: dict[str, Any],
    wanted: dict[str, str],
    sent: dict[str, str],
) -> None:
    spec = shop.method(RESERVE)
    node: dict[str, Any] = {"request": condition, "metadata": wanted}
    quick = when(spec, node)
    full = when(spec, node)
    assert quick._quick is not None
    full._quick = None  # the leaf tests alone
    call = make_call(spec, request_fields, metadata=sent)
    expected = full.check(call)
    assert quick.check(make_call(spec, request_fields, metadata=sent)) == expected


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("report_*.pdf", "report_q1.pdf", True),
        ("report_*.pdf", "report_q1.pdf.bak", False),  # the whole value, not a search
        ("*.json", "a/b.json", False),  # * stops at /, as Go's path.Match
        ("data[12].csv", "data2.csv", True),
        ("data[12].csv", "data3.csv", False),
        ("test_?", "test_a", True),
        ("test_?", "test_ab", False),
        ("[!a]x", "bx", True),
        ("[^a]x", "ax", False),
        ("[a-c]", "b", True),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
    ],
)
def test_glob(shop: Catalog, pattern: str, text: str, matches: bool) -> None:
    """``$glob`` matches the whole value; ``*`` and ``?`` stop at ``/``; classes and escapes as in Go."""
    result = check(shop.method(RESERVE), {"request": {"sku": {"$glob": pattern}}}, {"sku": text})
    assert result.ok is matches
    if not matches:
        assert result.failures == (
            f"request.sku: expected to match the glob {show(pattern)}, got {show(text)}",
        )
