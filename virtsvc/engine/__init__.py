"""The engine: a call -> an answer. The router (scenario, session and rule choice, ``times``, sequences),
the per-call pipeline and its answers, the store of sessions' state, the journal and concurrency limits.

Imports the contracts and scenarios stages only, never the server, CLI or testing packages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtsvc._lazy import facade

if TYPE_CHECKING:
    from virtsvc.engine.journal import Entry, Journal
    from virtsvc.engine.pipeline import Dispatcher
    from virtsvc.engine.router import Registry, Router
    from virtsvc.engine.store import MemoryStore, Store

__all__ = ["Dispatcher", "Entry", "Journal", "MemoryStore", "Registry", "Router", "Store"]

__getattr__, __dir__ = facade(
    __name__,
    {
        "Entry": "virtsvc.engine.journal",
        "Journal": "virtsvc.engine.journal",
        "Dispatcher": "virtsvc.engine.pipeline",
        "Registry": "virtsvc.engine.router",
        "Router": "virtsvc.engine.router",
        "MemoryStore": "virtsvc.engine.store",
        "Store": "virtsvc.engine.store",
    },
    globals(),
)
