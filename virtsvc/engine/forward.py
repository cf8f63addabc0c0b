"""What the engine needs of a real service to forward calls to it: the ``Upstream`` protocol.

Implemented by :mod:`virtsvc.upstream` (a grpc client); the engine never imports it, so the flow stays one
way. Also the one rule for what of the caller's metadata is forwarded: everything but virtsvc's own routing
(``x-virtsvc-*`` headers and ``virtsvc-*`` baggage members), which means nothing to the real service.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import grpc

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import MethodSpec

__all__ = ["MODES", "Metadata", "Upstream", "UpstreamCall", "forwarded_metadata"]

Metadata = tuple[tuple[str, "str | bytes"], ...]

#: Server-wide modes, after Hoverfly's: simulate (scenarios only), spy (scenarios first, then the real
#: service), passthrough (the real service only).
MODES = ("simulate", "spy", "passthrough")

_ROUTING_PREFIX = "x-virtsvc-"
_BAGGAGE_PREFIX = "virtsvc-"
# Set by grpc itself on every call it makes; forwarding the caller's would send two.
_TRANSPORT_KEYS = frozenset({"user-agent", "grpc-accept-encoding", "grpc-encoding", "te", "content-type"})


class UpstreamCall(Protocol):
    """A forwarded call in flight."""

    def headers(self) -> Metadata:
        """The upstream's initial metadata (waits for it, or for the call to end without any)."""
        ...

    def replies(self) -> Iterator[bytes]:
        """The upstream's messages as they come; ends when the call does."""
        ...

    def outcome(self) -> tuple[grpc.StatusCode, str, Metadata]:
        """Status code, message and trailing metadata, once ``replies`` is exhausted."""
        ...

    @property
    def unreachable(self) -> bool:
        """True when the call never reached the upstream (nothing listening, DNS, TLS)."""
        ...

    def cancel(self) -> None: ...


class Upstream(Protocol):
    """A real service, by name, that calls can be forwarded to."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    def open(
        self, spec: MethodSpec, requests: bytes | Iterator[bytes], metadata: Metadata, timeout: float | None
    ) -> UpstreamCall:
        """Starts a call: the request's bytes, or an iterator of them for client-streaming and bidi calls."""
        ...


def forwarded_metadata(pairs: Iterable[tuple[str, str | bytes]]) -> Metadata:
    """The caller's metadata as forwarded: virtsvc's routing headers and baggage members taken out."""
    out: list[tuple[str, str | bytes]] = []
    for key, value in pairs:
        if key.startswith(_ROUTING_PREFIX) or key in _TRANSPORT_KEYS or key.startswith(":"):
            continue
        if key == "baggage" and isinstance(value, str):
            members = [m for m in value.split(",") if m.strip() and not m.strip().startswith(_BAGGAGE_PREFIX)]
            if not members:
                continue
            value = ",".join(m.strip() for m in members)
        out.append((key, value))
    return tuple(out)
