"""The server: the grpc server around the engine (``virtual_server``), its assembly from paths
(``assembly``), the ``virtsvc serve`` sidecar (``sidecar``) and the admin service (``admin``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtsvc._lazy import facade

if TYPE_CHECKING:
    from virtsvc.server.assembly import build_server, serve_in_process
    from virtsvc.server.options import ServeOptions
    from virtsvc.server.virtual_server import VirtualServer, tls_credentials

__all__ = ["ServeOptions", "VirtualServer", "build_server", "serve_in_process", "tls_credentials"]

__getattr__, __dir__ = facade(
    __name__,
    {
        "build_server": "virtsvc.server.assembly",
        "serve_in_process": "virtsvc.server.assembly",
        "ServeOptions": "virtsvc.server.options",
        "VirtualServer": "virtsvc.server.virtual_server",
        "tls_credentials": "virtsvc.server.virtual_server",
    },
    globals(),
)
