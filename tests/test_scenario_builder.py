"""The Python ``Scenario`` builder: the YAML-shaped data it records, and scripts through the loader."""

from __future__ import annotations

import datetime
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest
from _protos_fixture import compile_catalog
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from virtsvc.contracts import Catalog
from virtsvc.errors import ScenarioError
from virtsvc.scenarios import Scenario, fail, status, step
from virtsvc.scenarios.latency import Fixed
from virtsvc.scenarios.loader import check_paths, compile_rules, compile_sources, load_sources
from virtsvc.scenarios.model import Fault, Location

HERE = __file__


def line() -> int:
    """The caller's line."""
    return sys._getframe(1).f_lineno


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    return compile_catalog(tmp_path_factory.mktemp("protos"))


def test_each_builder_method_records_yaml_shaped_data() -> None:
    s = Scenario("interop", version=1, description="d")
    s.on("shop.v1.Inventory/Reserve", when={"request": {"sku": "A"}}, times=2, priority=3).reply(
        {"reservation_id": "r-{{ request.sku }}"}, headers={"x-a": "1"}, trailers={"x-t": "2"}, delay="300ms"
    )
    s.on("shop.v1.Payments/Charge").fail(
        grpc.StatusCode.UNAVAILABLE, "later", [{"@type": "google.rpc.RetryInfo", "retryDelay": "1s"}]
    )
    s.on("shop.v1.Payments/Charge").sequence(
        [fail(14, "try later"), {"charge_id": "c-1"}, step({"charge_id": "c-2"}, delay=0.5)], after="cycle"
    )
    s.on("shop.v1.Inventory/Watch").stream([{"sku": "A"}, {"reply": {"sku": "B"}, "delay": "5ms"}], status=0)
    s.on("shop.v1.Orders/Track").each_request({"text": "echo"})
    s.on("shop.v1.Inventory/Ping").fault(Fault.RESET, delay=datetime.timedelta(milliseconds=20))
    s.on("shop.v1.Inventory/GetItem").reply()
    assert s.rules_data() == [
        {
            "method": "shop.v1.Inventory/Reserve",
            "when": {"request": {"sku": "A"}},
            "times": 2,
            "priority": 3,
            "reply": {"reservation_id": "r-{{ request.sku }}"},
            "headers": {"x-a": "1"},
            "trailers": {"x-t": "2"},
            "delay": "300ms",
        },
        {
            "method": "shop.v1.Payments/Charge",
            "status": {
                "code": "UNAVAILABLE",
                "message": "later",
                "details": [{"@type": "google.rpc.RetryInfo", "retryDelay": "1s"}],
            },
        },
        {
            "method": "shop.v1.Payments/Charge",
            "sequence": [
                {"status": {"code": "UNAVAILABLE", "message": "try later"}},
                {"reply": {"charge_id": "c-1"}},
                {"reply": {"charge_id": "c-2"}, "delay": 0.5},
            ],
            "after": "cycle",
        },
        {
            "method": "shop.v1.Inventory/Watch",
            "stream": [{"reply": {"sku": "A"}}, {"reply": {"sku": "B"}, "delay": "5ms"}],
            "status": {"code": "OK"},
        },
        {"method": "shop.v1.Orders/Track", "each_request": {"reply": {"text": "echo"}}},
        {"method": "shop.v1.Inventory/Ping", "fault": "reset", "delay": 0.02},
        {"method": "shop.v1.Inventory/GetItem", "reply": {}},
    ]
    json.dumps(s.rules_data())  # plain data: ready to send to a remote server


def test_status_codes_are_normalised_to_names() -> None:
    assert status(grpc.StatusCode.NOT_FOUND) == {"code": "NOT_FOUND"}
    assert status(14) == {"code": "UNAVAILABLE"}
    assert status(" unavailable ") == {"code": "UNAVAILABLE"}
    # Values that are no code are kept as written: validation reports them with the close names.
    assert status("UNAVAILBLE") == {"code": "UNAVAILBLE"}
    assert status(99) == {"code": 99}


