"""Health under scenario control: a scenario answers grpc.health.v1.Health/Check and /Watch for the services
its rules name, while the server's own health answers service "" (its readiness) and everything else. With
a real grpc health client and grpcurl, on the project's own protos."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import fails

from virtsvc.cli import main
from virtsvc.contracts import Catalog
from virtsvc.scenarios.loader import compile_text
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
TIMEOUT = 10
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

HEALTH = """\
scenario: health
rules:
  - method: grpc.health.v1.Health/Check
    when: {request: {service: payments}}
    reply: {status: NOT_SERVING}
  - method: grpc.health.v1.Health/Check
    when: {request: {service: flaky}}
    sequence: [{reply: {status: SERVING}}, {reply: {status: NOT_SERVING}}]
    after: cycle
  - method: grpc.health.v1.Health/Check
    when: {request: {service: once}}
    times: 1
    reply: {status: NOT_SERVING}
  - method: grpc.health.v1.Health/Check
    when: {request: {service: down}}
    status: {code: UNAVAILABLE, message: down for maintenance}
  - method: grpc.health.v1.Health/Watch
    when: {request: {service: payments}}
    stream: [{reply: {status: SERVING}}, {reply: {status: NOT_SERVING}}]
"""

MD = (("x-virtsvc-scenario", "health"), ("x-virtsvc-session", "h"))


@pytest.fixture
def serve(start_server: Callable[..., VirtualServer], catalog: Catalog) -> Callable[..., VirtualServer]:
    """Starts servers of a scenario text (the module's by default), stopped at the end."""
    return lambda text=HEALTH, **options: start_server(compile_text(text, catalog, "health.yaml"), **options)


@pytest.fixture
def stub_to() -> Iterator[Callable[[VirtualServer], health_pb2_grpc.HealthStub]]:
    channels: list[grpc.Channel] = []

    def stub(server: VirtualServer) -> health_pb2_grpc.HealthStub:
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        return health_pb2_grpc.HealthStub(channel)

    try:
        yield stub
    finally:
        for channel in channels:
            channel.close()


def _check(stub: health_pb2_grpc.HealthStub, service: str, metadata: Any = MD) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(stub.Check(request, metadata=metadata, timeout=TIMEOUT).status)


def test_the_scenario_answers_for_the_services_it_names(
    serve: Callable[..., VirtualServer], stub_to: Callable[..., Any]
) -> None:
    server = serve()
    stub = stub_to(server)
    assert _check(stub, "payments") == NOT_SERVING
    assert [_check(stub, "flaky") for _ in range(3)] == [SERVING, NOT_SERVING, SERVING]
    err = fails(stub.Check, health_pb2.HealthCheckRequest(service="down"), metadata=MD, timeout=TIMEOUT)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "down for maintenance")
    calls = [e for e in server.journal.entries("health", "h") if e.method.startswith("grpc.health")]
    assert len(calls) == 5 and calls[0].method == "grpc.health.v1.Health/Check"  # journaled like any call


