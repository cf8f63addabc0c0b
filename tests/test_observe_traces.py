"""OpenTelemetry spans (``virtsvc.observe.traces``): each call a server span continuing the caller's
``traceparent``, exported to an in-memory exporter and, from `virtsvc serve` configured by the standard
OTEL_ variables, to a real OTLP receiver on loopback; without OpenTelemetry nothing is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from virtsvc.contracts import Catalog
from virtsvc.observe.traces import Tracing, configured_by_environment
from virtsvc.scenarios import compile_text
from virtsvc.server import VirtualServer

ROOT = Path(__file__).resolve().parent.parent
RESERVE = "shop.v1.Inventory/Reserve"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

RULES = """\
scenario: traced
rules:
  - method: shop.v1.Inventory/Reserve
    when: {request: {sku: GONE}}
    status: {code: NOT_FOUND, message: no such sku}
  - method: shop.v1.Inventory/Reserve
    delay: 20ms
    reply: {reservationId: r-1}
  - method: shop.v1.Inventory/GetItem
    when: {request: {sku: KNOWN}}
    reply: {sku: KNOWN}
"""


@pytest.fixture(scope="module")
def traced(catalog: Catalog) -> Iterator[tuple[VirtualServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # traces=False: what the environment says is not this test's business; the provider is given here.
    server = VirtualServer(catalog, compile_text(RULES, catalog, origin="traced.yaml"), port=0, traces=False)
    server.add_observer(Tracing(provider))
    server.start()
    yield server, exporter
    server.stop(0)
    provider.shutdown()


def _spans(exporter: InMemorySpanExporter, count: int) -> list[Any]:
    deadline = time.monotonic() + 5
    while len(exporter.get_finished_spans()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    spans = list(exporter.get_finished_spans())
    assert len(spans) == count, spans
    return spans


def _md(session: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("x-virtsvc-scenario", "traced"), ("x-virtsvc-session", session), *extra)


def test_a_call_continues_the_callers_trace(traced: Any, channel_to: Any, pb: SimpleNamespace) -> None:
    """traceparent sent: the server span is its child, named after the method, with virtsvc's attributes."""
    server, exporter = traced
    exporter.clear()
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    reply = inv.Reserve(pb.inv.ReserveRequest(sku="A"), metadata=_md("s-1", ("traceparent", TRACEPARENT)))
    assert reply.reservation_id == "r-1"
    (span,) = _spans(exporter, 1)
    assert span.name == RESERVE
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.parent.is_remote
    attributes = dict(span.attributes)
    assert attributes.pop("virtsvc.delay_ms") >= 20.0
    assert attributes == {
        "rpc.system": "grpc",
        "rpc.service": "shop.v1.Inventory",
        "rpc.method": "Reserve",
        "rpc.grpc.status_code": 0,
        "virtsvc.scenario": "traced",
        "virtsvc.session": "s-1",
        "virtsvc.rule": "traced.yaml:6",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.end_time - span.start_time >= 20_000_000  # ns: the span covers the delay


def test_a_near_miss_is_an_error_span_saying_why(traced: Any, channel_to: Any, pb: SimpleNamespace) -> None:
    """No rule matched: UNIMPLEMENTED, an error status, the near-miss text as an attribute; a root span
    when the caller sent no traceparent."""
    server, exporter = traced
    exporter.clear()
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    with pytest.raises(grpc.RpcError) as info:
        inv.GetItem(pb.inv.GetItemRequest(sku="NOPE"), metadata=_md("s-2"))
    (span,) = _spans(exporter, 1)
    assert span.parent is None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert span.attributes["virtsvc.near_miss"] == info.value.details()
    assert "virtsvc.rule" not in span.attributes
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == f"UNIMPLEMENTED: {info.value.details()}"


def test_a_scripted_status_is_an_answer_not_a_server_error(
    traced: Any, channel_to: Any, pb: SimpleNamespace
) -> None:
    """A rule answering NOT_FOUND leaves the status unset, as OpenTelemetry's RPC conventions say."""
    server, exporter = traced
    exporter.clear()
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    with pytest.raises(grpc.RpcError):
        inv.Reserve(pb.inv.ReserveRequest(sku="GONE"), metadata=_md("s-3", ("traceparent", TRACEPARENT)))
    (span,) = _spans(exporter, 1)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.attributes["virtsvc.rule"] == "traced.yaml:3"
    assert span.status.status_code is StatusCode.UNSET


def test_streams_are_spans_too(traced: Any, channel_to: Any, pb: SimpleNamespace) -> None:
    """A server-streaming call no rule answers is one span, ended when the call is."""
    server, exporter = traced
    exporter.clear()
    inv = pb.inv_grpc.InventoryStub(channel_to(server.address))
    with pytest.raises(grpc.RpcError):
        list(inv.Watch(pb.inv.WatchRequest(skus=["A"]), metadata=_md("s-4")))
    (span,) = _spans(exporter, 1)
    assert span.name == "shop.v1.Inventory/Watch"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, False),
    ],
)
def test_the_standard_variables_decide_whether_to_trace(environ: dict[str, str], expected: bool) -> None:
    """Traces are exported when an exporter or endpoint is named, unless disabled or set to none."""
    assert configured_by_environment(environ) is expected


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP trace receiver: keeps every export request."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.arrived = threading.Event()

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[_Receiver, int]]:
    servicer = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_serve_exports_to_the_otlp_endpoint_of_the_environment(
    receiver: tuple[_Receiver, int], catalog: Catalog, tmp_path: Path
) -> None:
    """`virtsvc serve` with OTEL_EXPORTER_OTLP_ENDPOINT: the span reaches a real OTLP receiver, in the
    caller's trace, under the service name virtsvc."""
    servicer, port = receiver
    (tmp_path / "traced.yaml").write_text(RULES)
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    env.pop("OTEL_SERVICE_NAME", None)
    command = [sys.executable, "-m", "virtsvc.cli", "serve", "--protos", "protos", "--log-format", "json"]
    process = subprocess.Popen(
        [*command, "--scenarios", str(tmp_path / "traced.yaml"), "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        serving: dict[str, Any] = {}
        for line in process.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "serving":
                serving = json.loads(line)
                break
        assert serving.get("traces") is True, serving
        spec = catalog.method(RESERVE)
        with grpc.insecure_channel(f"127.0.0.1:{serving['port']}") as channel:
            call = channel.unary_unary(spec.path, request_serializer=lambda m: m.SerializeToString())
            request = spec.input_class(sku="A")
            call(request, metadata=_md("otlp", ("traceparent", TRACEPARENT)), timeout=5)
        assert servicer.arrived.wait(10), "no export arrived"
    finally:
        process.terminate()
        process.wait(timeout=15)
    (resource_spans,) = [r for req in servicer.requests for r in req.resource_spans]
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "virtsvc"
    (span,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert span.name == RESERVE
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["virtsvc.session"].string_value == "otlp"
    assert attributes["virtsvc.rule"].string_value.endswith("traced.yaml:6")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**environ, **env},
    )


SERVE_ONE_CALL = """
    import sys
    BLOCK
    from virtsvc.contracts import load_catalog
    from virtsvc.scenarios import compile_text
    from virtsvc.server import VirtualServer
    import grpc

    catalog = load_catalog(protos="protos")
    text = "scenario: s\\nrules:\\n  - method: shop.v1.Inventory/Reserve\\n    reply: {reservationId: r}\\n"
    server = VirtualServer(catalog, compile_text(text, catalog), port=0).start()
    spec = catalog.method("shop.v1.Inventory/Reserve")
    with grpc.insecure_channel(server.address) as channel:
        reply = channel.unary_unary(spec.path, response_deserializer=spec.output_class.FromString)(
            b"", metadata=(("x-virtsvc-scenario", "s"),), timeout=5)
    server.stop(0)
    print(reply.reservation_id, server.tracing is not None,
          sorted(m for m, module in sys.modules.items() if module and m.split(".")[0] == "opentelemetry"))
"""


def test_without_configuration_nothing_of_opentelemetry_is_imported() -> None:
    """OpenTelemetry installed but not configured: a call is served and no opentelemetry module loads."""
    result = _python(SERVE_ONE_CALL.replace("BLOCK", ""))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "r False []"


def test_without_opentelemetry_installed_a_configured_server_warns_and_serves(tmp_path: Path) -> None:
    """OTEL_ variables set but OpenTelemetry missing (blocked): one warning naming the extra, the call is
    served, and nothing of OpenTelemetry is imported."""
    block = "sys.modules['opentelemetry'] = None"
    result = _python(SERVE_ONE_CALL.replace("BLOCK", block), OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == "r False []"
    warning = [line for line in result.stdout.splitlines() if "traces.unavailable" in line]
    assert len(warning) == 1, result.stdout
    assert "pip install 'virtsvc[otel]'" in warning[0]


def test_traces_required_without_opentelemetry_is_a_clear_error() -> None:
    """ServeOptions(traces=True) with OpenTelemetry missing: a ConfigError that says what to install."""
    code = """
        import sys
        sys.modules['opentelemetry'] = None
        from virtsvc.contracts import load_catalog
        from virtsvc.errors import ConfigError
        from virtsvc.server import VirtualServer
        try:
            VirtualServer(load_catalog(protos="protos"), [], traces=True)
        except ConfigError as exc:
            print(exc)
    """
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "traces need the OpenTelemetry SDK and its OTLP exporter: pip install 'virtsvc[otel]'"
    )


def test_servers_of_one_process_share_the_provider_the_variables_build() -> None:
    """OTEL_TRACES_EXPORTER=console: two servers, one provider (one exporter thread), spans on stdout."""
    code = """
        from virtsvc.contracts import load_catalog
        from virtsvc.server import VirtualServer

        catalog = load_catalog(protos="protos")
        first, second = VirtualServer(catalog, []), VirtualServer(catalog, [])
        print(first.tracing.owned, first.tracing.provider is second.tracing.provider)
    """
    result = _python(code, OTEL_TRACES_EXPORTER="console")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True True"
