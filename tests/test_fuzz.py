"""Property tests end to end: random scenario documents through the loader, random matchers and templates
through compile -> match -> render, and random bytes and metadata over the wire to every method.

The properties: random input either loads or produces located errors (``<fuzz>:line: message``), never
an exception escaping; a compiled rule checks and renders any request without raising anything but a
TemplateError (which the server answers INTERNAL with its text); and no wire input makes the server answer
UNKNOWN (an exception escaping a handler), hang, or stop serving good calls. Example counts are bounded.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtsvc.contracts import Catalog
from virtsvc.engine.store import MemorySession as Session
from virtsvc.errors import ScenarioError
from virtsvc.scenarios import compile_text
from virtsvc.scenarios.model import Call, CompiledScenario
from virtsvc.scenarios.templates import TemplateError
from virtsvc.server import VirtualServer

ORIGIN = "<fuzz>"
_SHARED: dict[str, Any] = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_catalog(catalog: Catalog) -> None:
    # Property tests take the catalog from here, not as an argument: hypothesis would print all of it
    # in every falsifying example.
    _SHARED["catalog"] = catalog


def shop() -> Catalog:
    return _SHARED["catalog"]  # type: ignore[no-any-return]


LOCATED = re.compile(rf"{re.escape(ORIGIN)}(:\d+(:\d+)?)?: \S.*", re.DOTALL)

FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

METHODS = [
    "shop.v1.Inventory/Reserve",
    "shop.v1.Inventory/GetItem",
    "shop.v1.Inventory/Watch",
    "shop.v1.Inventory/BulkUpdate",
    "shop.v1.Inventory/Ping",
    "shop.v1.Orders/PlaceOrder",
    "shop.v1.Orders/Track",
    "shop.v1.Payments/Charge",
]

# -- random scenario documents ------------------------------------------------------------------------

KEYS = [
    "scenario", "version", "description", "extends", "rules", "method", "when", "times", "priority", "reply",
    "status", "fault", "sequence", "after", "stream", "each_request", "handler", "delay", "headers",
    "trailers",
    "request", "metadata", "code", "message", "details", "uniform", "lognormal", "median", "p99",
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$regex", "$contains", "$exists",
    "sku", "qty", "reservationId", "reservation_id", "qtyReserved", "expiresAt", "labels", "holdFor",
    "region",
    "title", "tags", "onHand", "items", "@type", "chargeId", "outcome", "x-tenant", "unknown", "",
]  # fmt: skip
# Numbers stay within +-1e11: a Duration literal just past protobuf's range (315,576,000,001 s) escapes the
# matcher compiler as a ValueError today (test_reliability.py::test_check_survives_known_loader_crashes).
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**11), max_value=10**11),
    st.floats(min_value=-1e11, max_value=1e11) | st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from(
        [
            *METHODS,
            "shop.v1.Inventory/Nope",
            "nope",
            "25ms",
            "-1s",
            "1e400s",
            "10h",
            "OK",
            "NOT_FOUND",
            "13",
            "drop",
            "garbage",
            "reset",
            "cycle",
            "fail",
            "repeat_last",
            "(a|b)*",
            "[",
            "(",
            "\\",
            "{{",
            "}}",
            "{{ request.sku }}",
            "{{ request.nope }}",
            "{{ requests | length }}",
            "{{ 1/0 }}",
            "{% for x in %}",
            "{{ index * 2 }}",
            "{{ uuid() }}",
            "{{ now() }}",
            "{{ randint(1, 6) }}",
            "{{ metadata['x-a'] }}",
            "{{ request.__class__ }}",
            "{{ 'x' * 10 }}",
            "{% if request.qty > 1 %}a{% else %}b{% endif %}",
            "2024-01-01T00:00:00Z",
            "1.5s",
            "IN_STOCK",
            "REGION_EU",
            "APPROVED",
            "QUJD",
            "-",
            "*",
        ]
    ),
    st.text(max_size=12),
)


def _values(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
        ),
        max_leaves=25,
    )


VALUES = _values(SCALARS)


@st.composite
def rules(draw: st.DrawFn) -> Any:
    """Mostly well-shaped rules with random parts: method, then a few keys of the rule vocabulary."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    rule: dict[Any, Any] = {"method": draw(st.sampled_from([*METHODS, "shop.v1.Nope/X", 42]))}
    for key in draw(st.lists(st.sampled_from(KEYS[5:20]), max_size=4, unique=True)):
        rule[key] = draw(VALUES)
    if draw(st.booleans()):
        rule["reply"] = draw(st.dictionaries(st.sampled_from(KEYS[40:]), SCALARS | VALUES, max_size=4))
    if draw(st.booleans()):
        rule["when"] = {"request": draw(st.dictionaries(st.sampled_from(KEYS[40:50]), VALUES, max_size=3))}
    return rule


