"""Templates that name request fields are checked against the method's input type at load (issue 12).

``{{ request.town }}`` on a method whose input has no ``town`` used to pass ``virtsvc check`` and the
server's start-up, then fail every call with INTERNAL. Look-ups of ``request.X`` and ``requests[i].X``
(nested paths, loop variables, proto or JSON names) are now reported at the template's ``file:line`` with a
did-you-mean, in files, admin text and inline rules alike; what cannot be known at load (map keys,
well-known types, dynamic keys, methods) is left alone.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from virtsvc import cli
from virtsvc.admin import AdminClient
from virtsvc.contracts import Catalog
from virtsvc.errors import ScenarioError
from virtsvc.scenarios import compile_rules, compile_text
from virtsvc.server import VirtualServer
from virtsvc.testing import VirtualService

PLACE = "shop.v1.Orders/PlaceOrder"
RESERVE = "shop.v1.Inventory/Reserve"

# Every template below names a field its request does not have; the comment is the line reported.
TYPOS = """\
scenario: typos
rules:
  - method: shop.v1.Orders/PlaceOrder
    reply:
      customerId: "{{ request.custmer_id }}"
      lines:
        - sku: "{{ request.lines[0].skuu }}"
          qty: "{{ request.lines[0].unitPrice.unitz + 1 }}"
      orderId: "{% for l in request.lines %}{{ l.qtty }}{% endfor %}"
    headers: {x-order: "{{ request.regoin }}"}
  - method: shop.v1.Inventory/BulkUpdate
    reply: {accepted: "{{ requests[0].cout }}"}
    status: {code: OK, message: "{% for r in requests %}{{ r.skus }}{% endfor %}"}
  - method: shop.v1.Inventory/Reserve
    reply: {reservationId: "{{ request.town }}", qtyReserved: "{{ request.dayz + 1 }}"}
