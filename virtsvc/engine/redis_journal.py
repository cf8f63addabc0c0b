"""The journal in Redis (with ``--store redis://...``): every replica's calls, readable from any replica.

Each call's entry goes to a capped stream of its session (``XADD MAXLEN ~ size``, under the session's hash
tag, expiring with the session) and is published for watchers, in one script run before the call's reply is
released: a replica killed right after answering loses no entry. Subscribers (metrics, logs, the dashboard)
still hear this process's calls alone; :meth:`RedisJournal.watch` hears every replica's.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from virtsvc import _logs
from virtsvc.engine.journal import Entry, Journal, Subscriber

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import Catalog
    from virtsvc.engine.redis_store import RedisStore

__all__ = ["RedisJournal"]

log = _logs.get_logger("virtsvc.journal")

# KEYS[1] the session's stream. ARGV: cap, expiry (ms), the entry (JSON), the watchers' channel.
_RECORD = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""

_LOCAL = itertools.count(1)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _pairs(pairs: Any) -> list[list[Any]]:
    return [[k, {"b": _b64(v)} if isinstance(v, bytes) else v] for k, v in pairs]


def _unpairs(pairs: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, base64.b64decode(v["b"]) if isinstance(v, dict) else v) for k, v in pairs)


class RedisJournal(Journal):
    """A :class:`Journal` whose entries live in Redis, per session, bounded by ``size`` and the session's TTL
    (``--journal-total`` does not apply: Redis holds them)."""

    def __init__(self, store: RedisStore, catalog: Catalog, size: int = 500) -> None:
        super().__init__(size)
        self.store = store
        self.catalog = catalog
        self.channel = f"{store.namespace}:journal"
        self._record = store.link.script(_RECORD)
        self._watchers: list[Subscriber] = []
        self._listener: threading.Thread | None = None
        self._stopped = threading.Event()

    def stream_key(self, scenario: str, session: str) -> str:
        return self.store.key(scenario, session) + ":journal"

    def _kept_key(self, scenario: str, session: str) -> str:
        return self.store.key(scenario, session) + ":kept"

    # -- writing ----------------------------------------------------------------------------------------

    def record(self, entry: Entry) -> None:
        # Unique across replicas and ordered by start: the microsecond it started, then a local count.
        entry.seq = int(entry.started_at * 1e6) * 1024 + next(_LOCAL) % 1024
        data = json.dumps(self._dump(entry), separators=(",", ":"))
        store = self.store
        with store._reach():
            # Written before the reply is released, its own reply read later (see redis_link).
            store.link.send(
                self._record,
                [self.stream_key(entry.scenario, entry.session)],
                [self.size, store._expiry_ms, data, self.channel],
            )
        rule = entry.rule
        if rule is not None:
            self.rule_uses[rule] = self.rule_uses.get(rule, 0) + 1
        for subscriber in self._subscribers:
            try:
                subscriber(entry)
            except Exception as exc:
                self.unsubscribe(subscriber)
                name = getattr(subscriber, "__qualname__", type(subscriber).__name__)
                log.error("journal.subscriber_dropped", subscriber=name, error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _dump(entry: Entry) -> dict[str, Any]:
        return {
            "seq": entry.seq,
            "scenario": entry.scenario,
            "session": entry.session,
            "method": entry.method,
            "metadata": dict(entry.metadata),
            "started_at": entry.started_at,
            "requests": [_b64(r) for r in entry.raw_requests],
            "replies": [_b64(r) for r in entry.raw_replies],
            "code": entry.code.name,
            "message": entry.message,
            "rule": entry.rule,
            "near_miss": entry.near_miss,
            "duration": entry.duration,
            "delay": entry.delay,
            "headers": _pairs(entry.headers),
            "trailers": _pairs(entry.trailers),
            "details": [_b64(d) for d in entry.details],
            "scenario_version": entry.scenario_version,
            "forwarded": entry.forwarded,
        }

    def _load(self, raw: Any, label: str | None = None) -> Entry | None:
        data = json.loads(raw)
        spec = self.catalog.methods.get(data["method"])
        if spec is None:  # a method this replica's contracts lack
            return None
        entry = Entry(
            data["scenario"],
            data["session"],
            spec,
            data["metadata"],
            data["started_at"],
            [base64.b64decode(r) for r in data["requests"]],
            [base64.b64decode(r) for r in data["replies"]],
        )
        entry.seq = data["seq"]
        entry.code = grpc.StatusCode[data["code"]]
        entry.message = data["message"]
        entry.rule = data["rule"]
        entry.near_miss = data["near_miss"]
        entry.duration = data["duration"]
        entry.delay = data["delay"]
        entry.headers = _unpairs(data["headers"])
        entry.trailers = _unpairs(data["trailers"])
        entry.details = tuple(base64.b64decode(d) for d in data["details"])
        entry.scenario_version = data["scenario_version"]
        entry.forwarded = data["forwarded"]
        entry.label = label
        return entry

    # -- reading ----------------------------------------------------------------------------------------

    def _streams(self, scenario: str | None, session: str | None) -> list[tuple[str, str]]:
        if scenario is not None and session is not None:
            return [(scenario, session)]
        ns = self.store.namespace
        pattern = f"{ns}:{{*}}:journal"
        with self.store._reach():
            found = list(self.store.client.scan_iter(match=pattern, count=1000, _type="STREAM"))
        out = []
        for raw in found:
            key = raw.decode() if isinstance(raw, bytes) else raw
            names = self.store._parse(key[: -len(":journal")])
            if names is None:
                continue
            if (scenario is None or names[0] == scenario) and (session is None or names[1] == session):
                out.append(names)
        return out

    def entries(
        self,
        scenario: str | None = None,
        session: str | None = None,
        method: str | None = None,
        limit: int | None = None,
    ) -> list[Entry]:
        out: list[Entry] = []
        client = self.store.client
        for names in self._streams(scenario, session):
            with self.store._reach():
                # The newest ``size``: the stream's own trim is approximate (whole nodes).
                raw = client.xrevrange(self.stream_key(*names), count=self.size)
                label = client.get(self._kept_key(*names))
            text = label.decode() if isinstance(label, bytes) else label
            for _id, fields in raw:
                entry = self._load(fields[b"e"] if b"e" in fields else fields["e"], text or None)
                if entry is not None:
                    out.append(entry)
        if method is not None:
            wanted = method.lstrip("/")
            out = [e for e in out if e.method == wanted]
        out.sort(key=lambda e: e.seq)
        if limit is not None and limit > 0:
            out = out[-limit:]
        return out

    def __len__(self) -> int:
        return len(self.entries())

    # -- dropping and keeping ------------------------------------------------------------------------------

    def clear(self, scenario: str, session: str) -> None:
        with self.store._reach():
            self.store.client.delete(self.stream_key(scenario, session))
            self.store.client.delete(self._kept_key(scenario, session))

    def keep(self, scenario: str, session: str, label: str | None, ttl: float) -> None:
        ms = int(ttl * 1000)
        with self.store._reach():
            if self.store.client.exists(self.stream_key(scenario, session)):
                self.store.client.set(self._kept_key(scenario, session), label or "", px=ms)
                self.store.client.pexpire(self.stream_key(scenario, session), ms)

    def drop_session(self, scenario: str, session: str) -> None:
        try:
            with self.store._reach():
                kept = self.store.client.exists(self._kept_key(scenario, session))
            if not kept:
                self.clear(scenario, session)
        except Exception as exc:  # Redis expires it with the session anyway
            log.warning("journal.drop_failed", error=f"{type(exc).__name__}: {exc}")

    def drop_scenario(self, scenario: str) -> None:
        for names in self._streams(scenario, None):
            self.clear(*names)

    # -- watching every replica's calls ------------------------------------------------------------------

    def watch(self, subscriber: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._watchers = [*self._watchers, subscriber]
            if self._listener is None:
                ready = threading.Event()
                self._listener = threading.Thread(
                    target=self._listen, args=(ready,), name="virtsvc-journal-watch", daemon=True
                )
                self._listener.start()
                ready.wait(5.0)  # subscribed before the watch reads its backlog: no entry falls between

        def unwatch() -> None:
            with self._lock:
                self._watchers = [w for w in self._watchers if w is not subscriber]

        return unwatch

    def _listen(self, ready: threading.Event) -> None:
        while not self._stopped.is_set():
            try:
                pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while pubsub.get_message(timeout=1.0) is None and not ready.is_set():
                    if pubsub.subscribed:
                        break
                ready.set()
                while not self._stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    entry = self._load(message["data"])
                    if entry is None:
                        continue
                    for watcher in self._watchers:
                        watcher(entry)
            except Exception as exc:  # Redis went away: subscribe again once it is back
                log.warning("journal.watch_interrupted", error=f"{type(exc).__name__}: {exc}")
                self._stopped.wait(0.5)

    def close(self) -> None:
        self._stopped.set()
