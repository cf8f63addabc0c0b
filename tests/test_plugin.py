"""The pytest plugin, driven through pytester: inner projects that use ``virtual_service``."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtsvc.server import VirtualServer

PROTOS = Path(__file__).resolve().parents[1] / "protos"

SCENARIO = """\
scenario: happy
rules:
  - method: shop.v1.Inventory/Reserve
    reply:
      reservation_id: from-scenario
      qty_reserved: 1
  - method: shop.v1.Inventory/GetItem
    when:
      request:
        sku: ABC-1
    reply:
      sku: ABC-1
      title: Widget
---
scenario: other
rules:
  - method: shop.v1.Inventory/Reserve
    reply:
      reservation_id: from-other
"""

# Inner tests call methods through `rpc(method, **fields)`: messages from the server's catalog, calls on
# `virtual_service.channel()` (so they carry the session's metadata).
CONFTEST = """\
import pytest

KINDS = {
    "unary": "unary_unary",
    "server_streaming": "unary_stream",
    "client_streaming": "stream_unary",
    "bidi_streaming": "stream_stream",
}


@pytest.fixture
def rpc(virtsvc_server, virtual_service):
    channel = virtual_service.channel()

    def rpc(method, **fields):
        spec = virtsvc_server.catalog.method(method)
        multi = getattr(channel, KINDS[spec.kind])(
            spec.path,
            request_serializer=spec.input_class.SerializeToString,
            response_deserializer=spec.output_class.FromString,
        )
        response = multi(spec.input_class(**fields), timeout=10)
        return list(response) if spec.server_streaming else response

    return rpc
