"""What verification sends and to whom: a rule's concrete requests, the target, and the real answers.

A rule is replayable when it says exactly what to send: ``examples:`` (one list of messages each for
client streams), or a ``when.request`` made of literals and ``$eq`` alone (sent as the only message of a
client stream). ``when.metadata`` literals go along as metadata. Calls reuse the forwarding client
(:mod:`virtsvc.upstream.client`): raw bytes, every RPC kind, a deadline on each call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor

from virtsvc.contracts.catalog import Catalog, MethodSpec
from virtsvc.errors import ConfigError, ConversionError, DescriptorError
from virtsvc.scenarios.fields import fill_message
from virtsvc.scenarios.model import Rule
from virtsvc.upstream.client import GrpcUpstream
from virtsvc.upstream.reflection import fetch_file_set

__all__ = ["Answer", "Replay", "Target", "replay_of", "target_catalog"]

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Replay:
    """What to send for one rule: request streams (one message each but for client streams) and metadata."""

    requests: tuple[tuple[bytes, ...], ...]
    metadata: Metadata = ()


@dataclass(frozen=True)
class Answer:
    """What the real service answered one replayed request."""

    code: grpc.StatusCode
    details: str
    messages: tuple[bytes, ...]


class _NotConcrete(Exception):
    """A condition that does not say what to send: its path and operator."""


def replay_of(rule: Rule, spec: MethodSpec) -> Replay | str:
    """The requests to replay for ``rule``, or why there are none (the reason a report shows)."""
    node = rule.source if isinstance(rule.source, Mapping) else {}
    when = node.get("when")
    when = when if isinstance(when, Mapping) else {}
    metadata: list[tuple[str, str]] = []
    for key, value in (when.get("metadata") or {}).items():
        if isinstance(value, Mapping) and list(value) == ["$eq"]:
            value = value["$eq"]
        if not isinstance(value, str):
            return f"when.metadata.{key} is not a text literal: no concrete metadata to send"
        metadata.append((str(key), value))
    if rule.examples:
        return Replay(rule.examples, tuple(metadata))
    if "request" not in when:
        if not spec.input.fields:  # google.protobuf.Empty and the like: there is one request only
            return Replay(((spec.input_class().SerializeToString(),),), tuple(metadata))
        return "no when.request to replay; add examples: with the requests to send"
    try:
        found = _concrete(when["request"], "when.request")
    except _NotConcrete as exc:
        return f"{exc}: not a concrete request; add examples: with the requests to send"
    message = spec.input_class()
    try:
        fill_message(message, found, True, "when.request")
    except ConversionError as exc:  # pragma: no cover - the loader has checked when.request already
        return str(exc)
    return Replay(((message.SerializeToString(),),), tuple(metadata))


def _concrete(value: Any, path: str) -> Any:
    """``value`` with every ``$eq`` unwrapped; _NotConcrete at the first other operator."""
    if isinstance(value, Mapping):
        ops = [k for k in value if isinstance(k, str) and k.startswith("$")]
        if ops == ["$eq"] and len(value) == 1:
            return _concrete(value["$eq"], path)
        if ops:
            raise _NotConcrete(f"{path} uses {next(op for op in ops if op != '$eq')}")
        return {k: _concrete(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_concrete(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


class Target:
    """The real service: a channel to it, and its own schema when it offers reflection (else None)."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self.client = GrpcUpstream("target", address)
        self._schema: Catalog | None = None
        self._asked = False

    def wait_ready(self) -> None:
        """Raises ConfigError naming the target when nothing answers at its address in time."""
        try:
            grpc.channel_ready_future(self.client.channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            raise ConfigError(
                f"target {self.address}: unreachable (nothing answered within {self.timeout:g} s)"
            ) from None

    @property
    def schema(self) -> Catalog | None:
        """The target's own contracts through its reflection service (v1, else v1alpha); None without one."""
        if not self._asked:
            self._asked = True
            try:
                file_set, _path = fetch_file_set(self.client.channel, self.address, self.timeout)
                self._schema = Catalog.from_file_set(file_set)
            except (ConfigError, DescriptorError, grpc.RpcError):
                self._schema = None
        return self._schema

    def live_type(self, full_name: str) -> Descriptor | None:
        """The target's own descriptor of a message type, when it offers reflection and knows the type."""
        schema = self.schema
        if schema is None:
            return None
        try:
            return schema.pool.FindMessageTypeByName(full_name)
        except KeyError:
            return None

    def call(self, spec: MethodSpec, requests: tuple[bytes, ...], metadata: Metadata) -> Answer:
        """One call of any kind; the answer whatever it is (a failed call is an answer too)."""
        payload: Any = iter(requests) if spec.client_streaming else requests[0]
        call = self.client.open(spec, payload, metadata, self.timeout)
        messages = tuple(call.replies())
        code, details, _trailers = call.outcome()
        return Answer(code, details, messages)

    def close(self) -> None:
        self.client.close()


def target_catalog(target: Target) -> Catalog:
    """The scenarios' contracts when none are given: the target's, through its reflection service."""
    schema = target.schema
    if schema is None:
        raise ConfigError(
            f"target {target.address}: offers no reflection; give --protos DIR or --descriptors FILE"
        )
    return schema
