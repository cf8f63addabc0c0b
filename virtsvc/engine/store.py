"""Per (scenario, session) state behind one Store interface.

A Session holds what makes calls stateful: how often each rule has answered (``times``), where each
sequence stands, the session's seeded random generator and its user data. The in-memory store is the
embedded default; a shared store (Redis) implements the same interface so several servers can share state.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

__all__ = ["DEFAULT_SESSION", "MemoryStore", "Session", "Store"]

DEFAULT_SESSION = "default"


class Session:
    """The state of one session of one scenario. Thread-safe: calls of one session may run in parallel."""

    __slots__ = (
        "_counters",
        "_lock",
        "_rng",
        "calls",
        "data",
        "id",
        "inflight",
        "last_used",
        "rules",
        "scenario",
    )

    def __init__(self, scenario: str, session_id: str) -> None:
        self.scenario = scenario
        self.id = session_id
        self.calls = 0
        self.inflight = 0  # calls in progress, counted only under --max-concurrency-per-session
        self.last_used = time.monotonic()
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self._rng: random.Random | None = None  # made on first use: most sessions never draw (2.9 KB each)
        self.data: dict[str, Any] = {}
        # Session-scoped rules (admin PutSessionRules, pytest inline rules): method -> rules, best first.
        self.rules: dict[str, tuple[Any, ...]] = {}

    @property
    def rng(self) -> random.Random:
        """The session's random generator, seeded from its names so a rerun sees the same values."""
        if self._rng is None:
            seed = int.from_bytes(
                hashlib.blake2b(f"{self.scenario}\0{self.id}".encode(), digest_size=8).digest(), "big"
            )
            self._rng = random.Random(seed)
        return self._rng

    def touch(self) -> int:
        """Counts a call; returns its 1-based number within the session."""
        with self._lock:
            self.calls += 1
            self.last_used = time.monotonic()
            return self.calls

    def enter(self, limit: int) -> bool:
        """Claims a place among the session's calls in flight; False when ``limit`` are already running."""
        with self._lock:
            if self.inflight >= limit:
                return False
            self.inflight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1

    def take(self, key: str, times: int) -> bool:
        """Claims one use of a rule limited to ``times`` uses; False once it is used up."""
        with self._lock:
            used = self._counters.get(key, 0)
            if used >= times:
                return False
            self._counters[key] = used + 1
            return True

    def used(self, key: str) -> int:
        with self._lock:
            return self._counters.get(key, 0)

    def forget(self, key_part: str) -> None:
        """Drops the counters whose key contains ``key_part`` (e.g. those of the session's own rules)."""
        with self._lock:
            self._counters = {k: v for k, v in self._counters.items() if key_part not in k}

    def advance(self, key: str) -> int:
        """The 0-based position of this call in a sequence, and moves the sequence on."""
        with self._lock:
            pos = self._counters.get(key, 0)
            self._counters[key] = pos + 1
            return pos


class Store(Protocol):
    """Where sessions live. Lookups cost the same however many sessions exist."""

    def get(self, scenario: str, session_id: str) -> Session: ...

    def find(self, scenario: str, session_id: str) -> Session | None: ...

    def reset(self, scenario: str, session_id: str) -> bool: ...

    def drop_scenario(self, scenario: str) -> int: ...

    def expire(self, now: float | None = None) -> int: ...

    def __iter__(self) -> Iterator[Session]: ...

    def __len__(self) -> int: ...


class MemoryStore:
    """The embedded default: a dict keyed by (scenario, session), idle sessions expiring after ``ttl``."""

    def __init__(self, ttl: float = 3600.0, on_drop: Callable[[Session], None] | None = None) -> None:
        self.ttl = ttl
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.Lock()
        self._on_drop = on_drop
        self._next_sweep = time.monotonic() + min(ttl, 60.0)

    def get(self, scenario: str, session_id: str) -> Session:
        key = (scenario, session_id)
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    session = self._sessions[key] = Session(scenario, session_id)
        now = time.monotonic()
        if now >= self._next_sweep:
            self.expire(now)
        return session

    def find(self, scenario: str, session_id: str) -> Session | None:
        return self._sessions.get((scenario, session_id))

    def reset(self, scenario: str, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop((scenario, session_id), None)
        if session is not None and self._on_drop:
            self._on_drop(session)
        return session is not None

    def drop_scenario(self, scenario: str) -> int:
        with self._lock:
            keys = [k for k in self._sessions if k[0] == scenario]
            dropped = [self._sessions.pop(k) for k in keys]
        for session in dropped:
            if self._on_drop:
                self._on_drop(session)
        return len(dropped)

    def expire(self, now: float | None = None) -> int:
        """Drops sessions idle for longer than the TTL; runs at most once a minute from ``get``."""
        now = time.monotonic() if now is None else now
        self._next_sweep = now + min(self.ttl, 60.0)
        limit = now - self.ttl
        with self._lock:
            stale = [k for k, s in self._sessions.items() if s.last_used < limit]
            dropped = [self._sessions.pop(k) for k in stale]
        for session in dropped:
            if self._on_drop:
                self._on_drop(session)
        return len(dropped)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)