"""


def project(pytester: pytest.Pytester, ini: str = "", scenario: str = SCENARIO) -> None:
    pytester.makeini(
        f"""
        [pytest]
        virtsvc_protos = {PROTOS}
        virtsvc_scenarios = scenarios
        asyncio_mode = strict
        asyncio_default_fixture_loop_scope = function
        {ini}
        """
    )
    (pytester.path / "scenarios").mkdir()
    (pytester.path / "scenarios" / "shop.yaml").write_text(scenario)
    pytester.makeconftest(CONFTEST)


def line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` holding ``text`` (for located messages)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


def test_scenario_inline_rules_and_journal(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makepyfile(
        test_inner="""
        import grpc
        import pytest
        from grpc_status import rpc_status

        RESERVE = "shop.v1.Inventory/Reserve"

        def test_use_scenario(virtual_service, rpc):
            virtual_service.use("happy")
            assert dict(virtual_service.metadata) == {
                "x-virtsvc-session": virtual_service.session, "x-virtsvc-scenario": "happy"}
            assert rpc(RESERVE, sku="A", qty=2).reservation_id == "from-scenario"
            assert rpc("shop.v1.Inventory/GetItem", sku="ABC-1").title == "Widget"
            virtual_service.assert_called(RESERVE, times=1)
            [call] = virtual_service.calls(RESERVE)
            assert call.method == RESERVE and call.code is grpc.StatusCode.OK
            assert call.request == {"sku": "A", "qty": 2} and call.requests == [call.request]
            assert call.reply == {"reservationId": "from-scenario", "qtyReserved": 1}
            assert call.metadata["x-virtsvc-scenario"] == "happy"

        def test_inline_rules_without_use(virtual_service, rpc):
            assert dict(virtual_service.metadata) == {"x-virtsvc-session": virtual_service.session}
            virtual_service.on(RESERVE).reply({"reservation_id": "inline"})
            assert rpc(RESERVE, sku="A").reservation_id == "inline"

        def test_inline_rules_win_over_the_scenario(virtual_service, rpc):
            virtual_service.use("happy")
            virtual_service.on(RESERVE, when={"request": {"sku": "HOT"}}).reply({"reservation_id": "hot"})
            assert rpc(RESERVE, sku="HOT").reservation_id == "hot"
            assert rpc(RESERVE, sku="COLD").reservation_id == "from-scenario"

        def test_rules_follow_use(virtual_service, rpc):
            virtual_service.on(RESERVE).reply({"reservation_id": "early"})
            virtual_service.use("other")
            assert rpc(RESERVE, sku="A").reservation_id == "early"
            assert dict(virtual_service.metadata)["x-virtsvc-scenario"] == "other"

        def test_fail_with_string_code_and_details(virtual_service, rpc):
            virtual_service.on(RESERVE).fail(
                "resource_exhausted", "only 1 left",
                details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                          "reason": "OUT_OF_STOCK", "domain": "shop.example"}],
            )
            with pytest.raises(grpc.RpcError) as raised:
                rpc(RESERVE, sku="A")
            assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert raised.value.details() == "only 1 left"
            status = rpc_status.from_call(raised.value)
            assert status.details[0].type_url.endswith("google.rpc.ErrorInfo")
            [call] = virtual_service.calls()
            assert call.code is grpc.StatusCode.RESOURCE_EXHAUSTED and call.reply is None

        def test_sequence(virtual_service, rpc):
            virtual_service.on(RESERVE).sequence(
                [{"reservation_id": "r1"},
                 {"status": "UNAVAILABLE"},
                 {"reply": {"reservation_id": "r3"}, "delay": "20ms"}],
            )
            assert rpc(RESERVE).reservation_id == "r1"
            with pytest.raises(grpc.RpcError) as raised:
                rpc(RESERVE)
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert rpc(RESERVE).reservation_id == "r3"
            assert rpc(RESERVE).reservation_id == "r3"  # repeat_last
            assert [c.code.name for c in virtual_service.calls()] == ["OK", "UNAVAILABLE", "OK", "OK"]

        def test_stream(virtual_service, rpc):
            virtual_service.on("shop.v1.Inventory/Watch").stream(
                [{"sku": "A", "on_hand": 3}, {"reply": {"sku": "B"}, "delay": 0.01}], status="OK")
            assert [e.sku for e in rpc("shop.v1.Inventory/Watch", skus=["A", "B"])] == ["A", "B"]
            [call] = virtual_service.calls("shop.v1.Inventory/Watch")
            assert call.replies == [{"sku": "A", "onHand": "3"}, {"sku": "B"}]

        def test_handler(virtual_service, rpc):
            def reserve(request, context):
                return {"reservation_id": "h-" + request.sku, "qty_reserved": request.qty}

            virtual_service.on(RESERVE, times=1).handler(reserve)
            reply = rpc(RESERVE, sku="X", qty=4)
            assert (reply.reservation_id, reply.qty_reserved) == ("h-X", 4)

        def test_assert_called_explains(virtual_service, rpc):
            virtual_service.use("happy")
            rpc(RESERVE, sku="A")
            virtual_service.assert_called(RESERVE)
            with pytest.raises(AssertionError, match=r"to be called 2 times, but it was called 1 time; "
                               r"calls in this session: shop.v1.Inventory/Reserve \\(1\\)"):
                virtual_service.assert_called(RESERVE, times=2)
            with pytest.raises(AssertionError, match="called at least once, but it was called 0 times"):
                virtual_service.assert_called("shop.v1.Inventory/GetItem")
            with pytest.raises(ValueError, match='did you mean "shop.v1.Inventory/Reserve"'):
                virtual_service.calls("shop.v1.Inventory/Reserv")

        def test_unknown_scenario(virtual_service):
            from virtsvc.errors import ConfigError

            with pytest.raises(ConfigError, match='unknown scenario "hapy"; did you mean "happy"'):
                virtual_service.use("hapy")

        def test_sessions_are_fresh(virtual_service, rpc):
            virtual_service.use("happy")
            assert virtual_service.calls() == []
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=11)


