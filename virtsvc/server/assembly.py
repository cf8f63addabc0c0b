"""Assembling a VirtualServer from paths: the one path shared by `virtsvc serve`, the pytest plugin and
``serve_in_process``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from virtsvc.contracts.catalog import load_catalog
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.server.virtual_server import VirtualServer

__all__ = ["load_catalog", "load_scenarios", "serve_in_process"]

PathLike = str | Path


@contextlib.contextmanager
def serve_in_process(
    protos: PathLike | None = None,
    scenarios: PathLike | Sequence[PathLike] = (),
    *,
    descriptors: PathLike | None = None,
    includes: Sequence[PathLike] = (),
    default_scenario: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> Iterator[VirtualServer]:
    """Runs virtual services in this process for the duration of a ``with`` block.

    >>> with serve_in_process(protos="protos", scenarios="scenarios") as server:  # doctest: +SKIP
    ...     channel = grpc.insecure_channel(server.address)
    """
    catalog = load_catalog(protos, descriptors, includes)
    paths = [scenarios] if isinstance(scenarios, (str, Path)) else list(scenarios)
    server = VirtualServer(
        catalog,
        load_scenarios(paths, catalog),
        host=host,
        port=port,
        default_scenario=default_scenario,
        **options,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(0)
