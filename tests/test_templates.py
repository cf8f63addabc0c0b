"""Reply bodies and text templates: validation, rendering, conversion to field types, and the sandbox."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import pytest
from _protos_fixture import located, make_call, message_spec, new_site, problems, shop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtsvc.contracts import Catalog, MethodSpec
from virtsvc.engine.store import MemorySession as Session
from virtsvc.scenarios import sandbox, templates
from virtsvc.scenarios.model import Call, to_json
from virtsvc.scenarios.templates import TemplateError, compile_message, compile_text, static_text

__all__ = ["shop"]  # the fixture, imported for pytest

RESERVE = "shop.v1.Inventory/Reserve"


def body(spec: MethodSpec, value: Any) -> Any:
    site = new_site()
    compiled = compile_message(value, spec.output, site)
    assert not problems(site), problems(site)
    assert compiled is not None
    return compiled


def render(spec: MethodSpec, value: Any, *requests: Any, index: int = 0, **call: Any) -> dict[str, Any]:
    return body(spec, value).render_json(make_call(spec, *requests, **call), index)  # type: ignore[no-any-return]


def failure(spec: MethodSpec, value: Any, *requests: Any) -> str:
    compiled = body(spec, value)
    with pytest.raises(TemplateError) as info:
        compiled.render(make_call(spec, *requests), 0)
    return str(info.value)


# -- static bodies


def test_static_body_is_serialised_once(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    compiled = body(spec, {"reservationId": "r-1", "qty_reserved": 2, "expiresAt": "2024-05-01T12:00:00Z"})
    expected = spec.output_class(reservation_id="r-1", qty_reserved=2)
    expected.expires_at.FromJsonString("2024-05-01T12:00:00Z")
    assert compiled.static == expected.SerializeToString(deterministic=True)
    assert compiled.needs_request is False
    call = make_call(spec)
    assert compiled.render(call, 0) is compiled.static
    assert compiled.render_json(call, 0) == to_json(expected)
    compiled.render_json(call, 0)["reservation_id"] = "changed"  # a copy: the body stays as it was
    assert compiled.render_json(call, 0)["reservation_id"] == "r-1"


def test_static_body_every_field_kind(shop: Catalog) -> None:
    item = message_spec(shop, "shop.v1.Item")
    value = {
        "sku": "A",
        "onHand": "12345678901234",  # int64 as text
        "availability": "IN_STOCK",
        "dimensions": {"widthCm": 1.5, "height_cm": 2},
        "tags": ["a", "b"],
        "stockByWarehouse": {"eu": 3, "us": "4"},
        "thumbnail": "aGk=",
        "audit": {"actor": "me", "createdAt": "2024-01-01T01:00:00+01:00"},
    }
    msg = item.output_class.FromString(body(item, value).static)
    assert msg.on_hand == 12345678901234 and msg.availability == 1 and msg.thumbnail == b"hi"
    assert dict(msg.stock_by_warehouse) == {"eu": 3, "us": 4}
    assert msg.dimensions.width_cm == 1.5 and list(msg.tags) == ["a", "b"]
    assert msg.audit.created_at.ToJsonString() == "2024-01-01T00:00:00Z"
    charge = shop.method("shop.v1.Payments/Charge")
    signal = {"@type": "type.googleapis.com/common.v1.Money", "currencyCode": "EUR", "units": 5}
    out = render(charge, {"outcome": 2, "riskSignals": [signal]})
    money = {"@type": "type.googleapis.com/common.v1.Money", "currency_code": "EUR", "units": "5"}
    assert out == {"outcome": "DECLINED", "risk_signals": [money]}
    event = shop.method("shop.v1.Inventory/Watch")
    assert render(event, {"discontinued": False, "at": "2024-01-01T00:00:00Z"}) == {
        "discontinued": False,
        "at": "2024-01-01T00:00:00Z",
    }
    assert render(shop.method("shop.v1.Inventory/Ping"), {}) == {}


# -- templated bodies


def test_templates_fill_fields_of_their_type(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    value = {"reservationId": "r-{{ request.sku }}", "qtyReserved": "{{ request.qty + 1 }}"}
    compiled = body(spec, value)
    assert compiled.static is None and compiled.needs_request is True
    call = make_call(spec, {"sku": "ABC", "qty": 2})
    expected = spec.output_class(reservation_id="r-ABC", qty_reserved=3)
    assert compiled.render(call, 0) == expected.SerializeToString(deterministic=True)
    assert compiled.render_json(call, 0) == {"reservation_id": "r-ABC", "qty_reserved": 3}


def test_json_names_and_defaults_in_request(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    value = {
        "reservationId": "{{ request.orderId }}/{{ request.order_id }}/{{ request.qty }}/{{ request.region }}"
    }
    assert render(spec, value, {"order_id": "o-1"}) == {"reservation_id": "o-1/o-1/0/REGION_UNSPECIFIED"}
    # an absent message field is None, and None leaves a field unset (JSON null)
    assert render(spec, {"reservationId": "{{ request.holdFor }}", "qtyReserved": 1}, {}) == {
        "qty_reserved": 1
    }
    assert render(spec, {"reservationId": "{{ request['orderId'] }}"}, {"order_id": "x"}) == {
        "reservation_id": "x"
    }


def test_single_expression_yields_values(shop: Catalog) -> None:
    item = shop.method("shop.v1.Inventory/GetItem")
    value = {
        "tags": "{{ ['a', request.sku] }}",
        "dimensions": "{{ {'width_cm': 1.5, 'heightCm': 2} }}",
        "onHand": "{{ 40 + 2 }}",
        "stock_by_warehouse": "{{ {'eu': 1} }}",
        "availability": "  {{ 2 }}  ",
    }
    assert render(item, value, {"sku": "B"}) == {
        "tags": ["a", "B"],
        "dimensions": {"width_cm": 1.5, "height_cm": 2.0},
        "on_hand": "42",
        "stock_by_warehouse": {"eu": "1"},
        "availability": "BACKORDER",
    }
    # the whole reply from one expression
    whole = "{{ {'sku': request.sku, 'tags': ['x'], 'audit': {'actor': 'me'}} }}"
    assert render(item, whole, {"sku": "Q"}) == {"sku": "Q", "tags": ["x"], "audit": {"actor": "me"}}
    # mixed text and expressions stay text
    assert render(item, {"title": "{{ 1 }}{{ 2 }}"}) == {"title": "12"}


def test_templates_inside_lists_maps_and_nested_messages(shop: Catalog) -> None:
    order = shop.method("shop.v1.Orders/PlaceOrder")
    value = {
        "orderId": "o-{{ request.customerId }}",
        "lines": [{"sku": "A", "qty": "{{ 1 + 1 }}"}, "{{ {'sku': 'B'} }}", {"sku": "C"}],
        "total": {"currencyCode": "EUR", "units": "{{ 0 }}"},  # present even though units renders 0
        "items": {"a": {"title": "{{ request.customer_id }}"}, "b": "{{ {'sku': 'b'} }}"},
    }
    out = render(order, value, {"customer_id": "c1"})
    assert out["order_id"] == "o-c1"
    assert out["lines"] == [{"sku": "A", "qty": 2}, {"sku": "B"}, {"sku": "C"}]
    assert out["total"] == {"currency_code": "EUR"}
    assert out["items"] == {"a": {"title": "c1"}, "b": {"sku": "b"}}
    summary = shop.method("shop.v1.Inventory/BulkUpdate")
    assert render(summary, {"rejectedSkus": ["x", "{{ 'y' }}", "z"]})["rejected_skus"] == ["x", "y", "z"]
    charge = shop.method("shop.v1.Payments/Charge")
    value = {"riskSignals": [{"@type": "type.googleapis.com/common.v1.Money", "units": "{{ 7 }}"}]}
    assert render(charge, value)["risk_signals"] == [
        {"@type": "type.googleapis.com/common.v1.Money", "units": "7"}
    ]


def test_requests_of_a_client_stream(shop: Catalog) -> None:
    spec = shop.method("shop.v1.Inventory/BulkUpdate")
    value = {
        "accepted": "{{ requests | length }}",
        "rejected": "{{ requests | selectattr('count', 'lt', 0) | list | length }}",
        "rejectedSkus": "{{ requests | map(attribute='sku') | list }}",
    }
    out = render(spec, value, {"sku": "a", "count": 5}, {"sku": "b", "count": -1})
    assert out == {"accepted": 2, "rejected": 1, "rejected_skus": ["a", "b"]}
    charge = shop.method("shop.v1.Payments/Charge")
    assert render(charge, {"chargeId": "{{ requests[0].account }}"}, {"account": "acc"}) == {
        "charge_id": "acc"
    }


def test_a_growing_stream_is_seen_as_it_grows(shop: Catalog) -> None:
    spec = shop.method("shop.v1.Orders/Track")
    compiled = body(spec, {"text": "{{ request.text }}:{{ requests | length }}:{{ requests[-1].text }}"})
    call = make_call(spec, {"text": "a"})
    seen = []
    for i, text in enumerate(["b", "c"], start=1):
        seen.append(compiled.render_json(call, i)["text"])
        call.add_request(spec.input_class(text=text).SerializeToString())
    seen.append(compiled.render_json(call, 3)["text"])
    assert seen == ["a:1:a", "a:2:b", "a:3:c"]


def test_int64_fields_are_numbers_in_templates(shop: Catalog) -> None:
    spec = shop.method("shop.v1.Inventory/BulkUpdate")
    assert render(spec, {"accepted": "{{ request.count + 1 }}"}, {"count": 41}) == {"accepted": 42}


def test_metadata_session_index_and_helpers(shop: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = shop.method(RESERVE)
    value = {"reservationId": "{{ metadata['x-tenant'] }}|{{ session.id }}|{{ session.calls }}|{{ index }}"}
    session = Session("s", "sess-1")
    session.touch()
    out = render(spec, value, {}, index=3, metadata={"x-tenant": "acme"}, session=session)
    assert out == {"reservation_id": "acme|sess-1|1|3"}
    assert body(spec, value).needs_request is False
    stamp = render(spec, {"reservationId": "{{ now() }}", "expiresAt": "{{ now() }}"})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp["reservation_id"])
    monkeypatch.setattr(templates, "now", lambda: "2030-01-01T00:00:00Z")  # the virtual-time hook
    assert render(spec, {"expiresAt": "{{ now() }}"}) == {"expires_at": "2030-01-01T00:00:00Z"}


def test_random_helpers_repeat_per_session(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    compiled = body(spec, {"reservationId": "{{ uuid() }}", "qtyReserved": "{{ randint(1, 1000000) }}"})

    def draw(session_id: str) -> dict[str, Any]:
        return compiled.render_json(make_call(spec, session=Session("s", session_id)), 0)  # type: ignore[no-any-return]

    first = draw("one")
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", first["reservation_id"]
    )
    assert draw("one") == first
    assert draw("two") != first


def test_render_and_render_json_agree_for_one_call(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    compiled = body(spec, {"reservationId": "{{ uuid() }}"})
    call = make_call(spec)
    sent = spec.output_class.FromString(compiled.render(call, 0))
    assert compiled.render_json(call, 0) == {"reservation_id": sent.reservation_id}
    assert compiled.render_json(call, 1) != {"reservation_id": sent.reservation_id}  # another position


@pytest.mark.parametrize(
    ("field", "source", "expected"),
    [
        ("qtyReserved", "{{ '5' }}", 5),
        ("qtyReserved", "{{ 5.0 }}", 5),
        ("reservationId", "{{ 5 }}", "5"),
        ("reservationId", "{{ 2.5 }}", "2.5"),
        ("reservationId", "{{ true }}", "true"),
        ("expiresAt", "{{ '2024-05-01T12:00:00+02:00' }}", "2024-05-01T10:00:00Z"),
    ],
)
def test_conversions(shop: Catalog, field: str, source: str, expected: Any) -> None:
    spec = shop.method(RESERVE)
    out = render(spec, {field: source})
    assert next(iter(out.values())) == expected


def test_more_conversions(shop: Catalog) -> None:
    item = shop.method("shop.v1.Inventory/GetItem")
    out = render(
        item,
        {
            "availability": "{{ 'DISCONTINUED' }}",
            "onHand": "{{ '12' }}",
            "thumbnail": "{{ 'aGk=' }}",
            "dimensions": {"widthCm": "{{ '2.5' }}"},
            "tags": "{{ range(3) }}",
        },
    )
    assert out == {
        "availability": "DISCONTINUED",
        "on_hand": "12",
        "thumbnail": "aGk=",
        "dimensions": {"width_cm": 2.5},
        "tags": ["0", "1", "2"],
    }
    watch = shop.method("shop.v1.Inventory/Watch")
    assert render(watch, {"discontinued": "{{ 'true' }}"}) == {"discontinued": True}
    charge = shop.method("shop.v1.Payments/Charge")
    assert render(charge, {"outcome": "{{ 1 }}"}) == {"outcome": "APPROVED"}


@pytest.mark.parametrize(
    ("method", "value", "message"),
    [
        (
            RESERVE,
            {"qtyReserved": "{{ 'abc' }}"},
            'reply.qtyReserved: expected an integer (int32), got "abc"',
        ),
        (RESERVE, {"qtyReserved": "n{{ 5 }}"}, 'reply.qtyReserved: expected an integer (int32), got "n5"'),
        (RESERVE, {"qtyReserved": "{{ 2.5 }}"}, "reply.qtyReserved: expected an integer (int32), got 2.5"),
        (
            RESERVE,
            {"qtyReserved": "{{ 2**40 }}"},
            "reply.qtyReserved: 1099511627776 is out of range for int32",
        ),
        (
            RESERVE,
            {"expiresAt": "{{ 'soon' }}"},
            'reply.expiresAt: expected an RFC 3339 timestamp such as "2024-05-01T12:00:00Z", got "soon"',
        ),
        (RESERVE, {"reservationId": "{{ [1] }}"}, "reply.reservationId: expected a string, got [1]"),
        (
            "shop.v1.Payments/Charge",
            {"outcome": "{{ 'NOPE' }}"},
            'reply.outcome: unknown value "NOPE" of enum shop.v1.ChargeResponse.Outcome; '
            "expected one of OUTCOME_UNSPECIFIED, APPROVED, DECLINED, REVIEW",
        ),
        (
            "shop.v1.Inventory/GetItem",
            {"tags": "{{ 5 }}"},
            "reply.tags: expected a list (repeated string), got 5",
        ),
        ("shop.v1.Inventory/GetItem", {"tags": "{{ [{}] }}"}, "reply.tags[0]: expected a string, got {}"),
        (
            "shop.v1.Inventory/GetItem",
            {"dimensions": "{{ {'depth': 1} }}"},
            'reply.dimensions.depth: unknown field "depth" of shop.v1.Item.Dimensions; '
            'did you mean "depthCm" or "depth_cm"?',
        ),
        (
            "shop.v1.Inventory/GetItem",
            "{{ {'sku': 1, 'title': []} }}",
            "reply.title: expected a string, got []",
        ),
        ("shop.v1.Inventory/GetItem", "{{ 5 }}", "reply: expected a mapping (shop.v1.Item), got 5"),
        (
            "shop.v1.Inventory/Watch",
            "{{ {'delta': 1, 'discontinued': true} }}",
            'reply.discontinued: "delta" and "discontinued" are both members of oneof "change"; set only one',
        ),
        (
            RESERVE,
            {"reservationId": "{{ request.nope }}"},
            'reply.reservationId: shop.v1.ReserveRequest has no field "nope"',
        ),
        (
            RESERVE,
            {"reservationId": "{{ request.skuu }}"},
            'reply.reservationId: shop.v1.ReserveRequest has no field "skuu"; did you mean "sku"?',
        ),
        (
            RESERVE,
            {"reservationId": "{{ 1 // 0 }}"},
            "reply.reservationId: integer division or modulo by zero",
        ),
    ],
)
def test_render_failures_name_the_field_and_value(
    shop: Catalog, method: str, value: Any, message: str
) -> None:
    assert failure(shop.method(method), value, {}) == message


# -- the sandbox


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ ''.__class__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
        ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
        ("{{ request.__init__ }}", "access to attribute '__init__' of '_View' object is unsafe"),
        (
            "{{ request.__class__.__subclasses__() }}",
            "access to attribute '__class__' of '_View' object is unsafe",
        ),
        ("{{ uuid.__globals__ }}", "access to attribute '__globals__' of 'function' object is unsafe"),
        ("{{ now.__globals__['os'] }}", "access to attribute '__globals__' of 'function' object is unsafe"),
        (
            '{{ "{0.__class__}".format(request) }}',
            "access to attribute '__class__' of '_View' object is unsafe",
        ),
        (
            '{{ "{0.__class__.__base__}".format(1) }}',
            "access to attribute '__class__' of 'int' object is unsafe",
        ),
        ("{{ '%s'.format_map(request) }}", ""),
        ("{{ request.update({}) }}", "access to attribute 'update' of '_View' object is unsafe"),
        ("{{ [].append(1) }}", "access to attribute 'append' of 'list' object is unsafe"),
        ("{{ range.__code__ }}", "access to attribute '__code__' of 'function' object is unsafe"),
        ("{{ request.info }}", 'shop.v1.ReserveRequest has no field "info"'),
        ("{{ self }}", ""),
    ],
)
def test_sandbox_refuses_escapes(shop: Catalog, source: str, message: str) -> None:
    spec = shop.method(RESERVE)
    site = new_site()
    compiled = compile_message({"reservationId": source}, spec.output, site)
    if compiled is None:  # refused at load: fine too
        assert problems(site)
        return
    try:
        out = compiled.render_json(make_call(spec, {"sku": "a"}), 0)
    except TemplateError as exc:
        assert str(exc).startswith("reply.reservationId: ")
        if message:
            assert str(exc) == f"reply.reservationId: {message}"
        return
    # a few harmless templates render plainly; none may leak an object's internals
    assert not message, out
    assert "class" not in out.get("reservation_id", "") and "<" not in out.get("reservation_id", "")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('{{ "x" * 10**8 }}', "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ 10**8 * 'x' }}", "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ range(10**9) | list }}", "range() with more than 100,000 items"),
        ("{{ ['x' * 1000] * 10**6 }}", "list longer than 1,048,576 characters (1 MiB)"),
        ("{{ 'x' | center(10**9) }}", "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ 'x'.ljust(10**9) }}", "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ ('a' * 1000) | replace('a', 'b' * 10000) }}", "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ ('a' * 1000).replace('a', 'b' * 10000) }}", "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ ('x' * 2000) | join('y' * 1000) }}", "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ (',' * 1000).join(['x' * 1000] * 1000) }}", "string longer than 1,048,576 characters (1 MiB)"),
        ("{{ '%0999999999d' % 1 }}", "formatted string longer than 1,048,576 characters (1 MiB)"),
        ("{{ '%0999999999d' | format(1) }}", "formatted string longer than 1,048,576 characters (1 MiB)"),
        ("{{ '{:>999999999}'.format(1) }}", "formatted string longer than 1,048,576 characters (1 MiB)"),
        ("{{ 2 ** 1000000000 }}", "integer result larger than 65536 bits"),
        ("{{ (1).to_bytes(10**9, 'big') }}", "bytes longer than 1,048,576 characters (1 MiB)"),
        ("{% set a = 'x' * 1000000 %}{{ a ~ a }}", "string longer than 1,048,576 characters (1 MiB)"),
        (
            "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
            "rendered text longer than 1,048,576 characters (1 MiB)",
        ),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "template too expensive: more than 1,000,000 loop iterations and calls",
        ),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "template recursion too deep"),
        ("{{ [1] | batch(10**9, 0) | list }}", "batch() with more than 100,000 parts"),
        ("{{ 'ab'.translate({97: 'x' * 1000}) }}", "str.translate() is not available in templates"),
    ],
)
def test_sandbox_bounds_size_and_time(
    shop: Catalog, source: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each bound stops its template with its own message (the render clock held off, so a loaded machine
    cannot make the clock trip before the bound under test)."""
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 120.0)
    spec = shop.method(RESERVE)
    assert failure(spec, {"reservationId": source}, {}) == f"reply.reservationId: {message}"