def test_unmatched_call_fails_the_test_with_the_near_miss(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makepyfile(
        test_unmatched="""
        import grpc
        import pytest

        def test_wrong_sku(virtual_service, rpc):
            virtual_service.use("happy")
            with pytest.raises(grpc.RpcError):
                rpc("shop.v1.Inventory/GetItem", sku="XYZ-9")

        def test_no_scenario_and_no_rules(virtual_service, rpc):
            with pytest.raises(grpc.RpcError):
                rpc("shop.v1.Inventory/Reserve", sku="A")

        @pytest.fixture
        def late_caller(virtual_service, rpc):
            yield
            with pytest.raises(grpc.RpcError):
                rpc("shop.v1.Inventory/Ping")

        def test_call_after_the_test_body(virtual_service, late_caller):
            virtual_service.use("happy")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=2, passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            # A call made after the test body (here by a fixture's teardown) is an error at teardown.
            "*_ ERROR at teardown of test_call_after_the_test_body _*",
            "virtsvc: a call to shop.v1.Inventory/Ping matched no rule (answered UNIMPLEMENTED):",
            '*no rule for shop.v1.Inventory/Ping in scenario "happy"*; its rules cover: *',
            "*_ test_wrong_sku _*",
            "virtsvc: a call to shop.v1.Inventory/GetItem matched no rule (answered UNIMPLEMENTED):",
            '*no rule matched shop.v1.Inventory/GetItem in scenario "happy", session "pytest-*',
            "*closest: rule at *shop.yaml:* (0 of 1 conditions held): "
            'request.sku: expected "ABC-1", got "XYZ-9"',
            "(to allow unmatched calls, pass --virtsvc-no-fail-unmatched or set "
            "virtsvc_fail_on_unmatched = false)",
            "*_ test_no_scenario_and_no_rules _*",
            "*a call to shop.v1.Inventory/Reserve matched no rule (answered FAILED_PRECONDITION)*",
            "*no scenario selected for this test's session: call virtual_service.use(NAME)*",
        ]
    )
    assert "pytest_plugin.py" not in result.stdout.str()  # the message, not a traceback into the plugin


def test_unused_times_fails_the_test(pytester: pytest.Pytester) -> None:
    project(pytester)
    test_file = pytester.makepyfile(
        test_times="""
        def test_reserve_twice(virtual_service, rpc):
            virtual_service.on("shop.v1.Inventory/Reserve", times=2).reply({"reservation_id": "r"})
            rpc("shop.v1.Inventory/Reserve", sku="A")

        def test_unfinished_rule(virtual_service):
            virtual_service.on("shop.v1.Inventory/GetItem")

        def test_invalid_rule(virtual_service):
            virtual_service.on("shop.v1.Inventory/Reserve").reply({"reservation": "x"}, delay="soon")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=3)
    times_line = line_of(test_file, "times=2")
    unfinished_line = line_of(test_file, '"shop.v1.Inventory/GetItem"')
    invalid_line = line_of(test_file, 'delay="soon"')
    result.stdout.fnmatch_lines(
        [
            f"virtsvc: inline rule at test_times.py:{times_line} for shop.v1.Inventory/Reserve was declared "
            "times=2 but answered 1 call",
            f"virtsvc: inline rule at test_times.py:{unfinished_line} for shop.v1.Inventory/GetItem has no "
            "answer: finish it with *",
            # An invalid rule fails where it is written, with every problem located there.
            f'E *ScenarioError: test_times.py:{invalid_line}: delay: bad duration "soon"*',
            f'E *test_times.py:{invalid_line}: reply.reservation: unknown field "reservation"*',
            f"test_times.py:{invalid_line}: ScenarioError",
        ]
    )


def test_failing_test_shows_unmatched_calls_in_its_report(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makepyfile(
        test_failing="""
        def test_checkout(virtual_service, rpc):
            virtual_service.use("happy")
            rpc("shop.v1.Inventory/GetItem", sku="NOPE")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)  # the test's own failure, no second error at teardown
    result.stdout.fnmatch_lines(
        ["*Captured virtsvc call*", "a call to shop.v1.Inventory/GetItem matched no rule*"]
    )


@pytest.mark.parametrize("how", ["flag", "ini"])
def test_unmatched_calls_can_be_allowed(pytester: pytest.Pytester, how: str) -> None:
    project(pytester, ini="virtsvc_fail_on_unmatched = false" if how == "ini" else "")
    pytester.makepyfile(
        test_allowed="""
        import grpc
        import pytest

        def test_probe_unimplemented(virtual_service, rpc):
            virtual_service.use("happy")
            with pytest.raises(grpc.RpcError) as raised:
                rpc("shop.v1.Inventory/Ping")
            assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert not virtual_service.calls()[0].matched
        """
    )
    result = pytester.runpytest(*(["--virtsvc-no-fail-unmatched"] if how == "flag" else []))
    result.assert_outcomes(passed=1)


def test_settings_from_tool_virtsvc(pytester: pytest.Pytester) -> None:
    """No ini keys: [tool.virtsvc] supplies protos, one scenarios path and the default scenario."""
    pytester.makepyprojecttoml(
        f"""
        [tool.pytest.ini_options]
        asyncio_default_fixture_loop_scope = "function"

        [tool.virtsvc]
        protos = "{PROTOS.as_posix()}"
        scenarios = "scen"
        default_scenario = "happy"
        """
    )
    (pytester.path / "scen").mkdir()
    (pytester.path / "scen" / "shop.yaml").write_text(SCENARIO)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_default="""
        def test_default_scenario(virtual_service, rpc):
            assert rpc("shop.v1.Inventory/Reserve", sku="A").reservation_id == "from-scenario"

        def test_inline_rules_live_under_the_default(virtual_service, rpc):
            virtual_service.on("shop.v1.Inventory/Reserve").reply({"reservation_id": "inline"})
            assert rpc("shop.v1.Inventory/Reserve", sku="A").reservation_id == "inline"
            assert virtual_service.calls()[0].scenario == "happy"
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)


def test_descriptor_set_instead_of_protos(pytester: pytest.Pytester) -> None:
    from virtsvc.contracts import protoc as _protoc

    (pytester.path / "shop.binpb").write_bytes(_protoc.compile_descriptor_set(PROTOS))
    pytester.makeini(
        """
        [pytest]
        virtsvc_descriptors = shop.binpb
        asyncio_default_fixture_loop_scope = function
        """
    )
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_descriptors="""
        def test_inline(virtual_service, rpc):
            virtual_service.on("shop.v1.Inventory/GetItem").reply({"sku": "A", "on_hand": 7})
            assert rpc("shop.v1.Inventory/GetItem", sku="A").on_hand == 7
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def test_nothing_to_serve_is_reported_without_a_traceback(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_plain="""
        def test_plain():
            assert True

        def test_uses_it(virtual_service):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["virtsvc: nothing to serve: set virtsvc_protos*"])


def test_bad_sidecar_address_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_plain="def test_plain(): pass")
    result = pytester.runpytest("--virtsvc-address", "localhost")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--virtsvc-address: expected HOST:PORT*"])


