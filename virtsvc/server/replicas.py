"""Admin changes every replica serves: scenarios put and deleted through the admin API, on a shared store.

The admin service does not change its own registry: it appends the change to the store's log, and every
process (the one that took the admin call too) applies the log in its order. Each call's session script
also reads the log's length, so a process hears of a change on the first call after the admin call
returned, and applies it before answering that call. Session rules and resets need nothing here: they
live in the store already.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from virtsvc import _logs
from virtsvc.errors import VirtsvcError
from virtsvc.server.admin import compile_put, install

if TYPE_CHECKING:
    from virtsvc.server.virtual_server import VirtualServer

__all__ = ["SharedChanges"]

log = _logs.get_logger("virtsvc.replicas")


class SharedChanges:
    """The admin log of one shared store, applied to one server's registry in order."""

    def __init__(self, vserver: VirtualServer) -> None:
        self.vserver = vserver
        store: Any = vserver.store  # a shared store (RedisStore): the Store protocol has no admin log
        self.store = store
        self._lock = threading.Lock()  # one applier: calls that hear a change at once wait for it
        store.on_changes(self.hear)

    def publish(self, change: dict[str, Any]) -> None:
        """Adds a change for every replica and applies it (and any before it) here before returning."""
        self.hear(self.store.add_change(change))

    def catch_up(self) -> None:
        """Applies what the log holds now (a replica starting after admin changes were made)."""
        self.store.check_changes()

    def hear(self, length: int) -> None:
        with self._lock:
            seen = self.store.changes_seen
            if length == seen:
                return  # another call applied it while this one waited
            if length < seen:
                # The store lost its log (Redis restarted without persistence): the new log is applied from
                # its start; what this process had applied before stays.
                log.warning("replicas.changes_lost", applied=seen, now=length)
                seen = 0
            for change in self.store.changes(seen):
                self._apply(change)
                seen += 1
            self.store.changes_seen = seen

    def _apply(self, change: dict[str, Any]) -> None:
        vserver = self.vserver
        if change.get("op") == "delete":
            name = change["name"]
            vserver.registry.delete(name)
            vserver.journal.drop_scenario(name)
            log.info("replicas.scenario.deleted", name=name)
            return
        try:
            compiled = compile_put(vserver, change["text"])
        except VirtsvcError as exc:
            # Put by a replica that loaded other contracts or scenarios: this one cannot serve it.
            log.error("replicas.scenario.refused", problems=str(exc))
            return
        install(vserver.registry, compiled)
        log.info("replicas.scenario.put", names=[s.name for s in compiled])