def test_sandbox_render_clock(shop: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A render that stays within the step budget but outlasts the clock is stopped by the clock."""
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.05)
    spec = shop.method(RESERVE)
    source = "{% for i in range(90000) %}{% for j in range(9) %}{% endfor %}{% endfor %}"
    assert failure(spec, {"reservationId": source}, {}) == (
        "reply.reservationId: template too slow: rendering took more than 0.05 s"
    )


def test_item_lookup_prefers_fields(shop: Catalog) -> None:
    # ListItemsResponse has a field "items": request.items must be it, not dict.items
    spec = message_spec(shop, "shop.v1.ListItemsResponse", "shop.v1.ListItemsResponse")
    value = {"page": {"nextPageToken": "{{ request.items | length }}-{{ request.items[0].sku }}"}}
    assert render(spec, value, {"items": [{"sku": "a"}]}) == {"page": {"next_page_token": "1-a"}}


# -- load-time problems


REPLY_YAML = """\
reply:
  reservatonId: x
  qtyReserved: five
  expiresAt: tomorrow
  reservation_id: "{{ request.sku "
"""


def test_problems_are_located(shop: Catalog) -> None:
    node = located(REPLY_YAML)
    site = new_site("r.yaml")
    assert compile_message(node["reply"], shop.method(RESERVE).output, site) is None
    assert problems(site) == [
        'r.yaml:2: reply.reservatonId: unknown field "reservatonId" of shop.v1.ReserveResponse; '
        'did you mean "reservationId" or "reservation_id"?',
        'r.yaml:3: reply.qtyReserved: expected an integer (int32), got "five"',
        'r.yaml:4: reply.expiresAt: expected an RFC 3339 timestamp such as "2024-05-01T12:00:00Z", '
        'got "tomorrow"',
        "r.yaml:5: reply.reservation_id: template error: unexpected end of template, "
        "expected 'end of print statement'",
    ]


@pytest.mark.parametrize(
    ("method", "value", "message"),
    [
        (
            RESERVE,
            {"reservationId": "{{ reqest.sku }}"},
            'reply.reservationId: template error: unknown name "reqest"; '
            'did you mean "request" or "requests"?',
        ),
        (RESERVE, {"reservationId": 5}, "reply.reservationId: expected a string, got 5"),
        (RESERVE, {"qtyReserved": "5"}, 'reply.qtyReserved: expected an integer (int32), got "5"'),
        (
            RESERVE,
            {"reservationId": "a", "reservation_id": "b"},
            'reply.reservation_id: "reservationId" and "reservation_id" name the same field',
        ),
        (
            RESERVE,
            "text {{ 1 }}",
            'reply: a whole shop.v1.ReserveResponse is one expression such as "{{ record }}", not text',
        ),
        (RESERVE, [1], "reply: expected a mapping (shop.v1.ReserveResponse), got [1]"),
        (
            "shop.v1.Inventory/Watch",
            {"delta": 1, "discontinued": True},
            'reply.discontinued: "delta" and "discontinued" are both members of oneof "change"; set only one',
        ),
        (
            "shop.v1.Inventory/GetItem",
            {"availability": "GONE"},
            'reply.availability: unknown value "GONE" of enum shop.v1.Item.Availability; '
            "expected one of AVAILABILITY_UNSPECIFIED, IN_STOCK, BACKORDER, DISCONTINUED",
        ),
        (
            "shop.v1.Inventory/GetItem",
            {"thumbnail": "not base64!"},
            'reply.thumbnail: expected base64 text (bytes), got "not base64!"',
        ),
        (
            "shop.v1.Inventory/GetItem",
            {"tags": "a"},
            'reply.tags: expected a list (repeated string), got "a"',
        ),
        ("shop.v1.Inventory/GetItem", {"tags": ["a", 1]}, "reply.tags[1]: expected a string, got 1"),
        (
            "shop.v1.Inventory/GetItem",
            {"stockByWarehouse": {"eu": "x"}},
            'reply.stockByWarehouse.eu: expected an integer (int64), got "x"',
        ),
        (
            "shop.v1.Inventory/GetItem",
            {"dimensions": {"width": 1}},
            'reply.dimensions.width: unknown field "width" of shop.v1.Item.Dimensions; '
            'did you mean "widthCm" or "width_cm"?',
        ),
        ("shop.v1.Inventory/GetItem", {"onHand": 1.5}, "reply.onHand: expected an integer (int64), got 1.5"),
        (
            "shop.v1.Payments/Charge",
            {"riskSignals": [{"units": 1}]},
            'reply.riskSignals[0]: expected a mapping with "@type" (google.protobuf.Any), got {"units": 1}',
        ),
        (
            "shop.v1.Orders/GetOrder",
            {"lines": [{"unitPrice": {"units": "x"}}]},
            'reply.lines[0].unitPrice.units: expected an integer (int64), got "x"',
        ),
    ],
)
def test_problem_messages(shop: Catalog, method: str, value: Any, message: str) -> None:
    site = new_site("f.yaml", 9)
    assert compile_message(value, shop.method(method).output, site) is None
    assert problems(site) == [f"f.yaml:9: {message}"]


def test_needs_request_only_when_request_is_mentioned(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    assert body(spec, {"reservationId": "{{ uuid() }}"}).needs_request is False
    assert body(spec, {"reservationId": "{{ requests | length }}"}).needs_request is True
    assert body(spec, {"reservationId": "{% set r = request %}{{ r.sku }}"}).needs_request is True


# -- text templates


def test_text_templates(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    call = make_call(spec, {"sku": "A"})
    site = new_site()
    fixed = compile_text("sold out", site, {}, "message", "status.message")
    assert fixed is not None and fixed.static == "sold out" and fixed.render(call, 0) == "sold out"
    number = compile_text(5, site, {}, "x-retry", "headers.x-retry")
    assert number is not None and number.static == "5"
    templ = compile_text("no stock for {{ request.sku }}", site, {}, "message", "status.message")
    assert templ is not None and templ.static is None and templ.render(call, 0) == "no stock for A"
    assert static_text("x").static == "x" and static_text("x").render(call, 0) == "x"
    assert not problems(site)
    broken = compile_text("{{ request.sku.__class__ }}", site, {}, "message", "status.message")
    assert broken is not None
    with pytest.raises(TemplateError, match=r"^status\.message: access to attribute '__class__'"):
        broken.render(call, 0)
    node = located("status:\n  message: '{% if %}'\n  x: [1]\n")
    assert compile_text(node["status"]["message"], site, node["status"], "message", "status.message") is None
    assert compile_text(node["status"]["x"], site, node["status"], "x", "status.x") is None
    assert problems(site) == [
        "scenario.yaml:2: status.message: template error: "
        "Expected an expression, got 'end of statement block'",
        "scenario.yaml:3: status.x: expected text, got [1]",
    ]


def test_render_speed(shop: Catalog) -> None:
    spec = shop.method(RESERVE)
    compiled = body(
        spec,
        {
            "reservationId": "r-{{ request.sku }}",
            "qtyReserved": "{{ request.qty }}",
            "expiresAt": "2024-01-01T00:00:00Z",
        },
    )
    calls = [make_call(spec, {"sku": "A", "qty": 1}) for _ in range(2000)]
    started = time.perf_counter()
    for i, call in enumerate(calls):
        compiled.render(call, i)
    assert (time.perf_counter() - started) / len(calls) < 1e-3


# -- properties: any input compiles or gives located problems; renders fail only with TemplateError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(
        [
            "{{ request.sku }}",
            "{{ 1 }}",
            "{{",
            "{% for %}",
            "2024-01-01T00:00:00Z",
            "1.5s",
            "aGk=",
            "IN_STOCK",
            "{{ [1, 2] }}",
            "{{ {'a': 1} }}",
            "x{{ none }}",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "sku",
                    "title",
                    "onHand",
                    "tags",
                    "dimensions",
                    "audit",
                    "stockByWarehouse",
                    "thumbnail",
                    "availability",
                    "items",
                    "page",
                    "widthCm",
                    "createdAt",
                    "@type",
                    "x",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)

OUTPUTS = [
    "shop.v1.Inventory/GetItem",
    "shop.v1.Inventory/ListItems",
    "shop.v1.Payments/Charge",
    "shop.v1.Inventory/Watch",
    "shop.v1.Orders/GetOrder",
]


def _call(spec: MethodSpec) -> Call:
    return make_call(spec, {}, metadata={"x": "1"})


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(OUTPUTS), value=json_values)
def test_any_body_compiles_or_reports(shop: Catalog, method: str, value: Any) -> None:
    spec = shop.method(method)
    site = new_site()
    compiled = compile_message(value, spec.output, site)
    if compiled is None:
        assert problems(site)
        assert all(p.startswith("scenario.yaml:1: reply") for p in problems(site)), problems(site)
        return
    assert not problems(site)
    try:
        data = compiled.render(_call(spec), 0)
    except TemplateError as exc:
        assert str(exc).startswith("reply")
    else:
        spec.output_class.FromString(data)


_pieces = [*"{}%#()[]|.'\"~+*-_ axr1", "request", "range", "sku", "{{", "}}", "{%", "%}", "for", "in", "if"]
template_text = st.lists(st.sampled_from(_pieces), max_size=12).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=template_text | st.text(max_size=20))
def test_any_template_text_compiles_or_reports(shop: Catalog, source: str) -> None:
    spec = shop.method(RESERVE)
    site = new_site()
    compiled = compile_text(source, site, {}, "message", "status.message")
    if compiled is None:
        assert len(problems(site)) == 1 and problems(site)[0].startswith("scenario.yaml:1: status.message: ")
        return
    try:
        text = compiled.render(make_call(spec, {"sku": "s"}), 0)
    except TemplateError as exc:
        assert str(exc).startswith("status.message: ")
    else:
        assert isinstance(text, str)


def test_bytes_fields_round_trip(shop: Catalog) -> None:
    item = shop.method("shop.v1.Inventory/GetItem")
    raw = bytes(range(256))
    out = render(item, {"thumbnail": base64.urlsafe_b64encode(raw).decode().rstrip("=")})
    assert base64.b64decode(out["thumbnail"]) == raw


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "{% for t in request.labels | dictsort %}{{ t[0] }}={{ t[1] }}"
            "{% if not loop.last %},{% endif %}{% endfor %}",
            "a=1,b=2",
        ),
        ("{% for i in range(3) %}{{ loop.index }}/{{ loop.length }} {% endfor %}", "1/3 2/3 3/3 "),
        ("{% for i in [] %}x{% else %}empty{% endfor %}", "empty"),
        ("{% for i in range(5) if i is even %}{{ i }}{% endfor %}", "024"),
        ("{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(request.sku) }}", "<A>"),
        ("{% set x = request.sku | lower %}{{ x ~ '-' ~ x | upper }}", "a-A"),
        ("{{ request.labels | tojson }}", '{"a": "1", "b": "2"}'),
        ("{{ 'a,b'.split(',') | join('+') }}", "a+b"),
        ("{{ '%05d' % 3 }} {{ '{:05d}'.format(3) }} {{ '%s-%s' | format(1, 2) }}", "00003 00003 1-2"),
        ("{{ dict(a=1).a }} {{ range(4) | sum }} {{ request.sku.center(5, '*') }}", "1 6 **A**"),
        ("{{ request.nothing | default('d') }}", "d"),
        ("{{ request.items() | list | length }}", "5"),  # hold_for is absent: None, but not listed
        ("{{ request.keys() | sort | first }}", "labels"),
    ],
)
def test_ordinary_jinja_still_works(shop: Catalog, source: str, expected: str) -> None:
    spec = shop.method(RESERVE)
    out = render(spec, {"reservationId": source}, {"sku": "A", "labels": {"b": "2", "a": "1"}})
    assert out == {"reservation_id": expected}


def test_request_records_feed_replies(shop: Catalog) -> None:
    place = shop.method("shop.v1.Orders/PlaceOrder")
    request = {"customer_id": "c", "lines": [{"sku": "A", "qty": 2, "unit_price": {"units": 5}}], "region": 1}
    out = render(place, {"lines": "{{ request.lines }}", "customerId": "{{ request.customerId }}"}, request)
    assert out == {"customer_id": "c", "lines": [{"sku": "A", "qty": 2, "unit_price": {"units": "5"}}]}
    # a whole request as the reply, where the types line up
    spec = message_spec(shop, "shop.v1.Item")
    item = {
        "sku": "s",
        "on_hand": 3,
        "tags": ["t"],
        "thumbnail": b"hi",
        "audit": {"created_at": {"seconds": 1}},
    }
    assert render(spec, "{{ request }}", item) == {
        "sku": "s",
        "on_hand": "3",
        "tags": ["t"],
        "thumbnail": "aGk=",
        "audit": {"created_at": "1970-01-01T00:00:01Z"},
    }
    spec = message_spec(shop, "shop.v1.Item", "shop.v1.ListItemsResponse")
    out = render(spec, {"items": "{{ requests | list }}"}, {"sku": "a", "on_hand": 1}, {"sku": "b"})
    assert out == {"items": [{"sku": "a", "on_hand": "1"}, {"sku": "b"}]}


# -- the fast evaluator: simple expressions without Jinja, always agreeing with Jinja

_atoms = st.sampled_from(
    [
        "request.sku",
        "request.qty",
        "request['order_id']",
        "request.orderId",
        "request['orderId']",
        "request.labels.a",
        "request.labels['b']",
        "request.region",
        "request.nope",
        "requests[0].qty",
        "requests[-1].sku",
        "requests[3].sku",
        "index",
        "session.calls",
        "metadata['x-k']",
        "metadata.missing",
        "0",
        "1",
        "-2",
        "2.5",
        "0.0",
        "'a'",
        "''",
        "true",
        "false",
        "none",
        "99999999999999999999",
    ]
)
_binary = ["+", "-", "*", "/", "//", "%", "~", "==", "!=", "<", "<=", ">", ">=", "and", "or"]


def _expressions(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(_binary), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["-", "+", "not "]), children).map(lambda t: f"({t[0]}{t[1]})"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} < {t[1]} <= {t[2]})"),
    )


fast_expressions = _expressions(_expressions(_atoms) | _atoms)  # always an operation, often nested


def _outcome(evaluate: Any, ctx: dict[str, Any]) -> tuple[str, Any]:
    try:
        value = evaluate(dict(ctx))
    except Exception as exc:
        return "error", (type(exc), str(exc))
    return "value", (type(value), value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    expr=fast_expressions,
    text=st.booleans(),
    sku=st.sampled_from(["", "s-1", "10"]),
    qty=st.integers(-3, 3),
)
def test_fast_evaluator_agrees_with_jinja(shop: Catalog, expr: str, text: bool, sku: str, qty: int) -> None:
    spec = shop.method(RESERVE)
    source = f"v={{{{ {expr} }}}}." if text else f"{{{{ {expr} }}}}"
    try:
        compiled = templates._compile_source(source)
    except Exception:
        return  # not a template the loader would accept: nothing to evaluate
    call = make_call(spec, {"sku": sku, "qty": qty, "labels": {"a": "x"}}, metadata={"x-k": "v"})
    ctx = templates._context(call, 2, templates.CONTEXT_NAMES - {"uuid", "randint", "now"})
    jinja = compiled.fallback if isinstance(compiled, templates._Fast) else compiled
    assert _outcome(compiled.evaluate, ctx) == _outcome(jinja.evaluate, ctx)


@pytest.mark.parametrize(
    "expr",
    [
        "request.qty - 1",
        "request.qty * index + 1",
        "request.qty / 2",
        "request.qty // -2",
        "request.qty % 2",
        "request.sku + '-x'",
        "request.sku ~ request.qty ~ true ~ 2.5",
        "request.qty > 1 and request.sku",
        "request.sku or 'none'",
        "request.qty < 3 <= index",
        "request.qty == 2.0",
        "'x' if request.qty >= 2 else 'y'",
    ],
)
def test_fast_evaluator_table(shop: Catalog, expr: str) -> None:
    inner = test_fast_evaluator_agrees_with_jinja.hypothesis.inner_test  # type: ignore[attr-defined]
    for qty in (0, 2, 3):
        inner(shop, expr=expr, text=False, sku="s-1", qty=qty)
        inner(shop, expr=expr, text=True, sku="s-1", qty=qty)


@pytest.mark.parametrize(
    "source",
    [
        "{{ request.qty + 1 }}",
        "r-{{ request.sku }}-{{ index }}",
        "{{ request.sku ~ '/' ~ request.qty }}",
        "{{ 'big' if request.qty > 2 else 'small' }}",
        "{{ not request.sku and request.qty == 0 }}",
    ],
)
def test_simple_expressions_skip_jinja(source: str) -> None:
    assert isinstance(templates._compile_source(source), templates._Fast)


@pytest.mark.parametrize(
    "source",
    ["{{ request.sku | upper }}", "{{ uuid() }}", "{{ 'x' if request.qty }}", "{{ request.qty ** 2 }}"],
)
def test_other_expressions_run_in_jinja(source: str) -> None:
    assert not isinstance(templates._compile_source(source), templates._Fast)