XDIST_TESTS = """
import pytest

@pytest.mark.parametrize("n", range(8))
def test_same_rules_in_parallel(virtual_service, rpc, n):
    virtual_service.use("happy")
    virtual_service.on("shop.v1.Inventory/Reserve", times=2).sequence(
        [{"reservation_id": "first"}, {"reservation_id": "second"}])
    # Every test sees its sequence from the start, and only its own calls.
    assert rpc("shop.v1.Inventory/Reserve", sku=str(n)).reservation_id == "first"
    assert rpc("shop.v1.Inventory/Reserve", sku=str(n)).reservation_id == "second"
    assert rpc("shop.v1.Inventory/Reserve", sku=str(n)).reservation_id == "from-scenario"
    assert [c.request["sku"] for c in virtual_service.calls()] == [str(n)] * 3
"""


def test_xdist_workers_each_serve_their_own(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makepyfile(test_parallel=XDIST_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", timeout=60)
    result.assert_outcomes(passed=8)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[VirtualServer]:
    if importlib.util.find_spec("virtsvc.admin") is None:
        pytest.skip("virtsvc.admin (the admin API the plugin drives a sidecar through) does not exist yet")
    from virtsvc.contracts import load_catalog
    from virtsvc.scenarios import load_scenarios

    (tmp_path / "shop.yaml").write_text(SCENARIO)
    catalog = load_catalog(PROTOS)
    server = VirtualServer(catalog, load_scenarios([tmp_path / "shop.yaml"], catalog), admin=True).start()
    yield server
    server.stop(0)


def test_external_sidecar_shared_by_xdist_workers(pytester: pytest.Pytester, sidecar: VirtualServer) -> None:
    project(pytester)
    pytester.makepyfile(test_parallel=XDIST_TESTS)
    pytester.makepyfile(
        test_remote="""
        import grpc
        import pytest

        RESERVE = "shop.v1.Inventory/Reserve"

        def test_builders_work_remotely(virtual_service, rpc):
            gone = virtual_service.on(RESERVE, when={"request": {"sku": "X"}})
            gone.fail(grpc.StatusCode.NOT_FOUND, "gone")
            virtual_service.use("happy")
            virtual_service.on("shop.v1.Inventory/Watch").stream([{"sku": "A"}, {"sku": "B", "on_hand": 2}])
            with pytest.raises(grpc.RpcError) as raised:
                rpc(RESERVE, sku="X")
            assert raised.value.code() is grpc.StatusCode.NOT_FOUND
            assert rpc(RESERVE, sku="Y", qty=3).reservation_id == "from-scenario"
            assert [e.sku for e in rpc("shop.v1.Inventory/Watch")] == ["A", "B"]
            virtual_service.assert_called(RESERVE, times=2)
            calls = virtual_service.calls(RESERVE)
            assert calls[1].request == {"sku": "Y", "qty": 3}
            assert calls[1].reply == {"reservationId": "from-scenario", "qtyReserved": 1}
            [watch] = virtual_service.calls("shop.v1.Inventory/Watch")
            assert watch.replies[1] == {"sku": "B", "onHand": "2"}

        def test_handler_needs_the_in_process_server(virtual_service):
            with pytest.raises(Exception, match=r"\\.handler\\(\\) runs a Python function inside"):
                virtual_service.on(RESERVE).handler(lambda request, context: {})

        def test_remote_unmatched_and_times(virtual_service, rpc):
            virtual_service.on(RESERVE, times=3).reply({"reservation_id": "r"})
            rpc(RESERVE)
            with pytest.raises(grpc.RpcError):
                rpc("shop.v1.Inventory/GetItem", sku="A")
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--virtsvc-address", sidecar.address, timeout=60)
    result.assert_outcomes(passed=10, failed=1)
    result.stdout.fnmatch_lines(
        [
            "virtsvc: 2 problems in this test's session:",
            "- a call to shop.v1.Inventory/GetItem matched no rule (answered UNIMPLEMENTED):",
            '*no rule for shop.v1.Inventory/GetItem in session "pytest-*',
            "- inline rule at test_remote.py:* for shop.v1.Inventory/Reserve was declared times=3 "
            "but answered 1 call",
        ]
    )
    # Every test's session was dropped at teardown: no state is left behind on the shared server; its
    # journal stays, each entry labelled with its test's node id, for a report at the end of the run.
    assert len(sidecar.store) == 0
    labels = {e.label for e in sidecar.journal.entries()}
    assert "test_remote.py::test_remote_unmatched_and_times" in labels
    assert {f"test_parallel.py::test_same_rules_in_parallel[{n}]" for n in range(8)} <= labels
    assert None not in labels


def test_asyncio_tests_with_aio_channel(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makepyfile(
        test_async="""
        import grpc
        import pytest

        def method(server, channel, name):
            spec = server.catalog.method(name)
            kind = {"unary": "unary_unary", "server_streaming": "unary_stream",
                    "client_streaming": "stream_unary", "bidi_streaming": "stream_stream"}[spec.kind]
            return spec.input_class, getattr(channel, kind)(
                spec.path, request_serializer=spec.input_class.SerializeToString,
                response_deserializer=spec.output_class.FromString)

        @pytest.mark.asyncio
        async def test_aio(virtual_service, virtsvc_server):
            virtual_service.use("happy")
            virtual_service.on("shop.v1.Inventory/Watch").stream([{"sku": "A"}, {"sku": "B"}])
            virtual_service.on("shop.v1.Inventory/BulkUpdate").reply({"accepted": 2})
            virtual_service.on("shop.v1.Orders/Track").each_request({"order_id": "o-1", "text": "seen"})
            channel = virtual_service.aio_channel()

            request, reserve = method(virtsvc_server, channel, "shop.v1.Inventory/Reserve")
            assert (await reserve(request(sku="A"), timeout=10)).reservation_id == "from-scenario"

            request, watch = method(virtsvc_server, channel, "shop.v1.Inventory/Watch")
            assert [e.sku async for e in watch(request(), timeout=10)] == ["A", "B"]

            request, bulk = method(virtsvc_server, channel, "shop.v1.Inventory/BulkUpdate")
            reply = await bulk(iter([request(sku="A", count=1), request(sku="B", count=2)]), timeout=10)
            assert reply.accepted == 2

            request, track = method(virtsvc_server, channel, "shop.v1.Orders/Track")
            updates = [u.text async for u in track(iter([request(order_id="o-1"), request(order_id="o-1")]))]
            assert updates == ["seen", "seen"]
            assert [c.method.rpartition("/")[2] for c in virtual_service.calls()] == [
                "Reserve", "Watch", "BulkUpdate", "Track"]
            assert len(virtual_service.calls()[2].requests) == 2
        """
    )
    result = pytester.runpytest_subprocess(timeout=60)
    result.assert_outcomes(passed=1)


def test_projects_without_virtsvc_are_untouched(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.virtsvc]
        protos = "does-not-exist"
        """
    )
    pytester.makepyfile(test_plain="def test_plain(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_virtual_service_outside_pytest() -> None:
    """The helper object works on its own: a ``with`` block verifies the session and drops it."""
    import grpc

    from virtsvc import serve_in_process
    from virtsvc.testing import VirtualService

    with serve_in_process(protos=PROTOS) as server:
        spec = server.catalog.method("shop.v1.Inventory/Reserve")
        with VirtualService(server) as service:
            service.on(spec.full_name).reply({"reservation_id": "r-1"}, delay="1ms")
            channel = service.channel()
            reserve = channel.unary_unary(
                spec.path,
                request_serializer=spec.input_class.SerializeToString,
                response_deserializer=spec.output_class.FromString,
            )
            assert reserve(spec.input_class(sku="A"), timeout=10).reservation_id == "r-1"
            service.assert_called(spec.full_name, times=1)
        assert len(server.store) == 0 and len(server.journal) == 0

        # No scenario and no rules: the call is unmatched, and leaving the block says so.
        ping = server.catalog.method("shop.v1.Inventory/Ping")
        service = VirtualService(server)
        with pytest.raises(grpc.RpcError):
            service.channel().unary_unary(ping.path)(b"", timeout=10)
        with pytest.raises(AssertionError, match=r"matched no rule(.|\n)*no scenario selected"):
            service.__exit__(None, None, None)
        assert len(server.store) == 0 and len(server.journal) == 0
