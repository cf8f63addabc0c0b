"""Real services that calls are forwarded to: ``--upstream NAME=HOST:PORT`` and its gRPC client.

The engine only knows the ``Upstream`` protocol (:mod:`virtsvc.engine.forward`); this package implements it
with one grpc channel per upstream, moving raw bytes so that messages cross unchanged.
"""

from __future__ import annotations

from virtsvc.upstream.client import GrpcUpstream, parse_upstream, parse_upstreams
from virtsvc.upstream.reflection import catalog_from_reflection

__all__ = ["GrpcUpstream", "catalog_from_reflection", "parse_upstream", "parse_upstreams"]
