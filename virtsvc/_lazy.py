"""Lazy package facades: a package's public names are imported on first use.

``virtsvc gen`` must not pay for grpc or protobuf's descriptor machinery, and loading the pytest plugin
(every pytest run where virtsvc is installed) must not import grpc, so no package ``__init__`` imports its
modules eagerly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def facade(
    package: str, where: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``where`` maps each public name to its module."""

    def __getattr__(name: str) -> Any:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
