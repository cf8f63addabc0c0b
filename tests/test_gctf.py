"""The grpctestify harness (tests/gctf.py) on the project's own protos: its parse errors located at
``file:line``, and cases run over real grpc calls to a virtual server: strict and ``partial`` responses,
errors with details, a bidi ping-pong, server and client streams, chained calls and the assertions, each
failure naming the field that differs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gctf
import pytest

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.scenarios import load_scenarios

SCENARIO = """\
scenario: gctf
rules:
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: A-1}}
    reply:
      sku: A-1
      title: Anvil
      on_hand: 7
      availability: IN_STOCK
      tags: [heavy, iron]
      stock_by_warehouse: {ams-1: 3, fra-2: 4}
      dimensions: {width_cm: 30.25}
    trailers: {x-audit: done}
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: GONE}}
    status:
      code: NOT_FOUND
      message: no item GONE
      details:
        - {"@type": type.googleapis.com/google.rpc.ErrorInfo, reason: ITEM_GONE, domain: shop.example,
           metadata: {sku: GONE}}
        - {"@type": type.googleapis.com/google.rpc.BadRequest,
           field_violations: [{field: sku, description: retired}]}
  - method: shop.v1.Inventory/Reserve
    times: 1
    reply: {reservation_id: first, qty_reserved: "{{ request.qty }}"}
  - method: shop.v1.Inventory/Reserve
    reply: {reservation_id: later}
  - method: shop.v1.Inventory/Watch
    stream:
      - reply: {sku: A, on_hand: 1}
      - reply: {sku: B, on_hand: 2}
      - reply: {sku: C, on_hand: 3}
  - method: shop.v1.Inventory/BulkUpdate
    reply: {accepted: "{{ requests | length }}"}
  - method: shop.v1.Orders/Track
    per_message: true
    when: {request: {text: hi}}
    reply: {order_id: "{{ request.order_id }}", text: "hello {{ index }}", state: CONFIRMED}
  - method: shop.v1.Orders/Track
    per_message: true
    when: {request: {text: bye}}
    status: {code: ABORTED, message: "bye at {{ index }}"}
"""

Runner = Callable[..., list[str]]

HEADERS = """
--- REQUEST_HEADERS ---
x-virtsvc-scenario: gctf
"""

GET_ITEM = (
    """--- ENDPOINT ---
shop.v1.Inventory/GetItem
"""
    + HEADERS
    + """
