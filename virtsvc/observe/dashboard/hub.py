"""What the dashboard knows: the journal's entries handed off, counted and fanned out to the browsers.

The journal calls :meth:`Hub.hear` on the serving thread of every call; it only puts the entry on a bounded
queue and returns, so no browser and no lock of the dashboard ever holds up a call. One thread of the hub
takes entries off that queue, counts them (per scenario and method: calls, errors, unmatched, a latency
histogram; per rule: its uses), keeps the most recent ones for their details, and offers each one to every
connected browser's own bounded queue. A browser that falls behind is not waited for: its queue is marked
lagging and it is sent a fresh snapshot instead of the entries it missed.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from virtsvc import _logs

if TYPE_CHECKING:
    from virtsvc.engine.journal import Entry, Journal
    from virtsvc.engine.router import Registry
    from virtsvc.scenarios.model import CompiledScenario, Rule

__all__ = ["BUCKETS_MS", "Client", "Hub", "rule_summary", "scenario_json", "summary"]

log = _logs.get_logger("virtsvc.dashboard")

#: Upper bounds of the latency histogram's buckets, in milliseconds; one more bucket holds the rest.
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
INTAKE = 10_000  # entries waiting for the hub's thread; past it they are counted as missed
RECENT = 2_000  # calls kept for their details (the journal keeps its own, bounded per session)
UNMATCHED = 100  # unmatched calls kept for their near-miss text
SNAPSHOT_CALLS = 500  # calls a new browser is sent
CLIENT_BACKLOG = 1_000  # entries waiting for one browser before it is resynchronised
DRAIN_EVERY = 0.05  # seconds the hub's thread sleeps when it finds nothing handed over
BATCH = 1_000  # entries counted under one hold of the lock
MAX_KEYS = 1_000  # (scenario, method) pairs counted apart; calls to unknown scenarios can name any
SAMPLES = 1_000  # recent durations per (scenario, method), for the percentiles
OTHER = "(other)"


def summary(entry: Entry) -> dict[str, Any]:
    """An entry's line in the tail: what it needs without decoding a message (the details do that)."""
    return {
        "seq": entry.seq,
        "scenario": entry.scenario,
        "session": entry.session,
        "method": entry.method,
        "kind": entry.spec.kind,
        "code": entry.code.name,
        "message": entry.message,
        "rule": entry.rule,
        "near_miss": entry.near_miss,
        "forwarded": entry.forwarded,
        "started_at": entry.started_at,
        "duration_ms": round(entry.duration * 1000, 3),
        "delay_ms": round(entry.delay * 1000, 3),
    }


def rule_summary(rule: Rule) -> str:
    """What a rule answers, in a few words: ``reply``, ``status UNAVAILABLE``, ``sequence of 2``..."""
    if rule.handler is not None:
        what = "handler"
    elif rule.is_sequence:
        what = f"sequence of {len(rule.steps)}"
    elif rule.steps:
        step = rule.steps[0]
        if step.passthrough is not None:
            what = f"passthrough {step.passthrough}"
        elif step.fault is not None:
            what = f"fault {step.fault.name.lower()}"
        elif step.stream is not None:
            what = f"stream of {len(step.stream)}"
        elif step.each_request is not None:
            what = "each request"
        elif step.status is not None and not step.status.ok:
            what = f"status {step.status.code.name}"
        else:
            what = "reply"
    else:
        what = "reply"
    extra = [
        *(["when"] if rule.when is not None else []),
        *([f"times {rule.times}"] if rule.times is not None else []),
        *([f"priority {rule.priority}"] if rule.priority else []),
    ]
    return ", ".join([what, *extra])


def _rules(scenario: CompiledScenario) -> list[Rule]:
    """A scenario's own rules, then its ``passthrough:`` fallback (method ``*``) when it has one."""
    fallback = scenario.fallback
    return [*scenario.rules, *([fallback] if fallback is not None else [])]


def scenario_json(scenario: CompiledScenario) -> dict[str, Any]:
    return {
        "name": scenario.name,
        "version": scenario.version,
        "source": str(scenario.location),
        "extends": scenario.extends,
        "rules": [
            {"where": r.where, "method": r.method, "answers": rule_summary(r)} for r in _rules(scenario)
        ],
    }