@st.composite
def documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    doc: dict[Any, Any] = {
        "scenario": draw(st.sampled_from(["fz", "Fz", "", "a b", "fz-2"]) | st.text(max_size=8)),
        "rules": draw(st.lists(rules(), max_size=4)),
    }
    for key in draw(st.lists(st.sampled_from([*KEYS[:5], "nope"]), max_size=2, unique=True)):
        doc[key] = draw(VALUES)
    return doc


def _dump(doc: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(doc, default=str, ensure_ascii=False)  # \uD83D\uDE00 escapes: see test_reliability
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _assert_located(exc: ScenarioError) -> None:
    assert exc.problems, "a ScenarioError without problems"
    for problem in exc.problems:
        assert problem.file == ORIGIN
        assert LOCATED.fullmatch(str(problem)), str(problem)


def _compile(text: str, catalog: Catalog) -> list[CompiledScenario]:
    try:
        return compile_text(text, catalog, origin=ORIGIN)
    except ScenarioError as exc:
        _assert_located(exc)
        return []


@settings(FUZZ, max_examples=300)
@given(doc=documents(), as_json=st.booleans())
def test_random_documents_load_or_give_located_errors(doc: Any, as_json: bool) -> None:
    """Random scenario-shaped documents (YAML or JSON): compiled, or ScenarioError with located problems."""
    try:
        text = _dump(doc, as_json)
    except (ValueError, yaml.YAMLError):
        return
    _compile(text, shop())


TEXT_PIECES = st.sampled_from([
    "scenario: fz\n", "rules:\n", "  - method: shop.v1.Inventory/Reserve\n",
    "    reply: {reservationId: x}\n", "    when: {request: {sku: {$regex: '('}}}\n", "  -", ": ", "{", "}",
    "[", "]", "&a ", "*a", "!!python/name:os.system", "!!binary", "---\n", "...\n", "\t", "%YAML 1.1\n",
    "'", '"', "\\u0000", "\x00", "\ufeff", "\ud7ff", "#", "? ",
    "<<: *a\n", "\n", "  ", "- ", "{{ request.sku }}", "1e999", "0x1F", "~", "null", "true",
])  # fmt: skip


@settings(FUZZ, max_examples=300)
@given(pieces=st.lists(TEXT_PIECES | st.text(max_size=10), max_size=25))
def test_random_text_loads_or_gives_located_errors(pieces: list[str]) -> None:
    """Random text made of YAML syntax fragments and arbitrary characters: never an exception escaping."""
    _compile("".join(pieces), shop())


# -- random matchers and templates, compiled then run ------------------------------------------------------

OPERATORS = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$regex", "$contains", "$exists"]
RESERVE_FIELDS = ["sku", "qty", "order_id", "orderId", "region", "hold_for", "holdFor", "labels", "nope"]
OPERANDS = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), SCALARS, max_size=2),
    st.sampled_from(["^a", "a+", "(?i)X", ".*", "[0-9]{2}", "ab|cd", "1s", "REGION_EU", "2"]),
)
TEMPLATE_PARTS = st.sampled_from([
    "{{ request.sku }}", "{{ request.qty }}", "{{ request.qty * 2 }}", "{{ request.labels }}",
    "{{ request.hold_for }}", "{{ request.region }}", "{{ requests | length }}", "{{ metadata }}",
    "{{ index }}", "{{ session.id }}", "{{ request.sku | upper }}", "{{ request.sku[0] }}",
    "{{ request.sku ~ request.order_id }}", "{{ request.qty // 0 }}", "{{ request.sku | int }}",
    "{% for k in request.labels %}{{ k }}{% endfor %}", "{{ request.labels['a'] }}", "{{ request.nope }}",
    "{{ request.sku * request.qty }}", "{{ '%s' % request.sku }}", "{{ request.sku.format(1) }}",
    "{{ range(request.qty) | list }}", "{{ request.qty ** request.qty }}", "x", "", "{{", "}}",
])  # fmt: skip