def test_items_that_are_steps_and_items_that_are_bodies() -> None:
    s = Scenario("items")
    reply = error_details_pb2.ErrorInfo(reason="r")  # any message works as a body
    rule = s.on("shop.v1.Inventory/Watch").stream(
        [
            {"sku": "A"},  # not only step keys: a body
            {"status": "shipped", "id": 1},  # a body whose fields are named like step keys
            {"reply": {"status": "shipped"}},  # wrapped: the way to send such a body alone
            {"delay": "1ms", "fault": "reset"},  # only step keys: a step
            reply,
        ]
    )
    assert rule.data["stream"] == [
        {"reply": {"sku": "A"}},
        {"reply": {"status": "shipped", "id": 1}},
        {"reply": {"status": "shipped"}},
        {"delay": "1ms", "fault": "reset"},
        {"reply": {"reason": "r"}},
    ]


def test_messages_as_details_and_data_is_copied() -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=500_000_000))
    body: dict[str, Any] = {"sku": "A", "tags": ["x"]}
    s = Scenario("copies")
    rule = s.on("shop.v1.Inventory/GetItem").reply(body)
    body["tags"].append("changed later")
    assert rule.data["reply"] == {"sku": "A", "tags": ["x"]}
    assert status("UNAVAILABLE", details=[retry])["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.500s"}
    ]


def test_locations_are_the_users_lines() -> None:
    s = Scenario("where")
    scenario_line = line() - 1
    rule = s.on("shop.v1.Inventory/Ping").reply({})
    rule_line = line() - 1

    @s.handler("shop.v1.Orders/GetOrder", times=1)
    def get_order(request: Any, context: Any) -> dict[str, Any]:
        return {"order_id": request.order_id}

    handler_line = line() - 4
    assert s.location == Location(HERE, scenario_line)
    assert rule.location == Location(HERE, rule_line)
    assert s.rules[1].location == Location(HERE, handler_line)
    assert s.rules[1].data == {"method": "shop.v1.Orders/GetOrder", "times": 1, "handler": get_order}
    assert get_order.__name__ == "get_order"  # the decorator returns the function itself
    located = s.rules_data(locations=True)
    assert located[0]["$location"] == f"{HERE}:{rule_line}"
    assert "$location" not in s.rules_data()[0]
    with pytest.raises(ValueError, match=rf"the rule at {HERE}:{handler_line} has a Python handler"):
        s.rules_data(handlers=False)


def test_to_data_and_extends_by_object() -> None:
    base = Scenario("base")
    child = Scenario("child", version="v2", description="x", extends=base)
    child.on("shop.v1.Inventory/Ping").reply({})
    assert child.to_data() == {
        "scenario": "child",
        "version": "v2",
        "description": "x",
        "extends": "base",
        "rules": [{"method": "shop.v1.Inventory/Ping", "reply": {}}],
    }


def test_setting_the_same_answer_twice_is_refused() -> None:
    s = Scenario("twice")
    rule = s.on("shop.v1.Inventory/Ping").reply({})
    first = line() - 1
    with pytest.raises(ValueError, match=rf"this rule already has 'reply' \(set at {HERE}:{first}\)"):
        rule.reply({})
    # Different answers are recorded: validation reports the combination like in a YAML file.
    rule.fail("UNAVAILABLE")
    assert rule.data["status"] == {"code": "UNAVAILABLE"}


def test_builder_data_compiles_with_problems_at_the_builder_lines(cat: Catalog) -> None:
    s = Scenario("inline")
    s.on("shop.v1.Inventory/Reserv").reply({})
    bad_method = line() - 1
    s.on("shop.v1.Inventory/Reserve", times=0).fail("UNAVAILBLE", delay="25 ms")
    bad_values = line() - 1
    s.on("shop.v1.Inventory/GetItem").reply({"sku": "A"})
    with pytest.raises(ScenarioError) as info:
        compile_rules(s.rules_data(locations=True), cat, "shop", "<inline>", "inline:")
    assert [str(p) for p in info.value.problems] == [
        f'{HERE}:{bad_method}: unknown method "shop.v1.Inventory/Reserv"; did you mean '
        '"shop.v1.Inventory/Reserve"?',
        f'{HERE}:{bad_values}: delay: bad duration "25 ms"; use e.g. 25ms, 1.5s, 2m',
        f'{HERE}:{bad_values}: status.code: unknown status code "UNAVAILBLE"; did you mean "UNAVAILABLE"?',
        f"{HERE}:{bad_values}: times: expected a positive integer, got 0",
    ]


