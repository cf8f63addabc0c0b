"""virtsvc: virtual gRPC services from .proto contracts and scenario scripts.

The public API is what this module exports; everything in ``virtsvc._*`` modules is private. Names are
imported on first use, so that merely loading the pytest plugin (every pytest run in an environment where
virtsvc is installed) does not pay for importing grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import Catalog, MethodSpec
    from virtsvc.engine.pipeline import current_data as data
    from virtsvc.engine.pipeline import current_session as session
    from virtsvc.errors import ConfigError, DescriptorError, Problem, ProtoError, ScenarioError, VirtsvcError
    from virtsvc.scenarios.builder import Scenario
    from virtsvc.server.assembly import serve_in_process
    from virtsvc.server.virtual_server import VirtualServer

__version__ = "0.1.0"

__all__ = [
    "Catalog",
    "ConfigError",
    "DescriptorError",
    "MethodSpec",
    "Problem",
    "ProtoError",
    "Scenario",
    "ScenarioError",
    "VirtsvcError",
    "VirtualServer",
    "__version__",
    "data",
    "serve_in_process",
    "session",
]

_WHERE = {
    "Catalog": ("virtsvc.contracts.catalog", "Catalog"),
    "MethodSpec": ("virtsvc.contracts.catalog", "MethodSpec"),
    "ConfigError": ("virtsvc.errors", "ConfigError"),
    "DescriptorError": ("virtsvc.errors", "DescriptorError"),
    "Problem": ("virtsvc.errors", "Problem"),
    "ProtoError": ("virtsvc.errors", "ProtoError"),
    "ScenarioError": ("virtsvc.errors", "ScenarioError"),
    "VirtsvcError": ("virtsvc.errors", "VirtsvcError"),
    "Scenario": ("virtsvc.scenarios.builder", "Scenario"),
    "VirtualServer": ("virtsvc.server.virtual_server", "VirtualServer"),
    "serve_in_process": ("virtsvc.server.assembly", "serve_in_process"),
    "session": ("virtsvc.engine.pipeline", "current_session"),
    "data": ("virtsvc.engine.pipeline", "current_data"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'virtsvc' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