--- REQUEST ---
{"sku": "A-1"}
"""
)

FULL_ITEM = """{
  "sku": "A-1", "title": "Anvil", "on_hand": "7", "availability": "IN_STOCK",
  "tags": ["heavy", "iron"], "stock_by_warehouse": {"ams-1": "3", "fra-2": "4"},
  "dimensions": {"width_cm": 30.25}
}"""


@pytest.fixture(scope="module")
def server(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualServer]:
    path = tmp_path_factory.mktemp("gctf") / "gctf.yaml"
    path.write_text(SCENARIO)
    with VirtualServer(catalog, load_scenarios(path, catalog)) as srv:
        yield srv


@pytest.fixture
def run(server: VirtualServer, catalog: Catalog, tmp_path: Path) -> Runner:
    """``run(text)`` writes a case file, parses it and runs it against the server: the failures."""

    def run_text(text: str, headers: Sequence[tuple[str, str]] = ()) -> list[str]:
        path = tmp_path / "case.gctf"
        path.write_text(text)
        return gctf.run(gctf.parse(path), catalog.pool, server.address, headers)

    return run_text


# --- parsing -------------------------------------------------------------------------------------

PARSE_ERRORS = [
    ("--- ENDPOINT ---\na.B/C\n--- REQEST ---\n{}\n", 3, "unknown section 'REQEST'; did you mean REQUEST?"),
    (
        '--- ENDPOINT ---\na.B/C\n--- REQUEST ---\n{\n  "a": 1,\n  b c\n}\n--- RESPONSE ---\n{}\n',
        6,
        "invalid JSON: Unexpected",
    ),
    ("--- REQUEST ---\n{}\n", 1, "REQUEST before any ENDPOINT"),
    ("--- ENDPOINT ---\na.B/C\n--- ASSERTS ---\n.a == 1\n", 3, "ASSERTS must follow a RESPONSE or an ERROR"),
    (
        "--- ENDPOINT ---\na.B/C\n--- RESPONSE partal ---\n{}\n",
        3,
        "unknown RESPONSE option 'partal'; did you mean partial?",
    ),
    (
        "--- ENDPOINT ---\na.B/C\n--- RESPONSE ---\n{}\n--- ASSERTS ---\n// ok\n.a ~ 1\n",
        7,
        "'.a ~ 1': expected '.path [== | != | >= | <= | > | < value]'",
    ),
    (
        "--- ENDPOINT ---\na.B/C\n--- RESPONSE ---\n{}\n--- ASSERTS ---\n@has_valu(.a)\n",
        6,
        "unknown assertion function @has_valu; did you mean @has_value?",
    ),
    ("--- ENDPOINT ---\na.B/C\n--- REQUEST ---\n{}\n", 1, "the call to a.B/C has no RESPONSE or ERROR"),
    ("--- ENDPOINT ---\nnot-a-method\n", 1, "ENDPOINT 'not-a-method' is not package.Service/Method"),
    (
        '--- ENDPOINT ---\na.B/C\n--- ERROR ---\n{"code": 3, "mesage": "x"}\n',
        4,
        "ERROR keys are code, message and details, not mesage",
    ),
    ('--- ENDPOINT ---\na.B/C\n--- ERROR ---\n{"code": "NOT_FOND"}\n', 4, "unknown status code 'NOT_FOND'"),
    (
        "--- ENDPOINT ---\na.B/C\n--- REQUEST_HEADERS ---\nx-a\n--- RESPONSE ---\n{}\n",
        4,
        "a header is 'name: value', got 'x-a'",
    ),
    ("hello\n--- ENDPOINT ---\na.B/C\n", 1, "text before the first section"),
]


@pytest.mark.parametrize(("text", "line", "message"), PARSE_ERRORS)
def test_parse_errors_are_located(tmp_path: Path, text: str, line: int, message: str) -> None:
    """Each mistake is reported as ``file:line: message`` at the line that holds it."""
    path = tmp_path / "bad.gctf"
    path.write_text(text)
    with pytest.raises(gctf.CaseError) as info:
        gctf.parse(path)
    assert str(info.value).startswith(f"{path}:{line}: {message}")


def test_parse_reads_chains_several_messages_options_and_json5(tmp_path: Path) -> None:
    """Two calls in one file, two messages in one RESPONSE, options, comments and trailing commas."""
    text = """--- META ---
name: x

