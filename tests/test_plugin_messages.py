"""What the pytest plugin tells its user (issue 12): located near misses in both modes, set-up errors once,
and messages that fit where they appear. Inner projects run through pytester, as in test_plugin.py."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_plugin import PROTOS, SCENARIO, line_of, project

from virtsvc import _text
from virtsvc.server import VirtualServer

pytest_plugins = ["pytester"]

NEAR_MISS_TEST = """\
import grpc
import pytest


def test_near_miss(virtual_service, rpc):
    virtual_service.on("shop.v1.Inventory/GetItem", when={"request": {"sku": "A"}}).reply({"sku": "A"})
    with pytest.raises(grpc.RpcError):
        rpc("shop.v1.Inventory/GetItem", sku="B")
"""


@pytest.mark.parametrize("mode", ["in-process", "sidecar"])
def test_near_miss_names_the_line_of_the_inline_rule(
    pytester: pytest.Pytester, mode: str, request: pytest.FixtureRequest
) -> None:
    project(pytester)
    test_file = pytester.makepyfile(test_near=NEAR_MISS_TEST)
    line = line_of(test_file, "virtual_service.on(")
    assert line == 6  # not line 2, where the rule sits in the JSON text sent to a sidecar
    args = []
    if mode == "sidecar":
        sidecar: VirtualServer = request.getfixturevalue("sidecar")
        args = ["--virtsvc-address", sidecar.address]
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "virtsvc: a call to shop.v1.Inventory/GetItem matched no rule (answered UNIMPLEMENTED):",
            '  no rule matched shop.v1.Inventory/GetItem in session "pytest-*"',
            f"    closest: rule at test_near.py:{line} (0 of 1 conditions held): "
            'request.sku: expected "A", got "B"',
        ]
    )
    assert "test_near.py:2" not in result.stdout.str()


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[VirtualServer]:
    from virtsvc.contracts import load_catalog
    from virtsvc.scenarios import load_scenarios

    (tmp_path / "shop.yaml").write_text(SCENARIO)
    catalog = load_catalog(PROTOS)
    server = VirtualServer(catalog, load_scenarios([tmp_path / "shop.yaml"], catalog), admin=True).start()
    yield server
    server.stop(0)


BAD_SCENARIO = """\
scenario: broken
rules:
  - method: shop.v1.Inventory/Reserv
    reply: {}
  - method: shop.v1.Inventory/Reserve
    replly: {}
"""

THREE_TESTS = """\
def test_one(virtual_service):
    pass


def test_two(virtual_service):
    pass


def test_three(virtsvc_server):
    pass