"""
TYPO_LINES = [
    '5: reply.customerId: request.custmer_id: shop.v1.PlaceOrderRequest has no field "custmer_id" '
    '(did you mean "customer_id" or "customerId"?)',
    '7: reply.lines[0].sku: request.lines[0].skuu: shop.v1.OrderLine has no field "skuu" '
    '(did you mean "sku"?)',
    '8: reply.lines[0].qty: request.lines[0].unitPrice.unitz: common.v1.Money has no field "unitz" '
    '(did you mean "units"?)',
    '9: reply.orderId: l.qtty: shop.v1.OrderLine has no field "qtty" (did you mean "qty"?)',
    '10: headers.x-order: request.regoin: shop.v1.PlaceOrderRequest has no field "regoin" '
    '(did you mean "region"?)',
    '12: reply.accepted: requests[0].cout: shop.v1.StockCount has no field "cout" (did you mean "count"?)',
    '13: status.message: r.skus: shop.v1.StockCount has no field "skus" (did you mean "sku"?)',
    '15: reply.qtyReserved: request.dayz: shop.v1.ReserveRequest has no field "dayz"; '
    "its fields are sku, qty, order_id, region, hold_for, labels",
    '15: reply.reservationId: request.town: shop.v1.ReserveRequest has no field "town"; '
    "its fields are sku, qty, order_id, region, hold_for, labels",
]


def test_check_reports_unknown_request_fields(
    tmp_path: Path, generated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`virtsvc check`: exit 1, one ``file:line: message`` per look-up, each with its did-you-mean."""
    path = tmp_path / "typos.yaml"
    path.write_text(TYPOS)
    rc = cli.main(["check", "--descriptors", str(generated / "descriptors.binpb"), str(path)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert rc == 1, output
    assert "Traceback" not in output
    lines = [line for line in captured.err.splitlines() if line.startswith(str(path))]
    assert lines == [f"{path}:{line}" for line in TYPO_LINES], output


def _problems(catalog: Catalog, text: str) -> list[str]:
    try:
        compile_text(text, catalog)
    except ScenarioError as exc:
        return [str(p) for p in exc.problems]
    return []


def _scenario(method: str, reply: str = "", **keys: str) -> str:
    lines = ["scenario: t", "rules:", f"  - method: {method}"]
    if reply:
        lines.append(f"    reply: {reply}")
    lines.extend(f"    {k}: {v}" for k, v in keys.items())
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("method", "reply"),
    [
        # proto and JSON names, nested messages, repeated fields by index or loop variable
        (RESERVE, '{reservationId: "{{ request.order_id }}-{{ request.orderId }}-{{ request.sku }}"}'),
        (PLACE, '{customerId: "{{ request.lines[0].unit_price.currency_code }}"}'),
        (PLACE, "{customerId: \"{{ request.lines[0].unitPrice.currencyCode ~ request['customer_id'] }}\"}"),
        (PLACE, '{customerId: "{% for l in request.lines %}{{ l.unitPrice.units }}{% endfor %}"}'),
        (PLACE, "{customerId: \"{{ request.lines | map(attribute='sku') | join(',') }}\"}"),
        (PLACE, "{customerId: \"{{ request.lines[-1].sku if request.lines else '' }}\"}"),
        (PLACE, '{customerId: "{% set n = 0 %}{{ request.lines[n].sku }}"}'),
        ("shop.v1.Inventory/BulkUpdate", '{accepted: "{{ requests | length }}"}'),
        ("shop.v1.Inventory/BulkUpdate", '{accepted: "{{ requests[0].count + requests[-1].count }}"}'),
        ("shop.v1.Inventory/BulkUpdate", "{rejectedSkus: \"{{ requests | map(attribute='sku') | list }}\"}"),
        # below a map, a well-known type or a scalar nothing is known; methods and dynamic keys stop it
        (RESERVE, "{reservationId: \"{{ request.labels.anything }}{{ request.labels['x'] }}\"}"),
        (RESERVE, '{reservationId: "{{ request.hold_for }}"}'),
        (RESERVE, '{reservationId: "{{ request.sku.upper() ~ request.sku | lower }}"}'),
        (RESERVE, "{reservationId: \"{{ request.get('town', 'x') }}{{ request.keys() | list }}\"}"),
        (RESERVE, '{reservationId: "{% for k, v in request.items() %}{{ k }}{% endfor %}"}'),
        (RESERVE, "{reservationId: \"{% set f = 'sku' %}{{ request[f] }}\"}"),
        # names that shadow the request are not the request
        (RESERVE, "{reservationId: \"{% set request = {'town': 1} %}{{ request.town }}\"}"),
        (PLACE, "{customerId: \"{% for request in [{'town': 1}] %}{{ request.town }}{% endfor %}\"}"),
        (PLACE, '{customerId: "{% for l in request.lines %}{% set l = 1 %}{{ l.x }}{% endfor %}"}'),
        # other context variables are not messages
        (RESERVE, '{reservationId: "{{ metadata.town }}{{ session.id }}{{ index }}"}'),
    ],
)
def test_valid_templates_still_pass(catalog: Catalog, method: str, reply: str) -> None:
    assert _problems(catalog, _scenario(method, reply)) == []


def test_every_template_of_a_rule_is_checked(catalog: Catalog) -> None:
    """Replies of sequences, streams and each_request, status messages, headers and trailers."""
    text = textwrap.dedent(
        """\
        scenario: t
        rules:
          - method: shop.v1.Inventory/Reserve
            trailers: {x-a: "{{ request.skuu }}"}
            sequence:
              - reply: {reservationId: "{{ request.skuu }}"}
              - status: {code: NOT_FOUND, message: "{{ request.skuu }}"}
                headers: {x-b: "{{ request.skuu }}"}
          - method: shop.v1.Inventory/Watch
            stream:
              - reply: {sku: "{{ request.sku }}"}
          - method: shop.v1.Orders/Track
            each_request: {reply: {text: "{{ request.txt }}"}}
        """
    )
    problems = _problems(catalog, text)
    assert [p.split(": ", 2)[0:2] for p in problems] == [
        ["<admin>:4", "trailers.x-a"],
        ["<admin>:6", "sequence[0].reply.reservationId"],
        ["<admin>:7", "sequence[1].status.message"],
        ["<admin>:8", "sequence[1].headers.x-b"],
        ["<admin>:11", "stream[0].reply.sku"],
        ["<admin>:13", "each_request.reply.text"],
    ]
    assert 'shop.v1.WatchRequest has no field "sku" (did you mean "skus"?)' in problems[4]
    assert 'shop.v1.TrackRequest has no field "txt" (did you mean "text"?)' in problems[5]


def test_a_line_inside_a_long_template_is_named(catalog: Catalog) -> None:
    text = "scenario: t\nrules:\n  - method: shop.v1.Inventory/Reserve\n    reply:\n      reservationId: |\n"
    text += "        {{ request.sku }}\n        {{ request.skuu }}\n"
    assert _problems(catalog, text) == [
        '<admin>:5: reply.reservationId: request.skuu: shop.v1.ReserveRequest has no field "skuu" '
        '(did you mean "sku"?) (line 2)'
    ]


def test_session_rules_are_checked(catalog: Catalog) -> None:
    """Session rules (PutSessionRules text, and the plugin's rule dicts with their $location)."""
    with pytest.raises(ScenarioError) as info:
        compile_rules(
            [{"method": RESERVE, "reply": {"reservationId": "{{ request.skuu }}"}, "$location": "t.py:7"}],
            catalog,
            scenario="s",
            origin="<inline>",
            key_prefix="inline:",
        )
    assert str(info.value) == (
        't.py:7: reply.reservationId: request.skuu: shop.v1.ReserveRequest has no field "skuu" '
        '(did you mean "sku"?)'
    )


# -- over the wire ----------------------------------------------------------------------------------


@pytest.fixture
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    srv = VirtualServer(catalog, [], admin=True).start()
    yield srv
    srv.stop(0)


def _reserve(server: VirtualServer, scenario: str, sku: str = "A") -> str:
    spec = server.catalog.method(RESERVE)
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            spec.path,
            request_serializer=spec.input_class.SerializeToString,
            response_deserializer=spec.output_class.FromString,
        )
        reply = call(spec.input_class(sku=sku), metadata=[("x-virtsvc-scenario", scenario)], timeout=10)
    return str(reply.reservation_id)


