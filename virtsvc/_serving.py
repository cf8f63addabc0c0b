"""Assembling a VirtualServer from paths: the one path shared by `virtsvc serve`, the pytest plugin and
``serve_in_process``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from virtsvc._model import CompiledScenario
from virtsvc.descriptors import Catalog
from virtsvc.errors import ConfigError
from virtsvc.server import VirtualServer

__all__ = ["load_catalog", "load_scenarios", "serve_in_process"]

PathLike = str | Path


def load_catalog(
    protos: PathLike | None = None,
    descriptors: PathLike | None = None,
    includes: Sequence[PathLike] = (),
) -> Catalog:
    """The descriptors to serve: an exported/generated descriptor set, or a proto tree compiled on the fly."""
    if descriptors is not None and protos is not None:
        raise ConfigError("give either protos or descriptors, not both")
    if descriptors is not None:
        return Catalog.from_file(Path(descriptors))
    if protos is not None:
        return Catalog.from_protos(Path(protos), [Path(i) for i in includes])
    raise ConfigError(
        "nothing to serve: give protos (a directory of .proto files) or descriptors (a descriptor set)"
    )


def load_scenarios(paths: Sequence[PathLike], catalog: Catalog) -> list[CompiledScenario]:
    """Loads and validates scenario files and scripts; raises ScenarioError listing every problem."""
    from virtsvc._loader import compile_sources, load_sources

    if not paths:
        return []
    return compile_sources(load_sources([Path(p) for p in paths]), catalog)


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