# Operands that fit each field (so that a good share of the rules compile), besides random ones.
TYPED = {
    "sku": st.text(max_size=4) | st.sampled_from(["^a", "a+", "(?i)X", ".*", "ab|cd"]),
    "qty": st.integers(-3, 20),
    "order_id": st.text(max_size=4),
    "orderId": st.text(max_size=4),
    "region": st.sampled_from(["REGION_EU", "REGION_US", "REGION_UNSPECIFIED", 1]),
    "hold_for": st.sampled_from(["1s", "1.5s", "0s", "-2s", "100ms"]),
    "holdFor": st.sampled_from(["1s", "1.5s", "0s"]),
    "labels": st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
    "nope": st.just(1),
}
TYPED_OPERATORS = {
    "sku": ["$eq", "$ne", "$in", "$regex", "$exists"],
    "qty": ["$eq", "$gt", "$gte", "$lt", "$lte", "$in", "$ne"],
    "order_id": ["$eq", "$regex", "$exists"], "orderId": ["$ne"], "region": ["$eq", "$ne", "$in"],
    "hold_for": ["$gt", "$lte", "$eq"], "holdFor": ["$lt"], "labels": ["$contains", "$exists"],
    "nope": ["$eq"],
}  # fmt: skip
TYPED_REPLY = {
    "reservationId": TEMPLATE_PARTS,
    "qtyReserved": st.sampled_from(
        [
            "{{ request.qty }}",
            "{{ index }}",
            "{{ requests | length }}",
            "{{ 1/0 }}",
            "{{ request.qty * 1000000000000 }}",
            "{{ request.sku }}",
        ]
    ),
    "expiresAt": st.sampled_from(["{{ now() }}", "{{ request.sku }}", "2024-01-01T00:00:00Z", "{{ index }}"]),
}


@st.composite
def matcher_rules(draw: st.DrawFn) -> dict[str, Any]:
    when: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(RESERVE_FIELDS), max_size=3, unique=True)):
        typed = draw(st.integers(0, 3)) > 0
        operand = TYPED[name] if typed else OPERANDS
        if draw(st.booleans()):
            when[name] = draw(operand)
        else:
            op = draw(st.sampled_from(TYPED_OPERATORS[name] if typed else OPERATORS))
            if op == "$in":
                when[name] = {op: draw(st.lists(operand, max_size=3))}
            elif op == "$exists":
                when[name] = {op: draw(st.booleans())}
            elif op == "$contains" and typed:
                when[name] = {op: draw(st.text(max_size=2))}
            else:
                when[name] = {op: draw(operand)}
    metadata = draw(
        st.dictionaries(st.sampled_from(["x-a", "x-b", "X-Up"]), st.text(max_size=3) | OPERANDS, max_size=2)
    )
    reply_fields = draw(st.lists(st.sampled_from(sorted(TYPED_REPLY)), max_size=3, unique=True))
    reply = {
        name: "".join(draw(st.lists(TYPED_REPLY[name], min_size=1, max_size=2))) for name in reply_fields
    }
    return {
        "method": "shop.v1.Inventory/Reserve",
        "when": {"request": when, "metadata": metadata},
        "reply": reply,
    }


REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "sku": st.text(max_size=10),
        "qty": st.integers(-3, 20) | st.sampled_from([2**31 - 1, -(2**31)]),
        "order_id": st.text(max_size=5),
        "region": st.integers(0, 5),
        "labels": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
        "hold_for": st.fixed_dictionaries(
            {"seconds": st.integers(0, 10**6), "nanos": st.integers(0, 999_999_999)}
        ),
    },
)


@settings(FUZZ, max_examples=250)
@given(
    rule=matcher_rules(),
    requests=st.lists(REQUESTS, min_size=1, max_size=3),
    metadata=st.dictionaries(
        st.sampled_from(["x-a", "x-b"]), st.text(string.printable, max_size=5), max_size=2
    ),
)
def test_random_matchers_and_templates_run_without_escaping_errors(
    rule: dict[str, Any], requests: list[dict[str, Any]], metadata: dict[str, str]
) -> None:
    """A random ``when`` and reply template compile or give located errors; a compiled rule checks any
    request to a MatchResult and renders it to a valid reply or a TemplateError, nothing else."""
    catalog = shop()
    compiled = _compile(json.dumps({"scenario": "fz", "rules": [rule]}, ensure_ascii=False), catalog)
    if not compiled:
        return
    (compiled_rule,) = compiled[0].rules
    spec = catalog.method("shop.v1.Inventory/Reserve")
    session = Session("fz", "s")
    for fields in requests:
        message = spec.input_class()
        message.sku = fields.get("sku", "")
        message.qty = fields.get("qty", 0)
        message.order_id = fields.get("order_id", "")
        message.region = fields.get("region", 0)
        message.labels.update(fields.get("labels", {}))
        if "hold_for" in fields:
            message.hold_for.seconds = fields["hold_for"]["seconds"]
            message.hold_for.nanos = fields["hold_for"]["nanos"]
        call = Call(spec, "fz", session, metadata, [message.SerializeToString()])
        if compiled_rule.when is not None:
            result = compiled_rule.when.check(call)
            assert isinstance(result.ok, bool) and all(isinstance(f, str) for f in result.failures)
        body = compiled_rule.steps[0].body
        if body is None or body.static is not None:
            continue
        try:
            raw = body.render(call, 0)
        except TemplateError as exc:
            assert str(exc).strip(), "a TemplateError without a message"
            continue
        spec.output_class.FromString(raw)


# -- random bytes and metadata over the wire ----------------------------------------------------------------

KINDS = {
    "unary": "unary_unary",
    "server_streaming": "unary_stream",
    "client_streaming": "stream_unary",
    "bidi_streaming": "stream_stream",
}
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}


def _catch_all(catalog: Catalog) -> str:
    """A scenario answering every method of the catalog, partly from templates over the request."""
    rules = []
    for spec in catalog.methods.values():
        if spec.kind == "unary":
            rules.append({"method": spec.full_name, "reply": {}})
        elif spec.kind == "server_streaming":
            rules.append({"method": spec.full_name, "stream": [{"reply": {}}, {"reply": {}}]})
        elif spec.kind == "client_streaming":
            rules.append({"method": spec.full_name, "reply": {}})
        else:
            rules.append({"method": spec.full_name, "each_request": {"reply": {}}})
    rules.insert(
        0,
        {
            "method": "shop.v1.Inventory/Reserve",
            "when": {"request": {"sku": {"$regex": "^a"}}},
            "reply": {"reservationId": "{{ request.sku }}-{{ metadata['x-a'] | default('') }}"},
        },
    )
    for rule in rules:
        if rule["method"] == "shop.v1.Inventory/BulkUpdate":
            rule["reply"] = {"accepted": "{{ requests | length }}"}
    return json.dumps({"scenario": "fz", "rules": rules})


