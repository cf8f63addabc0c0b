"""Health under scenario control: ``grpc.health.v1.Health/Check`` and ``/Watch`` for a named service answer
from the call's scenario when one of its rules (or of the session's) matches the call, so a test can see
how its client handles NOT_SERVING. Everything else stays the server's own health: service ``""`` (its
readiness, what probes ask) always, and every call no rule matches or that selects no scenario.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from virtsvc.contracts import Catalog
from virtsvc.contracts.catalog import HEALTH_SERVICE
from virtsvc.engine.pipeline import Dispatcher
from virtsvc.engine.router import Router
from virtsvc.errors import Refusal
from virtsvc.scenarios.model import Call

__all__ = ["ScenarioHealth"]


class ScenarioHealth:
    """The server's health servicer (``set``, ``enter_graceful_shutdown``), answering for scenarios too."""

    def __init__(self, router: Router, dispatcher: Dispatcher, catalog: Catalog) -> None:
        self.servicer = health.HealthServicer()
        self._router = router
        self._dispatcher = dispatcher
        self._check = catalog.builtin[f"{HEALTH_SERVICE}/Check"]
        self._watch = catalog.builtin[f"{HEALTH_SERVICE}/Watch"]

    def set(self, service: str, status: Any) -> None:
        self.servicer.set(service, status)

    def enter_graceful_shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()

    def add_to(self, server: grpc.Server) -> None:
        """Serves the Health service on ``server`` (raw bytes in and out: the engine decodes its own)."""
        handlers = {
            "Check": grpc.unary_unary_rpc_method_handler(self._on_check),
            "Watch": grpc.unary_stream_rpc_method_handler(self._on_watch),
            "List": grpc.unary_unary_rpc_method_handler(
                self.servicer.List,
                request_deserializer=health_pb2.HealthListRequest.FromString,
                response_serializer=health_pb2.HealthListResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),))
        server.add_registered_method_handlers(HEALTH_SERVICE, handlers)

    def _on_check(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = _request(raw, context)
        if self._scenario_answers(self._check, request, raw, context):
            answer: bytes = self._dispatcher.handler_for(self._check).unary_unary(raw, context)
            return answer
        response = self.servicer.Check(request, context)
        if context.code() == grpc.StatusCode.NOT_FOUND:
            context.set_details("unknown service")  # grpcio sends none; grpc-go's health server says this
        return response.SerializeToString()

    def _on_watch(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        request = _request(raw, context)
        if self._scenario_answers(self._watch, request, raw, context):
            yield from self._dispatcher.handler_for(self._watch).unary_stream(raw, context)
            return
        for response in self.servicer.Watch(request, context):
            yield response.SerializeToString()

    def _scenario_answers(
        self, spec: Any, request: health_pb2.HealthCheckRequest, raw: bytes, context: grpc.ServicerContext
    ) -> bool:
        """Whether a rule the call's scenario or session has for ``spec`` matches it (and is not used up)."""
        if not request.service:
            return False  # the server's readiness is never a scenario's to answer
        metadata: Mapping[str, str] = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        router = self._router
        try:
            _compiled, session = router.route(metadata)
        except Refusal:
            return False  # no scenario selected (a probe, a plain health client): the server answers
        call = Call(
            method=spec, scenario=session.scenario, session=session, metadata=metadata, raw_requests=[raw]
        )
        for rule in router.candidates(session, session.scenario, spec.full_name):
            if rule.per_message or (rule.times is not None and session.used(rule.times_key) >= rule.times):
                continue
            try:
                if rule.when is None or rule.when.check(call).ok:
                    return True
            except Exception:  # a matcher's bug: the engine reports it, naming the rule
                return True
        return False


def _request(raw: bytes, context: grpc.ServicerContext) -> health_pb2.HealthCheckRequest:
    try:
        return health_pb2.HealthCheckRequest.FromString(raw)
    except DecodeError:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "the request is not a grpc.health.v1.HealthCheckRequest"
        )
        raise  # pragma: no cover - abort raises