def test_the_server_keeps_its_own_answers(
    serve: Callable[..., VirtualServer], stub_to: Callable[..., Any]
) -> None:
    """Service "" (readiness) and the services no rule names answer as the server's health says, with or
    without a scenario; a rule used up hands the service back."""
    stub = stub_to(serve())
    for metadata in (MD, ()):
        assert _check(stub, "", metadata) == SERVING
        assert _check(stub, "shop.v1.Inventory", metadata) == SERVING  # a service the server serves
        err = fails(
            stub.Check, health_pb2.HealthCheckRequest(service="nope"), metadata=metadata, timeout=TIMEOUT
        )
        assert err.code() is grpc.StatusCode.NOT_FOUND  # the real servicer's answer for unknown services
        assert err.details() == "unknown service"  # as grpc-go's health server words it
    err = fails(stub.Check, health_pb2.HealthCheckRequest(service="payments"), timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.NOT_FOUND  # no scenario selected: the server answers
    assert _check(stub, "once") == NOT_SERVING
    err = fails(stub.Check, health_pb2.HealthCheckRequest(service="once"), metadata=MD, timeout=TIMEOUT)
    assert err.code() is grpc.StatusCode.NOT_FOUND  # times: 1 used up


def test_a_default_scenario_answers_calls_without_metadata(
    serve: Callable[..., VirtualServer], stub_to: Callable[..., Any]
) -> None:
    stub = stub_to(serve(default_scenario="health"))
    assert _check(stub, "payments", ()) == NOT_SERVING
    assert _check(stub, "", ()) == SERVING


def test_readiness_stays_the_server_s_while_it_drains(
    serve: Callable[..., VirtualServer], stub_to: Callable[..., Any]
) -> None:
    """Even a rule that answers every Check leaves service "" alone: a draining server says NOT_SERVING."""
    text = "scenario: health\nrules:\n  - method: grpc.health.v1.Health/Check\n    reply: {status: SERVING}\n"
    server = serve(text)
    stub = stub_to(server)
    assert _check(stub, "anything") == SERVING
    server.health.enter_graceful_shutdown()
    assert _check(stub, "") == NOT_SERVING
    assert _check(stub, "anything") == SERVING


def test_watch(serve: Callable[..., VirtualServer], stub_to: Callable[..., Any]) -> None:
    stub = stub_to(serve())
    request = health_pb2.HealthCheckRequest(service="payments")
    assert [r.status for r in stub.Watch(request, metadata=MD, timeout=TIMEOUT)] == [SERVING, NOT_SERVING]
    own = stub.Watch(health_pb2.HealthCheckRequest(service=""), metadata=MD, timeout=TIMEOUT)
    try:
        assert next(own).status == SERVING  # the server's own watch: open until the client goes
    finally:
        own.cancel()


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl(serve: Callable[..., VirtualServer]) -> None:
    server = serve()

    def grpcurl(service: str) -> dict[str, Any]:
        argv = [
            "grpcurl",
            "-plaintext",
            "-H",
            "x-virtsvc-scenario: health",
            "-d",
            json.dumps({"service": service}),
        ]
        run = subprocess.run(
            [*argv, server.address, "grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 0, run.stderr
        return dict(json.loads(run.stdout))

    assert grpcurl("payments") == {"status": "NOT_SERVING"}
    assert grpcurl("") == {"status": "SERVING"}


def test_check_knows_the_health_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "health.yaml"
    path.write_text(HEALTH)
    assert main(["check", "--protos", str(ROOT / "protos"), str(path)]) == 0
    capsys.readouterr()
    path.write_text(
        "scenario: bad\nrules:\n"
        "  - method: grpc.health.v1.Health/Chek\n    reply: {}\n"
        "  - method: grpc.health.v1.Health/Check\n    reply: {status: NOT_SERVNG}\n"
    )
    assert main(["check", "--protos", str(ROOT / "protos"), str(path)]) == 1
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert any(
        line.startswith(f'{path}:3: unknown method "grpc.health.v1.Health/Chek"; did you mean')
        for line in lines
    ), lines
    assert any(line.startswith(f"{path}:6: reply.status:") and "NOT_SERVING" in line for line in lines), lines


PLUGIN_TEST = """\
from grpc_health.v1 import health_pb2, health_pb2_grpc


def test_payments_down(virtual_service):
    virtual_service.on(
        "grpc.health.v1.Health/Check", when={"request": {"service": "payments"}}
    ).reply({"status": "NOT_SERVING"})
    stub = health_pb2_grpc.HealthStub(virtual_service.channel())
    check = lambda service: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    assert check("payments") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert check("") == health_pb2.HealthCheckResponse.SERVING
"""


def test_the_plugin_s_inline_rules(pytester: pytest.Pytester) -> None:
    from test_plugin import project

    project(pytester, ini="virtsvc_default_scenario = shop", scenario="scenario: shop\nrules: []\n")
    pytester.makepyfile(test_inner=PLUGIN_TEST)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_readme_example(serve: Callable[..., VirtualServer], stub_to: Callable[..., Any]) -> None:
    """The README's scenario answers as the README shows: grpcurl's output, and a Watch held open."""
    import shlex

    start = README.index("tests/test_health.py serves this scenario")
    text = README[start:].split("```yaml\n", 1)[1].split("```", 1)[0]
    session = README[start:].split("```\n$ ", 1)[1].split("```", 1)[0]
    command, expected = session.split("\n", 1)
    server = serve(text)
    argv = [server.address if a == "127.0.0.1:50051" else a for a in shlex.split(command)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert (run.stdout + run.stderr).strip() == expected.strip()
    md = (("x-virtsvc-scenario", "payments-down"),)
    watch = stub_to(server).Watch(
        health_pb2.HealthCheckRequest(service="payments"), metadata=md, timeout=TIMEOUT
    )
    try:
        assert [next(watch).status, next(watch).status] == [SERVING, NOT_SERVING]
    finally:
        watch.cancel()
