"""Test helpers: one test's view of a virtual server (``service``) and the pytest plugin (``plugin``).

The pytest plugin hands ``VirtualService`` out as the ``virtual_service`` fixture; it works without pytest
too::

    from virtsvc.testing import VirtualService

    with serve_in_process(protos="protos", scenarios="scenarios") as server:
        with VirtualService(server) as service:      # a fresh session; verified and dropped on exit
            service.use("checkout-happy")
            run_checkout(service.channel())

Nothing is imported until used: the plugin loads with every pytest run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtsvc._lazy import facade

if TYPE_CHECKING:
    from virtsvc.testing.service import CallRecord, InlineRule, RemoteServer, VirtualService, new_session_id
    from virtsvc.testing.streams import OpenStream

__all__ = ["CallRecord", "InlineRule", "OpenStream", "RemoteServer", "VirtualService", "new_session_id"]

__getattr__, __dir__ = facade(
    __name__,
    {
        name: "virtsvc.testing.streams" if name == "OpenStream" else "virtsvc.testing.service"
        for name in __all__
    },
    globals(),
)
