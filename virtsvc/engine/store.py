"""Where sessions' state lives, behind one ``Store`` protocol with explicit operations.

A session (one test's isolated view of one scenario) holds what makes calls stateful: how often each rule
answered (``times``), where each sequence stands, its session-scoped rules, its user data and its call
count. Everything that changes goes through the operations below, so a shared store (Redis) can implement the
same protocol for several processes; what cannot be shared stays process-local and is looked up by key:
compiled rules and Python handlers (a session's rules are held as a :class:`RuleSet`, which a shared store
would keep as its source and compile once per process) and the random generators (seeded from the names,
so every process draws the same values).

Dropping a session (reset, expiry, a deleted scenario) is an event: ``subscribe`` is how the journal and
others hear of it. ``tests/test_store.py`` is the conformance suite every implementation runs.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from virtsvc import _logs
from virtsvc.scenarios.model import Rule

__all__ = [
    "DEFAULT_SESSION",
    "MemorySession",
    "MemoryStore",
    "PutRule",
    "RuleChange",
    "RuleSet",
    "SessionState",
    "Store",
]

DEFAULT_SESSION = "default"

log = _logs.get_logger("virtsvc.store")

DropListener = Callable[[str, str], None]  # (scenario, session id)


@dataclass(frozen=True)
class PutRule:
    """A rule an effect put into a session: its id, its data as written (JSON-able, for shared stores, which
    compile it again in each process) and the compiled rule."""

    id: str
    scenario: str  # the scenario whose rule had the effect (its rules' counters are named after it)
    data: Any
    rule: Rule

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "scenario": self.scenario, "rule": self.data}


# One change an effect makes: put a rule, or remove the rules with a ref (``Rule.ref``).
RuleChange = tuple[str, PutRule] | tuple[str, str]  # ("put", PutRule) | ("remove", ref)


class RuleSet(dict[str, tuple[Rule, ...]]):
    """A session's own rules by method, best first (higher priority; ties keep their order).

    Never changed once made: replacing a session's rules is one assignment, so a call in flight sees the old
    set or the new one. A dict underneath, because every call reads it (``get`` and truth at C speed).

    ``base`` are the rules it was made from (``source`` their source); effects then put rules (``puts``,
    tried first, the latest first on equal priority) and remove rules by ref (``gone``): ``hidden`` are the
    refs the scenario's own rules are no longer answered by in this session.
    """

    __slots__ = ("base", "gone", "hidden", "puts", "source")

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        source: Any = None,
        *,
        puts: Sequence[PutRule] = (),
        gone: Iterable[str] = (),
    ) -> None:
        self.base = tuple(rules)
        self.source = source  # what the rules were compiled from (text or data), for stores that persist it
        self.puts = tuple(puts)
        self.gone = frozenset(gone)
        self.hidden = self.gone | {p.id for p in self.puts}
        kept = [r for r in self.base if r.ref not in self.hidden] if self.hidden else self.base
        by_method: dict[str, list[Rule]] = {}
        for rule in (*(p.rule for p in reversed(self.puts)), *kept):
            by_method.setdefault(rule.method, []).append(rule)
        # sorted is stable: ties keep the order they were given in
        super().__init__((m, tuple(sorted(rs, key=lambda r: -r.priority))) for m, rs in by_method.items())

    def rules(self) -> list[Rule]:
        return [r for rs in self.values() for r in rs]

    def counter_keys(self) -> set[str]:
        return {k for r in self.rules() for k in _counters(r)}

    @property
    def changed_by_effects(self) -> bool:
        return bool(self.puts or self.gone)

    def changed(self, changes: Iterable[RuleChange]) -> RuleSet:
        """This set with the effects' ``changes`` applied in order (a put replaces the put of its id)."""
        puts = list(self.puts)
        gone = set(self.gone)
        for kind, value in changes:
            if kind == "put":
                assert isinstance(value, PutRule)
                puts = [p for p in puts if p.id != value.id] + [value]
            else:
                assert isinstance(value, str)
                puts = [p for p in puts if p.id != value]
                gone.add(value)
        return RuleSet(self.base, self.source, puts=puts, gone=gone)

    def effects_json(self) -> dict[str, Any]:
        """The effects' changes as data (``RuleSet.changed`` of the same changes rebuilds them)."""
        return {"put": [p.to_json() for p in self.puts], "gone": sorted(self.gone)}


EMPTY_RULES = RuleSet()