SCRIPT = """\
    import grpc
    from _shared import SKU
    from virtsvc.scenarios import Scenario, fail

    scenario = Scenario("interop", version=1, extends="base")
    scenario.on("shop.v1.Inventory/Reserve", when={"request": {"sku": SKU}}, times=1).reply(
        {"reservation_id": "r-1"}, delay="300ms"
    )
    scenario.on("shop.v1.Payments/Charge").sequence([fail("UNAVAILABLE"), {"charge_id": "c"}], after="fail")

    @scenario.handler("shop.v1.Orders/GetOrder")
    def get_order(request, context):
        return {"order_id": request.order_id}

    base = Scenario("base")
    base.on("shop.v1.Inventory/Ping").reply({})
    alias = base  # the same object twice is one scenario
    """


def test_scripts_compile_through_the_same_path(
    cat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("sc").mkdir()
    Path("sc/interop.py").write_text(textwrap.dedent(SCRIPT))
    Path("sc/_shared.py").write_text('SKU = "ABC-1"\n')  # a helper next to the script: skipped, importable
    interop, base = compile_sources(load_sources([Path("sc")]), cat)
    assert (interop.name, interop.version, interop.extends, interop.from_script) == (
        "interop",
        1,
        "base",
        True,
    )
    assert interop.location == Location("sc/interop.py", 5)
    reserve, charge, handler = interop.rules
    assert (
        reserve.location == Location("sc/interop.py", 6) and reserve.times == 1 and reserve.when is not None
    )
    assert reserve.steps[0].delay == Fixed(0.3)
    assert charge.after == "fail" and len(charge.steps) == 2
    assert charge.steps[0].status is not None and charge.steps[0].status.code is grpc.StatusCode.UNAVAILABLE
    assert handler.handler is not None and handler.handler.__name__ == "get_order" and handler.steps == ()
    assert handler.location == Location("sc/interop.py", 11)
    assert [r.key for r in interop.rules] == ["0", "1", "2"]
    assert base.from_script and [r.method for r in base.rules] == ["shop.v1.Inventory/Ping"]


def test_script_problems(cat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    files = {
        "bad.py": """\
            from virtsvc import Scenario

            s = Scenario("Bad Name")
            s.on("shop.v1.Inventory/Reserve", times="two").reply({"x": 1})
            """,
        "boom.py": """\
            from virtsvc import Scenario

            def helper():
                raise KeyError("nope")

            s = Scenario("boom")
            helper()
            """,
        "syntax.py": "x = (\n",
        "empty.py": "x = 1\n",
        "exits.py": "import sys\nsys.exit(3)\n",
    }
    for name, text in files.items():
        Path(name).write_text(textwrap.dedent(text))
    assert [str(p) for p in check_paths([Path(n) for n in files], cat)] == [
        'bad.py:3: scenario: bad scenario name "Bad Name"; a name matches [a-z0-9][a-z0-9._-]* '
        '(e.g. "bad-name")',
        'bad.py:4: reply.x: unknown field "x" of shop.v1.ReserveResponse; its fields are reservation_id, '
        "expires_at, qty_reserved",
        'bad.py:4: times: expected a positive integer, got "two"',
        "boom.py:4: the script raised KeyError: 'nope'",
        'empty.py: the script defines no Scenario at module level (e.g. scenario = Scenario("name")); name '
        "helper modules _*.py so that a directory load skips them",
        "exits.py:2: the script raised SystemExit: 3",
        "syntax.py:1: SyntaxError: '(' was never closed",
    ]
