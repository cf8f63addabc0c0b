"""Issue 12, defects 3, 6, 7 and 8: admin refusals, one naming in the journal, keepalive, CLI lines.

Real servers on loopback and real grpc clients; the `virtsvc` command line as a subprocess.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from helpers import fails

from virtsvc.admin import AdminClient
from virtsvc.cli import _scenario_paths, _serve_options, build_parser
from virtsvc.config import load_settings
from virtsvc.contracts import Catalog
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.server import ServeOptions, VirtualServer

ROOT = Path(__file__).resolve().parent.parent
RESERVE = "shop.v1.Inventory/Reserve"

SHOP = """\
scenario: shop
version: 1
rules:
  - method: shop.v1.Inventory/Reserve
    reply: {reservation_id: r-1, qty_reserved: 2}
"""

PYTHON_SCENARIO = """\
import virtsvc
from virtsvc import Scenario

scenario = Scenario("interop", version=1)
scenario.on("shop.v1.Inventory/Ping").reply({})
"""


@pytest.fixture
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    srv = VirtualServer(catalog, [], admin=True).start()
    yield srv
    srv.stop(0)


@pytest.fixture
def client(server: VirtualServer) -> Iterator[AdminClient]:
    with grpc.insecure_channel(server.address) as channel:
        yield AdminClient(channel)


def _reserve(catalog: Catalog, address: str, scenario: str, session: str = "t") -> Any:
    spec = catalog.method(RESERVE)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            spec.path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=spec.output_class.FromString,
        )
        return call(
            spec.input_class(sku="A-1", qty=1),
            metadata=[("x-virtsvc-scenario", scenario), ("x-virtsvc-session", session)],
            timeout=5,
        )


# -- 3: admin refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        PYTHON_SCENARIO,
        # no virtsvc import, but not YAML either (a decorator, a def)
        "@scenario.handler('shop.v1.Inventory/Reserve')\ndef reserve(request, context):\n    return {}\n",
    ],
)
def test_put_scenario_refuses_python_saying_local_paths_only(client: AdminClient, text: str) -> None:
    error = fails(client.call, "PutScenario", text=text)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Python scenarios are accepted only from local paths" in error.details()
    assert "syntax" not in error.details().lower()  # not a YAML syntax error


def test_put_scenario_yaml_mistakes_are_still_yaml_errors(client: AdminClient) -> None:
    # `key: value` lines parse as Python annotations: they must not pass for a Python script
    error = fails(client.call, "PutScenario", text="scenario: shop\nrules: 3\n")
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Python" not in error.details() and error.details().startswith("<admin>:")


def test_reset_session_without_a_scenario_is_refused(
    client: AdminClient, server: VirtualServer, catalog: Catalog
) -> None:
    client.call("PutScenario", text=SHOP)
    _reserve(catalog, server.address, "shop", session="t1")
    error = fails(client.call, "ResetSession", session="t1")
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == 'give the scenario whose session "t1" to reset; loaded scenarios: shop'
    assert len(client.call("GetJournal", scenario="shop", session="t1").entries) == 1  # untouched
    assert client.call("ResetSession", scenario="shop", session="t1").existed is True
    # a session of session rules only lives under the empty scenario: that one is reset
    client.call(
        "PutSessionRules", scenario="", session="r", text="- method: shop.v1.Inventory/Ping\n  reply: {}\n"
    )
    assert client.call("ResetSession", session="r").existed is True


# -- 6: one naming in the journal ----------------------------------------------------------------------


def test_journal_speaks_proto3_json_with_numbers_as_numbers(
    client: AdminClient, server: VirtualServer, catalog: Catalog
) -> None:
    client.call("PutScenario", text=SHOP)
    _reserve(catalog, server.address, "shop", session="j")
    (entry,) = client.call("GetJournal", scenario="shop", session="j").entries
    shown = json_format.MessageToDict(entry)  # what grpcurl prints
    assert shown["scenarioVersion"] == 1
    assert shown["reply"] == {"reservationId": "r-1", "qtyReserved": 2}
    assert shown["request"] == {"sku": "A-1", "qty": 1}
    # in-process readers (the plugin's call records, subscribers) see the same names
    (local,) = server.journal.entries("shop", "j")
    assert local.to_dict()["reply"] == {"reservationId": "r-1", "qtyReserved": 2}
    assert local.replies() == [{"reservationId": "r-1", "qtyReserved": 2}]
    # a version written as a string stays a string
    client.call("PutScenario", text=SHOP.replace("version: 1", "version: v2"))
    _reserve(catalog, server.address, "shop", session="j2")
    (entry,) = client.call("GetJournal", scenario="shop", session="j2").entries
    assert json_format.MessageToDict(entry)["scenarioVersion"] == "v2"


def test_journal_paths_are_as_the_user_gave_them(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """`virtsvc serve` in the project reads scenarios = "scenarios" from pyproject.toml: its rule
    locations are relative, as the plugin's are."""
    monkeypatch.chdir(ROOT)
    settings = load_settings()
    assert all(p.is_absolute() for p in settings.scenarios)  # resolved by the settings
    paths = _scenario_paths(build_parser().parse_args(["serve"]), settings)
    assert paths == [Path("scenarios")]
    srv = VirtualServer(catalog, load_scenarios(paths, catalog)).start()
    try:
        _reserve(catalog, srv.address, "checkout-happy")
        (entry,) = srv.journal.entries("checkout-happy", "t")
        assert entry.rule is not None and entry.rule.startswith("scenarios/checkout-happy.yaml:")
    finally:
        srv.stop(0)


