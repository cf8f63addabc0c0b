"""Contracts: ``.proto`` files -> descriptors. protoc in-process (``protoc``), the descriptor catalog and
method specs (``catalog``), RPC kinds (``kinds``), server reflection (``reflection``) and a method's contract
as one hash (``fingerprint``).

The first stage of the flow contracts -> scenarios -> engine -> server -> testing/cli: it imports none of
the later ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtsvc._lazy import facade

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import Catalog, MethodSpec, load_catalog, normalize_method_name
    from virtsvc.contracts.fingerprint import method_fingerprint
    from virtsvc.contracts.protoc import GenResult, generate

__all__ = [
    "Catalog",
    "GenResult",
    "MethodSpec",
    "generate",
    "load_catalog",
    "method_fingerprint",
    "normalize_method_name",
]

__getattr__, __dir__ = facade(
    __name__,
    {
        "Catalog": "virtsvc.contracts.catalog",
        "MethodSpec": "virtsvc.contracts.catalog",
        "load_catalog": "virtsvc.contracts.catalog",
        "normalize_method_name": "virtsvc.contracts.catalog",
        "method_fingerprint": "virtsvc.contracts.fingerprint",
        "GenResult": "virtsvc.contracts.protoc",
        "generate": "virtsvc.contracts.protoc",
    },
    globals(),
)
