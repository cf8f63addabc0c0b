"""A method's gRPC cardinality in the words the manifest and scenarios use.

Its own module so that ``virtsvc gen`` names kinds exactly as the run time does
(:mod:`virtsvc.contracts.catalog` re-exports both names) without importing the protobuf runtime that
module needs.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["MethodKind", "method_kind"]

MethodKind = Literal["unary", "server_streaming", "client_streaming", "bidi_streaming"]


def method_kind(client_streaming: bool, server_streaming: bool) -> MethodKind:
    """The gRPC cardinality of a method, in the words the manifest and scenarios use."""
    if client_streaming and server_streaming:
        return "bidi_streaming"
    if client_streaming:
        return "client_streaming"
    if server_streaming:
        return "server_streaming"
    return "unary"