// a comment between sections
--- ADDRESS ---
127.0.0.1:1
--- ENDPOINT ---
a.B/C
--- REQUEST ---
{"a": 1, // the first
}
--- RESPONSE partial with_asserts tolerance=0.5 ---
{"x": 1}
{"x": 2}
--- ASSERTS ---
@scope.message_count() == 2
.x != other
--- ENDPOINT ---
a.B/D
--- ERROR ---
{"code": "NOT_FOUND", "message": "m"}
"""
    path = tmp_path / "ok.gctf"
    path.write_text(text)
    first, second = gctf.parse(path).calls
    assert (first.endpoint, first.address, second.endpoint) == ("a.B/C", "127.0.0.1:1", "a.B/D")
    request, expected = first.steps
    assert isinstance(request, gctf.Request) and request.message == {"a": 1}
    assert isinstance(expected, gctf.Expected)
    assert (expected.messages, expected.partial, expected.tolerance) == ([{"x": 1}, {"x": 2}], True, 0.5)
    assert [(a.op, a.right) for a in expected.asserts] == [("==", 2), ("!=", "other")]
    error = second.steps[0]
    assert isinstance(error, gctf.ExpectedError) and (error.code, error.message) == (5, "m")


# --- running -------------------------------------------------------------------------------------


def test_strict_response_passes_with_values_read_through_the_type(run: Runner) -> None:
    """int64 as text or number, enum by name or number, map keys: all compared by value."""
    assert run(GET_ITEM + "--- RESPONSE ---\n" + FULL_ITEM) == []
    numbers = FULL_ITEM.replace('"7"', "7").replace('"IN_STOCK"', "1").replace('"on_hand"', '"onHand"')
    assert run(GET_ITEM + "--- RESPONSE ---\n" + numbers) == []


def test_strict_response_fails_naming_the_field(run: Runner, tmp_path: Path) -> None:
    """A wrong value, a field the case leaves out and a short list are each named by path."""
    wrong = FULL_ITEM.replace('"fra-2": "4"', '"fra-2": "5"')
    line = (GET_ITEM + "x").count("\n") + 1
    assert run(GET_ITEM + "--- RESPONSE ---\n" + wrong) == [
        f'{tmp_path / "case.gctf"}:{line}: .stock_by_warehouse["fra-2"]: expected "5", got "4"'
    ]
    [failure] = run(GET_ITEM + '--- RESPONSE ---\n{"sku": "A-1", "title": "Anvil", "tags": ["heavy"]}')
    assert '.tags: expected 1 elements, got 2: ["heavy", "iron"]' in failure
    assert '.on_hand: not expected, got "7"' in failure and ".dimensions: not expected" in failure


def test_partial_response_asks_for_a_subset(run: Runner) -> None:
    """``partial`` passes on a subset (the default-valued field left out too) and still fails a value."""
    assert (
        run(GET_ITEM + '--- RESPONSE partial ---\n{"title": "Anvil", "dimensions": {"height_cm": 0}}') == []
    )
    [failure] = run(GET_ITEM + '--- RESPONSE partial ---\n{"dimensions": {"width_cm": 30.5}}')
    assert failure.endswith(".dimensions.width_cm: expected 30.5, got 30.25")
    assert run(GET_ITEM + '--- RESPONSE partial tolerance=0.3 ---\n{"dimensions": {"width_cm": 30.5}}') == []


def test_error_with_details(run: Runner) -> None:
    """Code, message and details (JSON or proto names, ``type`` or ``@type``) compared; a wrong one named."""
    error = """--- ERROR ---
{"code": 5, "message": "no item GONE", "details": [
  {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ITEM_GONE", "domain": "shop.example",
   "metadata": {"sku": "GONE"}},
  {"type": "type.googleapis.com/google.rpc.BadRequest",
   "fieldViolations": [{"field": "sku", "description": "retired"}]},
]}
"""
    gone = GET_ITEM.replace("A-1", "GONE")
    assert run(gone + error) == []
    failures = run(gone + error.replace("ITEM_GONE", "ITEM_LOST").replace('"code": 5', '"code": 3'))
    assert [f.split(": ", 1)[1] for f in failures] == [
        "code: expected 3 (INVALID_ARGUMENT), got 5 (NOT_FOUND): 'no item GONE'",
        'details[0].reason: expected "ITEM_LOST", got "ITEM_GONE"',
    ]
    no_details = run(gone + '--- ERROR ---\n{"code": 5, "message": "no item GONE"}')
    assert len(no_details) == 1 and "details: expected 0 elements, got 2" in no_details[0]
    [answered] = run(GET_ITEM + '--- ERROR ---\n{"code": 5}')
    assert 'expected an error, got a message: {"sku": "A-1", "title": "Anvil"' in answered


def test_bidi_ping_pong(run: Runner) -> None:
    """Each RESPONSE is awaited before the next REQUEST; the error that ends the exchange is compared."""
    track = "--- ENDPOINT ---\nshop.v1.Orders/Track\n" + HEADERS
    exchange = track + (
        '--- REQUEST ---\n{"order_id": "o1", "text": "hi"}\n'
        '--- RESPONSE ---\n{"order_id": "o1", "text": "hello 0", "state": "CONFIRMED"}\n'
        '--- REQUEST ---\n{"order_id": "o2", "text": "hi"}\n'
        '--- RESPONSE ---\n{"order_id": "o2", "text": "hello 1", "state": "CONFIRMED"}\n'
        '--- REQUEST ---\n{"text": "bye"}\n'
        '--- ERROR ---\n{"code": 10, "message": "bye at 2"}\n'
    )
    assert run(exchange) == []
    [failure] = run(exchange.replace('"hello 1"', '"hello 9"'))
    assert failure.endswith('.text: expected "hello 9", got "hello 1"')


def test_server_stream_scopes_and_messages_past_the_expectations(run: Runner) -> None:
    """Two RESPONSE blocks read the stream in order; the third message is not asserted."""
    watch = "--- ENDPOINT ---\nshop.v1.Inventory/Watch\n" + HEADERS + '--- REQUEST ---\n{"skus": ["A"]}\n'
    case = watch + (
        '--- RESPONSE with_asserts ---\n{"sku": "A", "on_hand": 1}\n'
        "--- ASSERTS ---\n@scope.index() == 1\n@scope.message_count() == 1\n@total_elapsed_ms() >= 0\n"
        '--- RESPONSE with_asserts ---\n{"sku": "B", "on_hand": 2}\n'
        "--- ASSERTS ---\n@scope.index() == 2\n.on_hand > 1\n"
    )
    assert run(case) == []
    [failure] = run(case.replace("@scope.index() == 2", "@scope.index() == 1"))
    assert failure.endswith("@scope.index() == 1: got 2")
    too_many = (
        watch
        + '--- RESPONSE ---\n{"sku": "A", "on_hand": 1}\n{"sku": "B", "on_hand": 2}\n'
        + '{"sku": "C", "on_hand": 3}\n{}\n'
    )
    [ended] = run(too_many)
    assert ended.endswith("expected message 4 of the response, got the end of the stream")


def test_client_stream_and_a_chain_of_calls(run: Runner) -> None:
    """Every REQUEST of a client stream is sent before the answer; a later call sees the earlier one's use."""
    bulk = "--- ENDPOINT ---\nshop.v1.Inventory/BulkUpdate\n" + HEADERS
    assert (
        run(
            bulk + '--- REQUEST ---\n{"sku": "A"}\n--- REQUEST ---\n{"sku": "B"}\n'
            '--- RESPONSE ---\n{"accepted": 2}\n'
        )
        == []
    )
    reserve = (
        "--- ENDPOINT ---\nshop.v1.Inventory/Reserve\n" + HEADERS + "x-virtsvc-session: chain\n"
        '--- REQUEST ---\n{"sku": "A", "qty": 3}\n'
    )
    chain = reserve + '--- RESPONSE ---\n{"reservation_id": "first", "qty_reserved": 3}\n'
    chain += reserve + '--- RESPONSE ---\n{"reservation_id": "later"}\n'
    assert run(chain) == []