class SessionState(Protocol):
    """One session's state, as the engine reads and changes it on every call."""

    @property
    def scenario(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def calls(self) -> int: ...

    @property
    def rules(self) -> RuleSet:
        """Its session-scoped rules (empty when it has none)."""
        ...

    @property
    def data(self) -> MutableMapping[str, Any]:
        """The dict a Python handler keeps state in (``virtsvc.session()``)."""
        ...

    @property
    def clock(self) -> Any:
        """Its virtual clock (``virtsvc.engine.clock.VirtualClock``), or None while it runs on wall time."""
        ...

    @property
    def rng(self) -> random.Random:
        """Process-local, seeded from the scenario and session names: reruns draw the same values."""
        ...

    def touch(self) -> int:
        """Counts a call; returns its 1-based number within the session."""
        ...

    def take(self, counter: str, limit: int) -> int:
        """Claims one use of a rule limited to ``limit`` uses: its 1-based number, 0 once it is used up."""
        ...

    def advance(self, counter: str) -> int:
        """The 0-based position of this call in a sequence, moving the sequence on."""
        ...

    def used(self, counter: str) -> int: ...

    def enter(self, limit: int) -> bool:
        """Claims a place among the session's calls in flight; False when ``limit`` already run."""
        ...

    def leave(self) -> None: ...

    def records(self) -> dict[str, dict[str, Any]]:
        """The session's changes to its scenario's data: collection -> key -> the record put (JSON data) or
        None where one was removed, in the order the keys were first changed."""
        ...

    def put_record(self, collection: str, key: str, record: dict[str, Any] | None) -> None:
        """Puts a record (None: removes it) for this session; a key changed again keeps its place."""


class Store(Protocol):
    """Where sessions live. Look-ups cost the same however many sessions exist."""

    def session(
        self,
        scenario: str,
        session_id: str,
        *,
        calling: bool = False,
        step: Callable[[], str | None] | None = None,
    ) -> SessionState:
        """The session, made on first use. ``calling``: for a call, whose next step is ``touch()``; a store
        may count the call in the same round trip. ``step``: gives the counter the call will move with
        ``advance()`` if the session has no rules of its own (None: none is sure); a shared store may move
        it in the look-up's round trip, and ``advance()`` then returns that step."""
        ...

    def find(self, scenario: str, session_id: str) -> SessionState | None: ...

    def put_rules(self, scenario: str, session_id: str, rules: RuleSet) -> None:
        """Replaces the session's own rules (making the session if needed); counters of rules kept by key
        stay where they were."""

    def clear_rules(self, scenario: str, session_id: str) -> int:
        """Removes the session's own rules and their counters; returns how many rules it had."""
        ...

    def change_rules(self, scenario: str, session_id: str, changes: Sequence[RuleChange]) -> None:
        """Applies a rule's effects to the session's rules, atomically: concurrent effects on one session
        all take hold; a put rule's counters start over."""
        ...

    def reset(self, scenario: str, session_id: str) -> bool:
        """Drops one session (state, rules, data); False when it did not exist."""
        ...

    def drop_scenario(self, scenario: str) -> int:
        """Drops every session of a scenario; returns how many."""
        ...

    def expire(self, now: float | None = None) -> int:
        """Drops sessions idle past the TTL; returns how many."""
        ...

    def subscribe(self, listener: DropListener) -> Callable[[], None]:
        """Calls ``listener(scenario, session_id)`` when a session is dropped; returns the unsubscriber."""
        ...

    def keys(self) -> list[tuple[str, str]]:
        """Every live session's (scenario, session id)."""
        ...

    def __len__(self) -> int: ...


class MemorySession:
    """A session in this process's memory. Thread-safe: calls of one session may run in parallel."""

    __slots__ = (
        "_counters",
        "_lock",
        "_records",
        "_rng",
        "calls",
        "clock",
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
        self.rules: RuleSet = EMPTY_RULES
        self.clock: Any = None  # its VirtualClock (virtsvc.engine.clock) once switched to virtual time
        self._records: dict[str, dict[str, Any]] | None = None  # most sessions never change their data

    @property
    def rng(self) -> random.Random:
        if self._rng is None:
            self._rng = seeded_rng(self.scenario, self.id)
        return self._rng

    def touch(self) -> int:
        with self._lock:
            self.calls += 1
            self.last_used = time.monotonic()
            return self.calls

    def enter(self, limit: int) -> bool:
        with self._lock:
            if self.inflight >= limit:
                return False
            self.inflight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1

    def take(self, counter: str, limit: int) -> int:
        with self._lock:
            used = self._counters.get(counter, 0)
            if used >= limit:
                return 0
            self._counters[counter] = used + 1
            return used + 1

    def used(self, counter: str) -> int:
        with self._lock:
            return self._counters.get(counter, 0)

    def advance(self, counter: str) -> int:
        with self._lock:
            pos = self._counters.get(counter, 0)
            self._counters[counter] = pos + 1
            return pos

    def records(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {c: dict(keys) for c, keys in (self._records or {}).items()}

    def put_record(self, collection: str, key: str, record: dict[str, Any] | None) -> None:
        with self._lock:
            if self._records is None:
                self._records = {}
            self._records.setdefault(collection, {})[key] = record

    def _forget(self, counters: set[str]) -> None:
        with self._lock:
            for counter in counters:
                self._counters.pop(counter, None)


def _counters(rule: Rule) -> tuple[str, str, str]:
    return (rule.times_key, rule.sequence_key, rule.attempt_key)


def seeded_rng(scenario: str, session_id: str) -> random.Random:
    """A generator seeded from the names: the same session draws the same values in every process."""
    digest = hashlib.blake2b(f"{scenario}\0{session_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


class MemoryStore:
    """The embedded default: a dict keyed by (scenario, session), idle sessions expiring after ``ttl``."""

    def __init__(self, ttl: float = 3600.0) -> None:
        self.ttl = ttl
        self._sessions: dict[tuple[str, str], MemorySession] = {}
        self._lock = threading.Lock()
        self._listeners: list[DropListener] = []
        self._next_sweep = time.monotonic() + min(ttl, 60.0)

    def session(
        self,
        scenario: str,
        session_id: str,
        *,
        calling: bool = False,
        step: Callable[[], str | None] | None = None,
    ) -> MemorySession:
        # ``step`` is not needed: an advance here is as cheap as the look-up.
        key = (scenario, session_id)
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    session = self._sessions[key] = MemorySession(scenario, session_id)
        now = time.monotonic()
        if now >= self._next_sweep:
            self.expire(now)
        return session

    def find(self, scenario: str, session_id: str) -> MemorySession | None:
        return self._sessions.get((scenario, session_id))

    def put_rules(self, scenario: str, session_id: str, rules: RuleSet) -> None:
        self.session(scenario, session_id).rules = rules

    def change_rules(self, scenario: str, session_id: str, changes: Sequence[RuleChange]) -> None:
        session = self.session(scenario, session_id)
        with self._lock:  # one read-modify-write at a time: no effect is lost to a concurrent one
            session.rules = session.rules.changed(changes)
        session._forget({k for _kind, p in changes if isinstance(p, PutRule) for k in _counters(p.rule)})

    def clear_rules(self, scenario: str, session_id: str) -> int:
        session = self.find(scenario, session_id)
        if session is None:
            return 0
        old, session.rules = session.rules, EMPTY_RULES
        session._forget(old.counter_keys())  # the next put starts their sequences and times over
        return len(old.rules())

    def reset(self, scenario: str, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop((scenario, session_id), None)
        if session is not None:
            self._dropped([session])
        return session is not None

    def drop_scenario(self, scenario: str) -> int:
        with self._lock:
            dropped = [self._sessions.pop(k) for k in [k for k in self._sessions if k[0] == scenario]]
        self._dropped(dropped)
        return len(dropped)

    def expire(self, now: float | None = None) -> int:
        """Drops sessions idle for longer than the TTL; runs at most once a minute from ``session``."""
        now = time.monotonic() if now is None else now
        self._next_sweep = now + min(self.ttl, 60.0)
        limit = now - self.ttl
        with self._lock:
            stale = [k for k, s in self._sessions.items() if s.last_used < limit]
            dropped = [self._sessions.pop(k) for k in stale]
        self._dropped(dropped)
        return len(dropped)

    def subscribe(self, listener: DropListener) -> Callable[[], None]:
        self._listeners = [*self._listeners, listener]

        def unsubscribe() -> None:
            self._listeners = [x for x in self._listeners if x is not listener]

        return unsubscribe

    def _dropped(self, sessions: Iterable[MemorySession]) -> None:
        for session in sessions:
            if session.clock is not None:
                session.clock.close()  # releases the calls still held on it
            for listener in self._listeners:
                try:
                    listener(session.scenario, session.id)
                except Exception as exc:  # a listener's bug must not stop the others, nor the caller
                    log.warning("store.listener_failed", error=f"{type(exc).__name__}: {exc}")

    def keys(self) -> list[tuple[str, str]]:
        return list(self._sessions)

    def __iter__(self) -> Iterator[MemorySession]:
        """The live sessions (this store's own view, for tests and tools in this process)."""
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)
