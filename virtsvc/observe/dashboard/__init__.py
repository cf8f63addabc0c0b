"""The live dashboard: a web page of a virtual server's scenarios, calls and figures, fed by its journal.

``virtsvc serve --dashboard-port N`` (``ServeOptions.dashboard_port``) starts one beside the gRPC port. The
page is static HTML, CSS and JavaScript shipped in the package (no build step, nothing fetched from the
network); it follows the calls through server-sent events from the journal's subscribers.
"""

from __future__ import annotations

from virtsvc.observe.dashboard.hub import Hub
from virtsvc.observe.dashboard.web import Dashboard

__all__ = ["Dashboard", "Hub"]