def test_assertions_on_fields_and_trailers(run: Runner, tmp_path: Path) -> None:
    """Paths with ``["key"]``, comparisons, ``@has_value`` and ``@trailer``; a failing one at its own line."""
    asserts = (
        '--- RESPONSE partial with_asserts ---\n{"sku": "A-1"}\n--- ASSERTS ---\n'
        '.stock_by_warehouse["ams-1"] == 3\n.on_hand >= 7\n.title != Hammer\n@has_value(.tags)\n'
        '@trailer("x-audit") == "done"\n.dimensions.width_cm < 31\n'
    )
    assert run(GET_ITEM + asserts) == []
    failing = GET_ITEM + asserts + "@has_value(.audit)\n.on_hand < 7\n"
    last = failing.count("\n")
    assert run(failing) == [
        f"{tmp_path / 'case.gctf'}:{last - 1}: @has_value(.audit): no value",
        f'{tmp_path / "case.gctf"}:{last}: .on_hand < 7: got "7"',
    ]


def test_a_request_or_endpoint_the_contract_lacks(run: Runner, tmp_path: Path) -> None:
    """Located failures naming the near miss, not tracebacks."""
    case = tmp_path / "case.gctf"
    [unknown] = run("--- ENDPOINT ---\nshop.v1.Inventory/GetItems\n--- RESPONSE ---\n{}\n")
    assert unknown == f"{case}:1: shop.v1.Inventory has no method 'GetItems'; did you mean GetItem?"
    [bad] = run(GET_ITEM.replace('{"sku": "A-1"}', '{"skew": "A-1"}') + "--- RESPONSE ---\n{}\n")
    assert bad.startswith(f"{case}:7: REQUEST is not a shop.v1.GetItemRequest:") and '"skew"' in bad
    [expected] = run(GET_ITEM + '--- RESPONSE ---\n{"titel": "x"}\n')
    assert "the expected response is not a shop.v1.Item" in expected and "titel" in expected


def test_headers_given_to_run_go_with_every_call(run: Runner) -> None:
    """The caller's headers (a scenario, a session of its own) join each call's REQUEST_HEADERS."""
    case = GET_ITEM.replace(HEADERS, "") + '--- RESPONSE partial ---\n{"title": "Anvil"}\n'
    [unrouted] = run(case)
    assert "expected the response, got FAILED_PRECONDITION: no scenario selected" in unrouted
    assert run(case, [("x-virtsvc-scenario", "gctf"), ("x-virtsvc-session", "own")]) == []
