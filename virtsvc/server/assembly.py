"""Assembling a VirtualServer from paths: the one path shared by `virtsvc serve`, the pytest plugin and
``serve_in_process``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from virtsvc.contracts.catalog import load_catalog
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.server.options import ServeOptions
from virtsvc.server.virtual_server import VirtualServer

__all__ = ["build_server", "load_catalog", "load_scenarios", "serve_in_process"]

PathLike = str | Path


def build_server(
    protos: PathLike | None = None,
    scenarios: PathLike | Sequence[PathLike] = (),
    *,
    descriptors: PathLike | None = None,
    includes: Sequence[PathLike] = (),
    options: ServeOptions | None = None,
    **settings: Any,
) -> VirtualServer:
    """A VirtualServer (not started) for the contracts and scenarios at these paths; ``settings`` are
    :class:`ServeOptions` fields (``port=0``, ``default_scenario=...``) over ``options``."""
    catalog = load_catalog(protos, descriptors, includes)
    upstreams = settings.get("upstreams", options.upstreams if options is not None else {})
    return VirtualServer(catalog, load_scenarios(scenarios, catalog, upstreams), options, **settings)


@contextlib.contextmanager
def serve_in_process(
    protos: PathLike | None = None,
    scenarios: PathLike | Sequence[PathLike] = (),
    *,
    descriptors: PathLike | None = None,
    includes: Sequence[PathLike] = (),
    options: ServeOptions | None = None,
    **settings: Any,
) -> Iterator[VirtualServer]:
    """Runs virtual services in this process for the duration of a ``with`` block.

    >>> with serve_in_process(protos="protos", scenarios="scenarios") as server:  # doctest: +SKIP
    ...     channel = grpc.insecure_channel(server.address)
    """
    server = build_server(
        protos, scenarios, descriptors=descriptors, includes=includes, options=options, **settings
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(0)