# -- 7: keepalive ---------------------------------------------------------------------------------------


def _watch_with_pings(address: str, every_ms: int, seconds: float, out: dict[str, Any]) -> None:
    """Holds a server stream (WatchJournal, silent) open for ``seconds`` while pinging every ``every_ms``."""
    options = [
        ("grpc.keepalive_time_ms", every_ms),
        ("grpc.keepalive_timeout_ms", 2000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with grpc.insecure_channel(address, options=options) as channel:
        watch = AdminClient(channel).watch(timeout=seconds)
        try:
            for _ in watch:
                pass
        except grpc.RpcError as exc:
            out["code"], out["details"] = exc.code(), exc.details()


def test_keepalive_pings_within_the_minimum_keep_a_stream_alive(catalog: Catalog) -> None:
    """A client pinging within the server's minimum keeps its stream; one pinging faster is told
    too_many_pings (grpc's own default minimum, 5 minutes, ends the first after a few pings too)."""
    assert ServeOptions().min_ping_interval == 10.0
    relaxed = VirtualServer(catalog, [], min_ping_interval=0.2).start()
    strict = VirtualServer(catalog, [], min_ping_interval=5).start()
    try:
        # grpc clients send at most one ping a second whatever they are asked: that is "every 300 ms" here
        kept: dict[str, Any] = {}
        told: dict[str, Any] = {}
        threads = [
            threading.Thread(target=_watch_with_pings, args=(relaxed.address, 300, 4.5, kept)),
            threading.Thread(target=_watch_with_pings, args=(strict.address, 50, 4.5, told)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=15)
        assert kept["code"] is grpc.StatusCode.DEADLINE_EXCEEDED  # alive until its own deadline
        assert told["code"] is grpc.StatusCode.UNAVAILABLE and "many pings" in told["details"].lower()
    finally:
        relaxed.stop(0)
        strict.stop(0)


def test_serve_min_ping_interval_flag() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--min-ping-interval", "0.5"])
    settings = load_settings(ROOT / "tests")  # no pyproject there: defaults
    assert _serve_options(args, settings).min_ping_interval == 0.5
    assert _serve_options(parser.parse_args(["serve"]), settings).min_ping_interval == 10.0
    options = dict(ServeOptions(min_ping_interval=0.5).grpc_options())
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 500
    assert options["grpc.keepalive_permit_without_calls"] == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--min-ping-interval", "0"])


# -- 8: the command line -----------------------------------------------------------------------------


def _virtsvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = shutil.which("virtsvc")
    command = [script] if script else [sys.executable, "-m", "virtsvc.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_version_gen_and_check_lines(tmp_path: Path) -> None:
    from virtsvc import __version__

    done = _virtsvc("--version", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"virtsvc {__version__}\n", "")

    protos = tmp_path / "protos"
    (protos / "one").mkdir(parents=True)
    (protos / "one" / "one.proto").write_text(
        'syntax = "proto3";\npackage one;\nmessage M { string a = 1; }\n'
        "service S { rpc Get (M) returns (M); }\n"
    )
    done = _virtsvc("gen", "protos", "-o", "gen", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("generated 5 files from 1 proto into gen/\n", "")
    done = _virtsvc("gen", "protos", "-o", "gen", cwd=tmp_path)
    assert (done.stdout, done.stderr) == ("gen/ is up to date (1 proto)\n", "")

    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    rules = "".join(
        f"  - method: one.S/Get\n    when: {{request: {{a: x{i}}}}}\n    reply: {{a: r{i}}}\n"
        for i in range(7)
    )
    (scenarios / "a.yaml").write_text(f"scenario: a\nrules:\n{rules}")
    (scenarios / "b.yaml").write_text(f"scenario: b\nrules:\n{rules}")
    done = _virtsvc("check", "--protos", "protos", "scenarios", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "checked 2 scenarios, 14 rules: ok\n", "")
    (scenarios / "b.yaml").unlink()
    (scenarios / "a.yaml").write_text("scenario: a\nrules:\n  - method: one.S/Get\n    reply: {}\n")
    done = _virtsvc("check", "--protos", "protos", "scenarios", cwd=tmp_path)
    assert done.stdout == "checked 1 scenario, 1 rule: ok\n"
