"""The forwarding client: one channel per upstream, raw bytes in and out, every RPC kind.

A forwarded call relays the upstream's answer as it came: initial metadata, messages, trailing metadata and
the status (details included). The caller's deadline becomes the upstream call's timeout, and the caller's
cancellation cancels it. A call the transport could not deliver (nothing listening, DNS, TLS) is told apart
from an UNAVAILABLE the upstream itself answered, so it can be reported naming the upstream.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from virtsvc.errors import ConfigError

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import MethodSpec

__all__ = ["GrpcUpstream", "UpstreamCall", "parse_upstream", "parse_upstreams"]

Metadata = tuple[tuple[str, "str | bytes"], ...]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Reconnect soon after an upstream comes back (grpc's default backoff grows to two minutes).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# grpc core writes this into the error of every status that came from the peer; a status without it was
# made locally (connection refused, name resolution, TLS handshake).
_FROM_PEER = "Error received from peer"


def parse_upstream(text: str) -> tuple[str, str]:
    """``NAME=HOST:PORT`` as (name, address); ConfigError saying what is wrong otherwise."""
    name, sep, address = text.partition("=")
    name, address = name.strip(), address.strip()
    if not sep or not name or not address:
        raise ConfigError(
            f"--upstream {text}: expected NAME=HOST:PORT, e.g. --upstream inventory=127.0.0.1:50061"
        )
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"--upstream {text}: bad upstream name {name!r}; a name matches [a-z0-9][a-z0-9._-]*"
        )
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"--upstream {text}: expected HOST:PORT after {name}=, got {address!r}")
    return name, address


def parse_upstreams(items: Iterable[str]) -> dict[str, str]:
    """Several ``NAME=HOST:PORT``, in order; a name given twice is a ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        name, address = parse_upstream(item)
        if name in out:
            raise ConfigError(f"--upstream {item}: the upstream {name!r} is declared twice")
        out[name] = address
    return out


class UpstreamCall:
    """One forwarded call in flight: its headers, its replies as they come, then how it ended."""

    __slots__ = ("_call", "_single", "upstream")

    def __init__(self, upstream: GrpcUpstream, call: Any, single: bool) -> None:
        self.upstream = upstream
        self._call = call  # a grpc Future-and-Call (single answer) or a response iterator
        self._single = single

    def headers(self) -> Metadata:
        """The upstream's initial metadata (waits for it, or for the call to end without any)."""
        return tuple(self._call.initial_metadata() or ())

    def replies(self) -> Iterator[bytes]:
        """The upstream's messages; ends quietly when the call fails (``outcome`` says how)."""
        try:
            if self._single:
                yield self._call.result()
            else:
                yield from self._call
        except grpc.RpcError:
            return
        except grpc.FutureCancelledError:
            return

    def outcome(self) -> tuple[grpc.StatusCode, str, Metadata]:
        """The final status code, its message and the trailing metadata (status details included)."""
        call = self._call
        return call.code(), call.details() or "", tuple(call.trailing_metadata() or ())

    @property
    def unreachable(self) -> bool:
        """Whether the call failed before reaching the upstream (nothing answered it)."""
        call = self._call
        if call.code() is not grpc.StatusCode.UNAVAILABLE:
            return False
        try:
            debug = call.debug_error_string() or ""
        except Exception:  # pragma: no cover - grpc always has one for a failed call
            debug = ""
        return _FROM_PEER not in debug

    def cancel(self) -> None:
        self._call.cancel()


class GrpcUpstream:
    """A real service reached over gRPC: calls are forwarded to it as raw bytes.

    ``credentials`` make the channel TLS; ``max_message_bytes`` bounds what it accepts (the serving side's
    limit). The channel is made on first use and lives until :meth:`close`.
    """

    def __init__(
        self,
        name: str,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self._credentials = credentials
        self._options = list(_CHANNEL_OPTIONS)
        if max_message_bytes is not None:
            self._options += [
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ]
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()
        self._callables: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"GrpcUpstream({self.name!r}, {self.address!r})"

    @property
    def channel(self) -> grpc.Channel:
        channel = self._channel
        if channel is None:
            with self._lock:
                if self._channel is None:
                    if self._credentials is not None:
                        self._channel = grpc.secure_channel(self.address, self._credentials, self._options)
                    else:
                        self._channel = grpc.insecure_channel(self.address, self._options)
                channel = self._channel
        return channel

    def _callable(self, spec: MethodSpec) -> Any:
        found = self._callables.get(spec.path)
        if found is None:
            channel = self.channel
            # No (de)serialisers: bytes go through as they came.
            factory = {
                "unary": channel.unary_unary,
                "server_streaming": channel.unary_stream,
                "client_streaming": channel.stream_unary,
                "bidi_streaming": channel.stream_stream,
            }[spec.kind]
            found = self._callables[spec.path] = factory(spec.path)
        return found

    def open(
        self,
        spec: MethodSpec,
        requests: bytes | Iterator[bytes],
        metadata: Metadata,
        timeout: float | None,
    ) -> UpstreamCall:
        """Starts the call: ``requests`` is the request's bytes, or an iterator of them for client streams."""
        method = self._callable(spec)
        if spec.kind in ("unary", "client_streaming"):
            return UpstreamCall(self, method.future(requests, timeout=timeout, metadata=metadata), True)
        return UpstreamCall(self, method(requests, timeout=timeout, metadata=metadata), False)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            self._callables.clear()
