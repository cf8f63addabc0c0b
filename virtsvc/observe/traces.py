"""OpenTelemetry spans: each call a server span continuing the caller's ``traceparent`` (the ``otel`` extra).

A call observer starts the span as the call arrives, its parent extracted from the call's metadata by the
configured propagators (W3C ``traceparent``/``tracestate`` and ``baggage`` by default, ``OTEL_PROPAGATORS``
otherwise), so the virtual downstream appears inside the trace of the service under test; it ends the span
once the call is journaled, with the scenario, session, the rule that answered (``file:line``) or the near
miss, the simulated delay and the gRPC status. Names and attributes follow OpenTelemetry's RPC conventions
(span ``pkg.Service/Method``, kind SERVER, ``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code``; an error status for the codes the conventions count as server errors).

:func:`tracing_from_environment` decides, once per server, whether there is anything to do: a tracer
provider the application (or ``opentelemetry-instrument``) has set already is used as it is; otherwise one is
built the standard way when ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` and the exporter's own variables apply as usual). Neither: no module
of OpenTelemetry is imported and calls pay nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from virtsvc import _logs
from virtsvc.errors import ConfigError

if TYPE_CHECKING:
    from virtsvc.engine.pipeline import Exchange

__all__ = ["ERROR_CODES", "Tracing", "configured_by_environment", "tracing_from_environment"]

log = _logs.get_logger("virtsvc.observe.traces")

#: The codes OpenTelemetry's RPC conventions give a server span an error status for (others leave it unset:
#: NOT_FOUND or FAILED_PRECONDITION are answers, not failures of the server).
ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_ENDPOINT_VARIABLES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)
_INSTALL = "pip install 'virtsvc[otel]'"


class Tracing:
    """Spans for calls, from ``tracer_provider`` (an SDK TracerProvider, or the global one).

    ``owned``: the provider was built here, so :meth:`close` flushes it.
    """

    def __init__(self, tracer_provider: Any, *, owned: bool = False) -> None:
        from opentelemetry import propagate, trace

        self.provider = tracer_provider
        self.owned = owned
        self._tracer = tracer_provider.get_tracer("virtsvc")
        self._extract = propagate.extract
        self._server = trace.SpanKind.SERVER
        self._trace = trace

    def on_start(self, exchange: Exchange) -> object:
        spec = exchange.spec
        parent = self._extract(exchange.metadata)
        return self._tracer.start_span(
            spec.full_name,
            context=parent,
            kind=self._server,
            attributes={"rpc.system": "grpc", "rpc.service": spec.service, "rpc.method": spec.name},
        )

    def on_finish(self, exchange: Exchange, token: object) -> None:
        span: Any = token
        entry = exchange.entry
        if entry is not None and span.is_recording():
            code = entry.code
            attributes: dict[str, Any] = {
                "rpc.grpc.status_code": code.value[0],
                "virtsvc.scenario": entry.scenario,
                "virtsvc.session": entry.session,
                "virtsvc.delay_ms": round(entry.delay * 1000, 3),
            }
            if entry.scenario_version is not None:
                attributes["virtsvc.scenario_version"] = entry.scenario_version
            if entry.rule is not None:
                attributes["virtsvc.rule"] = entry.rule
            if entry.near_miss is not None:
                attributes["virtsvc.near_miss"] = entry.near_miss
            span.set_attributes(attributes)
            if code in ERROR_CODES:
                status = self._trace.Status(self._trace.StatusCode.ERROR, f"{code.name}: {entry.message}")
                span.set_status(status)
        span.end()

    def close(self) -> None:
        """Exports what a provider built here has buffered (the SDK shuts it down at exit; an application's
        provider is the application's to flush)."""
        if self.owned:
            self.provider.force_flush()


def configured_by_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return any(environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def _global_provider() -> Any | None:
    """The tracer provider the application set, if OpenTelemetry is imported and one is set."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider


def tracing_from_environment(required: bool = False) -> Tracing | None:
    """Tracing as the process is configured, or None when nothing asks for it (see the module docstring).

    ``required`` (``ServeOptions.traces=True``): a provider is built even without the variables (exporting
    OTLP to its default endpoint), and OpenTelemetry missing is a ConfigError rather than a warning.
    """
    provider = _global_provider()
    if provider is not None:
        return Tracing(provider)
    if not required and not configured_by_environment():
        return None
    try:
        provider = _environment_provider()
    except ImportError as exc:
        if required:
            raise ConfigError(
                f"traces need the OpenTelemetry SDK and its OTLP exporter: {_INSTALL}"
            ) from None
        log.warning(
            "traces.unavailable",
            reason=f"the OTEL_ variables ask for traces, but {exc.name or 'opentelemetry'} is not installed",
            install=_INSTALL,
        )
        return None
    return Tracing(provider, owned=True)


_built: Any = None  # the provider built from the variables: one per process, whatever the servers
_built_lock = threading.Lock()


def _environment_provider() -> Any:
    """The provider built from the variables, once per process: every server of a test suite shares it
    (and its exporter's thread) rather than each starting its own."""
    global _built
    with _built_lock:
        if _built is None:
            _built = _provider_from_environment()
        return _built


def _provider_from_environment() -> Any:
    """An SDK TracerProvider with the exporters ``OTEL_TRACES_EXPORTER`` names (``otlp`` by default)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "virtsvc"}
    provider = TracerProvider(resource=Resource.create(attributes))
    names = [
        n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()
    ]
    for name in names or ["otlp"]:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not supported; use otlp, console or none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        except ImportError:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs opentelemetry-exporter-otlp-proto-http; "
                "pip install it, or use grpc (the default)"
            ) from None
        return HttpExporter()
    raise ConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; use grpc or http/protobuf"
    )
