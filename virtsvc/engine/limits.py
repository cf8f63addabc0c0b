"""Concurrency limits: how many calls the whole server, and each session, may have in flight.

A limit is a counter behind a lock held only for the increment or the decrement, never across the call.
Beyond the limit a call is answered RESOURCE_EXHAUSTED at once, with a message naming the limit and how
to raise it, instead of queueing behind busy workers until everything times out.
"""

from __future__ import annotations

import itertools
import threading

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Gauge", "InFlight", "server_busy_message", "session_busy_message"]

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's own default, both directions


class Gauge:
    """Calls in flight against a ``limit``: ``enter()`` claims a place (False when full), ``leave()``
    frees it."""

    __slots__ = ("_lock", "limit", "value")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a concurrency limit must be at least 1, not {limit}")
        self.limit = limit
        self.value = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.value >= self.limit:
                return False
            self.value += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.value -= 1


class InFlight:
    """Calls that arrived and have not ended, counted without a lock on the call's path: ``next()`` on an
    :class:`itertools.count` is atomic under the GIL. Reading ``value`` advances both counts, which it
    makes up for: each reading advances both once, so they cancel. Ended is read first, so a reading never
    falls below the calls really in flight."""

    __slots__ = ("_lock", "arrived", "ended")

    def __init__(self) -> None:
        self.arrived = itertools.count()
        self.ended = itertools.count()
        self._lock = threading.Lock()  # readers take turns: one's advances would show in another's reading

    @property
    def value(self) -> int:
        with self._lock:
            ended = next(self.ended)
            return next(self.arrived) - ended


def server_busy_message(limit: int) -> str:
    return (
        f"too many concurrent calls: this virtual server answers at most {limit} at a time "
        f"(--max-concurrency {limit}); retry later, or raise the limit with --max-concurrency "
        "(VirtualServer(max_concurrency=...))"
    )


def session_busy_message(limit: int, scenario: str, session: str) -> str:
    where = f'session "{session}" of scenario "{scenario}"' if scenario else f'session "{session}"'
    return (
        f"too many concurrent calls in {where}: at most {limit} at a time per session "
        f"(--max-concurrency-per-session {limit}); retry later, or raise the limit with "
        "--max-concurrency-per-session (VirtualServer(max_concurrency_per_session=...))"
    )