"""


def fresh_protos(pytester: pytest.Pytester) -> None:
    """The example protos with a comment no cache has seen: the plugin compiles them (and logs it)."""
    protos = pytester.path / "protos"
    if not protos.exists():
        shutil.copytree(PROTOS, protos)
    first = sorted(protos.rglob("*.proto"))[0]
    first.write_text(first.read_text() + f"\n// {uuid.uuid4().hex}\n")


def test_a_server_that_does_not_start_is_reported_once(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makeini(
        "[pytest]\nvirtsvc_protos = protos\nvirtsvc_scenarios = scenarios\n"
        "asyncio_default_fixture_loop_scope = function\n"
    )
    fresh_protos(pytester)
    (pytester.path / "scenarios" / "broken.yaml").write_text(BAD_SCENARIO)
    pytester.makepyfile(test_setup=THREE_TESTS)
    result = pytester.runpytest("-rA")
    result.assert_outcomes(errors=3)
    out = result.stdout.str()
    # Each problem once (their lines are the loader's business, tested with it).
    problem = 'unknown rule key "replly"; did you mean "reply"?'
    other = (
        'broken.yaml:3: unknown method "shop.v1.Inventory/Reserv"; did you mean "shop.v1.Inventory/Reserve"?'
    )
    assert out.count(problem) == 1, out
    assert out.count(other) == 1, out
    assert "During handling of the above exception" not in out
    pointer = "virtsvc: the virtual server did not start: see the error at setup of test_setup.py::test_one"
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_one _*",
            "virtsvc: the virtual server did not start:",
            f"*{other}",
            f"*{problem}",
            "*_ ERROR at setup of test_two _*",
            pointer,
            "*_ ERROR at setup of test_three _*",
            pointer,
        ]
    )
    assert out.count(pointer) == 2
    assert "descriptors.compiled" not in out

    # Started: nor does the compile log land in a passing test's captured output.
    (pytester.path / "scenarios" / "broken.yaml").unlink()
    fresh_protos(pytester)
    result = pytester.runpytest("-rA")
    result.assert_outcomes(passed=3)
    assert "descriptors.compiled" not in result.stdout.str()


def test_no_scenario_selected_says_what_to_do_in_the_test(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makepyfile(
        test_none="""
        import grpc
        import pytest

        def test_no_scenario(virtual_service, rpc):
            with pytest.raises(grpc.RpcError):
                rpc("shop.v1.Inventory/Reserve", sku="A")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "virtsvc: a call to shop.v1.Inventory/Reserve matched no rule (answered FAILED_PRECONDITION):",
            "  no scenario selected for this test's session: call virtual_service.use(NAME), declare inline "
            "rules with virtual_service.on(METHOD), or set virtsvc_default_scenario; "
            "loaded scenarios: happy, other",
        ]
    )
    assert "start the server" not in result.stdout.str()


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("virtsvc_protos = protoz", 'virtsvc: virtsvc_protos = "protoz": no such directory'),
        (
            "virtsvc_scenarios = scenarioz",
            'virtsvc: virtsvc_scenarios = "scenarioz": no such file or directory',
        ),
        (
            "virtsvc_descriptors = nothing.binpb",
            'virtsvc: virtsvc_descriptors = "nothing.binpb": no such file',
        ),
    ],
)
def test_a_path_error_names_the_setting(pytester: pytest.Pytester, ini: str, message: str) -> None:
    lines = [f"virtsvc_protos = {PROTOS}", "virtsvc_scenarios = scenarios"]
    key = ini.split(" = ")[0]
    lines = [line for line in lines if not line.startswith(key)] + [ini]
    if key == "virtsvc_descriptors":
        lines = [line for line in lines if not line.startswith("virtsvc_protos")]
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n" + "\n".join(lines) + "\n")
    (pytester.path / "scenarios").mkdir()
    (pytester.path / "scenarios" / "shop.yaml").write_text(SCENARIO)
    pytester.makepyfile(test_paths="def test_it(virtual_service):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])


INTEROP = """\
---
scenario: interop
rules:
  - method: shop.v1.Inventory/Ping
    reply: {}
"""


def test_unknown_scenario_is_a_virtsvc_error_without_unrelated_suggestions(pytester: pytest.Pytester) -> None:
    project(pytester, scenario=SCENARIO + INTEROP)
    pytester.makepyfile(
        test_use="""
        import pytest
        from virtsvc.errors import ConfigError, VirtsvcError

        def test_nope(virtual_service):
            with pytest.raises(ConfigError) as raised:
                virtual_service.use("nope")
            assert isinstance(raised.value, VirtsvcError)
            assert str(raised.value) == 'unknown scenario "nope"; loaded scenarios: happy, interop, other'

        def test_typo(virtual_service):
            with pytest.raises(ConfigError, match='unknown scenario "hapy"; did you mean "happy"\\\\?'):
                virtual_service.use("hapy")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)


def test_did_you_mean_offers_nothing_unrelated() -> None:
    assert _text.closest("nope", ["interop", "happy", "other"]) == []
    assert _text.did_you_mean("nope", ["interop"]) == ""
    assert _text.closest("hapy", ["interop", "happy", "other"]) == ["happy"]