def test_admin_put_scenario_refuses_unknown_fields(server: VirtualServer) -> None:
    text = _scenario(RESERVE, '{reservationId: "{{ request.skuu }}"}')
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            AdminClient(channel).call("PutScenario", text=text)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            '<admin>:4: reply.reservationId: request.skuu: shop.v1.ReserveRequest has no field "skuu" '
            '(did you mean "sku"?)'
        )
        assert list(AdminClient(channel).call("ListScenarios").scenarios) == []


def test_inline_rule_is_refused_at_the_test_line(server: VirtualServer) -> None:
    with VirtualService(server) as service:
        line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
        with pytest.raises(ScenarioError) as info:
            service.on(RESERVE).reply({"reservationId": "{{ request.skuu }}"})
        assert str(info.value).endswith(
            f"{Path(__file__).name}:{line}: reply.reservationId: request.skuu: shop.v1.ReserveRequest "
            'has no field "skuu" (did you mean "sku"?)'
        )
        assert service.rules == ()
        service.on(RESERVE).reply({"reservationId": "{{ request.sku }}"})  # a good one is still taken


def test_a_template_failing_at_run_time_is_logged_with_its_rule(server: VirtualServer) -> None:
    """What the check cannot know (here: text plus a number) still fails the call, logged with its rule."""
    text = _scenario(RESERVE, '{reservationId: "{{ request.sku + 1 }}"}')
    with grpc.insecure_channel(server.address) as channel:
        AdminClient(channel).call("PutScenario", text=text)
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as info:
        _reserve(server, "t")
    assert info.value.code() is grpc.StatusCode.INTERNAL
    failed = [e for e in logs if e["event"] == "template.failed"]
    assert len(failed) == 1, logs
    assert failed[0]["rule"] == "<admin>:3"
    assert failed[0]["method"] == RESERVE
    assert failed[0]["log_level"] == "warning"
    assert "reply.reservationId" in failed[0]["error"]


def test_a_request_without_fields(catalog: Catalog) -> None:
    assert _problems(
        catalog, _scenario("shop.v1.Inventory/Ping", "{}", trailers='{x: "{{ request.x }}"}')
    ) == ['<admin>:5: trailers.x: request.x: google.protobuf.Empty has no field "x"; it has no fields']


def test_python_scenarios_are_checked(
    tmp_path: Path, generated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.py"
    path.write_text(
        "from virtsvc import Scenario\n"
        'scenario = Scenario("typo")\n'
        'scenario.on("shop.v1.Inventory/Reserve").reply({"reservationId": "{{ request.skuu }}"})\n'
    )
    rc = cli.main(["check", "--descriptors", str(generated / "descriptors.binpb"), str(path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert (
        f'{path}:3: reply.reservationId: request.skuu: shop.v1.ReserveRequest has no field "skuu" '
        '(did you mean "sku"?)'
    ) in err.splitlines(), err