@pytest.fixture(scope="module")
def wire(catalog: Catalog) -> Iterator[tuple[VirtualServer, grpc.Channel]]:
    scenarios = compile_text(_catch_all(catalog), catalog, origin="fz.json")
    with (
        VirtualServer(catalog, scenarios, default_scenario="fz", max_message_bytes=1 << 16) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        yield srv, ch


KEY_CHARS = string.ascii_lowercase + string.digits + "-_."
METADATA = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["x-virtsvc-scenario", "x-virtsvc-session", "baggage", "x-a", "authorization"])
            | st.text(KEY_CHARS, min_size=1, max_size=12).filter(lambda k: not k.startswith("grpc-")),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
        ),
        st.tuples(
            st.text(KEY_CHARS, min_size=1, max_size=8).map(lambda k: f"x{k}-bin"), st.binary(max_size=40)
        ),
    ),
    max_size=6,
)


def _good(catalog: Catalog, channel: grpc.Channel) -> None:
    spec = catalog.method("shop.v1.Inventory/Reserve")
    raw = channel.unary_unary(spec.path)(
        spec.input_class(sku="abc").SerializeToString(), metadata=(("x-a", "1"),), timeout=5
    )
    assert spec.output_class.FromString(raw).reservation_id == "abc-1"


@settings(FUZZ, max_examples=200)
@given(
    method=st.sampled_from([*METHODS, "shop.v1.Orders/GetOrder", "shop.v1.Inventory/ListItems"]),
    messages=st.lists(st.binary(max_size=48), min_size=1, max_size=3),
    metadata=METADATA,
)
def test_wire_fuzz_every_method(
    wire: tuple[VirtualServer, grpc.Channel],
    method: str,
    messages: list[bytes],
    metadata: list[tuple[str, Any]],
) -> None:
    """Random bytes as requests and random metadata, to methods of all four kinds: every call ends with a
    status other than UNKNOWN (an exception escaping), DEADLINE_EXCEEDED (a hang) or UNAVAILABLE (a crash),
    and a good call is answered right after."""
    catalog = shop()
    _, channel = wire
    spec = catalog.method(method)
    call = getattr(channel, KINDS[spec.kind])(spec.path)
    md = tuple(metadata)
    try:
        if spec.kind == "unary":
            call(messages[0], metadata=md, timeout=5)
        elif spec.kind == "server_streaming":
            list(call(messages[0], metadata=md, timeout=5))
        elif spec.kind == "client_streaming":
            call(iter(messages), metadata=md, timeout=5)
        else:
            list(call(iter(messages), metadata=md, timeout=5))
    except grpc.RpcError as exc:
        assert exc.code() not in NEVER, (exc.code(), exc.details())
        if exc.code() is grpc.StatusCode.INVALID_ARGUMENT and exc.details().startswith("the request to"):
            assert spec.full_name in exc.details()
    _good(catalog, channel)


def test_every_method_answers_after_the_fuzz(
    catalog: Catalog, wire: tuple[VirtualServer, grpc.Channel]
) -> None:
    """Each method of protos/ answers a well-formed call (all four kinds), with the fuzz server's scenario."""
    _, channel = wire
    for spec in catalog.methods.values():
        call = getattr(channel, KINDS[spec.kind])(spec.path)
        empty = spec.input_class().SerializeToString()
        if spec.kind == "unary":
            call(empty, timeout=5)
        elif spec.kind == "server_streaming":
            assert len(list(call(empty, timeout=5))) == 2
        elif spec.kind == "client_streaming":
            call(iter([empty, empty]), timeout=5)
        else:
            assert len(list(call(iter([empty, empty]), timeout=5))) == 2
