"""virtsvc: virtual gRPC services from .proto contracts and scenario scripts.

The public API is what this module exports; everything in ``virtsvc._*`` modules is private.
"""

from __future__ import annotations

from virtsvc._serving import serve_in_process
from virtsvc.descriptors import Catalog, MethodSpec
from virtsvc.errors import ConfigError, DescriptorError, Problem, ProtoError, ScenarioError, VirtsvcError
from virtsvc.handlers import current_session as session
from virtsvc.server import VirtualServer

__version__ = "0.1.0"


def __getattr__(name: str) -> object:  # temporary while the scenario builder lands
    if name == "Scenario":
        from virtsvc.scenario import Scenario

        return Scenario
    raise AttributeError(name)

__all__ = [
    "Catalog",
    "ConfigError",
    "DescriptorError",
    "MethodSpec",
    "Problem",
    "ProtoError",
    "Scenario",
    "ScenarioError",
    "VirtualServer",
    "VirtsvcError",
    "__version__",
    "serve_in_process",
    "session",
]