class _Stats:
    """Figures of one (scenario, method)."""

    __slots__ = ("buckets", "calls", "codes", "errors", "samples", "total_ms", "unmatched")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0  # any code but OK
        self.unmatched = 0
        self.total_ms = 0.0
        self.buckets = [0] * (len(BUCKETS_MS) + 1)
        self.codes: dict[str, int] = {}
        self.samples: deque[float] = deque(maxlen=SAMPLES)

    def add(self, entry: Entry) -> None:
        ms = entry.duration * 1000
        self.calls += 1
        code = entry.code.name
        self.codes[code] = self.codes.get(code, 0) + 1
        if code != "OK":
            self.errors += 1
        if entry.near_miss is not None:
            self.unmatched += 1
        self.total_ms += ms
        self.buckets[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        self.samples.append(ms)

    def to_json(self, scenario: str, method: str) -> dict[str, Any]:
        ordered = sorted(self.samples)

        def pct(p: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

        return {
            "scenario": scenario,
            "method": method,
            "calls": self.calls,
            "errors": self.errors,
            "unmatched": self.unmatched,
            "codes": dict(self.codes),
            "mean_ms": round(self.total_ms / self.calls, 3) if self.calls else None,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "buckets": list(self.buckets),
        }


class Client:
    """One browser's stream: its own bounded backlog; ``lagging`` once it fell behind and missed entries."""

    def __init__(self, backlog: int = CLIENT_BACKLOG) -> None:
        self.backlog = backlog
        self.items: deque[dict[str, Any]] = deque()
        self.lagging = threading.Event()

    def offer(self, lines: list[dict[str, Any]]) -> None:
        if self.lagging.is_set():
            return
        if len(self.items) + len(lines) > self.backlog:
            self.lagging.set()  # its stream starts over from a snapshot: no gap, no wait
            return
        self.items.extend(lines)

    def take(self, most: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with contextlib.suppress(IndexError):
            while len(out) < most:
                out.append(self.items.popleft())
        return out


class Hub:
    """Subscribes to ``journal``; counts, keeps and fans out its entries off the serving threads."""

    def __init__(
        self,
        journal: Journal,
        registry: Registry,
        *,
        intake: int = INTAKE,
        recent: int = RECENT,
        client_backlog: int = CLIENT_BACKLOG,
    ) -> None:
        self.journal = journal
        self.registry = registry
        self.client_backlog = client_backlog
        # A deque, not a queue.Queue: appending is one atomic operation under the GIL, with no lock or
        # condition to signal on the serving thread; the hub's thread drains it every DRAIN_EVERY seconds.
        self._intake: deque[Entry] = deque()
        self._intake_bound = intake
        self._recent_size = recent
        self._recent: OrderedDict[int, Entry] = OrderedDict()
        self._unmatched: deque[dict[str, Any]] = deque(maxlen=UNMATCHED)
        self._stats: dict[tuple[str, str], _Stats] = {}
        self._rules: dict[str, int] = {}  # file:line -> uses
        self._sessions: dict[tuple[str, str], int] = {}  # (scenario, session) -> calls
        self._clients: list[Client] = []
        self._lock = threading.Lock()  # counting + fan-out vs. attaching a client with its snapshot
        self.version = 0  # grows with every batch counted: the streams send figures when it moved
        self.missed = 0  # entries the hub had no room for (its thread fell behind the calls)
        self.seen = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- the serving side --------------------------------------------------------------------------

    def hear(self, entry: Entry) -> None:
        """The journal's subscriber: on the serving thread, so it only hands the entry over."""
        intake = self._intake
        if len(intake) < self._intake_bound:
            intake.append(entry)
        else:
            self.missed += 1  # a lost count is better than a slower call (approximate under contention)

    def start(self) -> None:
        self._stopped.clear()
        self._unsubscribe = self.journal.subscribe(self.hear)
        # Calls journaled before the dashboard started (a server started earlier): counted once, in order.
        # Subscribed first, so none falls between; an entry both read here and heard is skipped by its seq.
        backlog = self.journal.entries()
        self._thread = threading.Thread(
            target=self._run, args=(backlog,), name="virtsvc-dashboard", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stopped.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)

    def _run(self, backlog: list[Entry]) -> None:
        self._take_all(backlog)
        intake = self._intake
        while not self._stopped.is_set():
            if not intake:
                self._stopped.wait(DRAIN_EVERY)
            batch: list[Entry] = []
            with contextlib.suppress(IndexError):
                while len(batch) < BATCH:
                    batch.append(intake.popleft())
            if batch:
                try:
                    self._take_all(batch)
                except Exception:  # a bug here must not end the dashboard's thread; say where
                    log.exception("dashboard.failed", seqs=[e.seq for e in batch[:5]])

    def _take_all(self, batch: list[Entry]) -> None:
        recent = self._recent
        batch = [e for e in batch if e.seq not in recent]  # the backlog and the subscriber may overlap
        if not batch:
            return
        with self._lock:
            # Lines for the tail only when someone is watching: nobody reads them otherwise.
            lines = [summary(e) for e in batch] if self._clients else None
            for i, entry in enumerate(batch):
                key = (entry.scenario, entry.method)
                stats = self._stats.get(key)
                if stats is None:
                    if len(self._stats) >= MAX_KEYS:
                        key = (OTHER, OTHER)
                    stats = self._stats.setdefault(key, _Stats())
                stats.add(entry)
                if entry.rule is not None:
                    self._rules[entry.rule] = self._rules.get(entry.rule, 0) + 1
                session = (entry.scenario, entry.session)
                if session in self._sessions or len(self._sessions) < MAX_KEYS:
                    self._sessions[session] = self._sessions.get(session, 0) + 1
                if entry.near_miss is not None:
                    self._unmatched.append(lines[i] if lines is not None else summary(entry))
                recent[entry.seq] = entry
            while len(recent) > self._recent_size:
                recent.popitem(last=False)
            self.seen += len(batch)
            self.version += 1
            if lines is not None:
                for client in self._clients:
                    client.offer(lines)

    # -- the reading side ----------------------------------------------------------------------------

    def attach(self, backlog: int | None = None) -> tuple[Client, dict[str, Any]]:
        """A new stream and the snapshot it starts from: every entry after it reaches the client's queue
        (``backlog`` of them at most, default ``client_backlog``, before it is marked lagging)."""
        client = Client(self.client_backlog if backlog is None else backlog)
        with self._lock:
            snapshot = self._snapshot()
            self._clients = [*self._clients, client]
        return client, snapshot

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def detach(self, client: Client) -> None:
        with self._lock:
            self._clients = [c for c in self._clients if c is not client]

    @property
    def clients(self) -> int:
        return len(self._clients)

    def _snapshot(self) -> dict[str, Any]:
        calls = list(self._recent.values())[-SNAPSHOT_CALLS:]
        return {
            "calls": [summary(e) for e in calls],
            "unmatched": list(self._unmatched),
            "figures": self._figures(),
            "scenarios": self.scenarios(),
        }

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return self._figures()

    def _figures(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "seen": self.seen,
            "missed": self.missed,
            "buckets_ms": list(BUCKETS_MS),
            "methods": [s.to_json(sc, m) for (sc, m), s in sorted(self._stats.items())],
            "rules": dict(self._rules),
            "sessions": [
                {"scenario": sc, "session": se, "calls": n} for (sc, se), n in sorted(self._sessions.items())
            ],
            "now": time.time(),
        }

    def scenarios(self) -> dict[str, Any]:
        loaded = self.registry.scenarios()
        return {"key": _key(loaded), "list": [scenario_json(s) for s in loaded]}

    def scenarios_key(self) -> str:
        """Identity of what is loaded: the streams resend the scenarios only when a reload changed it."""
        return _key(self.registry.scenarios())

    def details(self, seq: int) -> dict[str, Any] | None:
        """The whole record of a call still kept: request, reply, metadata, headers, trailers, timing."""
        with self._lock:
            entry = self._recent.get(seq)
        if entry is None:
            return None
        out = entry.to_dict()  # decodes the messages: here, on the reader's thread, never on the call's
        out["overhead_ms"] = round((entry.duration - entry.delay) * 1000, 3)
        out["started_at_epoch"] = entry.started_at
        out["rule_answers"] = self._rule_answers(entry)
        return out

    def _rule_answers(self, entry: Entry) -> str | None:
        if entry.rule is None:
            return None
        scenario = self.registry.get(entry.scenario)
        names = [entry.scenario]
        while scenario is not None:
            for rule in _rules(scenario):
                if rule.where == entry.rule:
                    return rule_summary(rule)
            if scenario.extends is None or scenario.extends in names:
                break
            names.append(scenario.extends)
            scenario = self.registry.get(scenario.extends)
        return None  # a session's own rule, or one no longer loaded


def _key(scenarios: Iterable[CompiledScenario]) -> str:
    # Identity, version and size: a reload makes new objects (an id alone could be reused after a collection).
    return ",".join(f"{s.name}@{id(s):x}:{s.version}:{len(s.rules)}" for s in scenarios)
