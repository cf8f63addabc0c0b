"""The shared session store on Redis (``virtsvc serve --store redis://HOST:PORT/DB``): several processes and
replicas serve one set of sessions as if one server answered.

Each state change a call makes is one Lua script run by Redis, so two replicas answering two calls of one
session at the same instant move its sequence by exactly two. A session is one hash whose key carries the hash
tag ``{scenario|session}`` (names percent-encoded), so every key of a session lives in one slot and the same
scripts run on a Redis Cluster. What cannot be shared stays in this process, looked up by key: compiled
session rules (Redis holds their source and a version; a process compiles a version once), the random
generators (seeded from the names, as in memory) and a handler's ``session()`` dict.
A session's changes to its scenario's data (a handler's ``put`` and ``remove``) are fields of its hash, so
every replica reads them and a reset drops them with the session.

When Redis cannot be reached, every operation raises a :class:`Refusal` with ``UNAVAILABLE`` naming the
store (its URL without the password), never an answer from stale state; ``healthy`` says how the last
operation went, and the next one that reaches Redis again restores it.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

from virtsvc import _logs
from virtsvc.engine.redis_link import Link
from virtsvc.engine.store import EMPTY_RULES, DropListener, PutRule, RuleChange, RuleSet, seeded_rng
from virtsvc.errors import ConfigError, Refusal

__all__ = ["RedisSession", "RedisStore", "redact_url"]

log = _logs.get_logger("virtsvc.store")

RuleCompiler = Callable[[str, Any], RuleSet]  # (scenario, source) -> the compiled rules

# KEYS[1] the session's hash, KEYS[2] (on a single server) the log of admin changes. ARGV: now (wall
# seconds), expiry (ms), the rules version this process holds, '1' to count a call (what _TOUCH does, in the
# same round trip: a call's look-up and its count), a counter field to move (what advance() does) if the
# session has no rules of its own and the log's length is ARGV[6] (the changes this process applied: its
# rules are current), else ''. Makes the session if needed; returns whether it was made, its calls, the
# admin log's length (-1 without KEYS[2]), its rules version, the step moved (-1: none) and, when the
# version differs, its rules' source and the changes effects made to them (either may be missing).
_SESSION = """
local made = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'calls', 0, 'last', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  made = 1
end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], 'calls', 1)
  redis.call('HSET', KEYS[1], 'last', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local changes = -1
if KEYS[2] then changes = redis.call('LLEN', KEYS[2]) end
local got = redis.call('HMGET', KEYS[1], 'calls', 'rv')
local rv = got[2] or ''
local step = -1
if ARGV[5] ~= '' and rv == '' and ARGV[3] == '' and changes == tonumber(ARGV[6]) then
  step = redis.call('HINCRBY', KEYS[1], ARGV[5], 1) - 1
end
if rv ~= '' and rv ~= ARGV[3] then
  local src = redis.call('HMGET', KEYS[1], 'rules', 'fx')
  return {made, got[1], changes, rv, step, src[1], src[2]}
end
return {made, got[1], changes, rv, step}
"""

# Like _SESSION without making it (nor moving a step): an empty reply when the session does not exist.
# ARGV: the rules version.
_FIND = """
local changes = -1
if KEYS[2] then changes = redis.call('LLEN', KEYS[2]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return {changes} end
local got = redis.call('HMGET', KEYS[1], 'calls', 'rv')
local rv = got[2] or ''
if rv ~= '' and rv ~= ARGV[1] then
  local src = redis.call('HMGET', KEYS[1], 'rules', 'fx')
  return {0, got[1], changes, rv, -1, src[1], src[2]}
end
return {0, got[1], changes, rv, -1}
"""

# ARGV: now, expiry (ms). Counts a call and keeps the session alive for another TTL.
_TOUCH = """
local n = redis.call('HINCRBY', KEYS[1], 'calls', 1)
redis.call('HSET', KEYS[1], 'last', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n
"""

# ARGV: counter field, limit. Claims one use unless ``limit`` are used; returns its number (0: used up).
_TAKE = """
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if used >= tonumber(ARGV[2]) then return 0 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""

# ARGV: limit. Claims a place among the calls in flight.
_ENTER = """
local n = tonumber(redis.call('HGET', KEYS[1], 'inflight') or '0')
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'inflight', 1)
return 1
"""

# ARGV: now, expiry (ms), rules version, source (JSON), counter fields (JSON list), rule count.
_PUT_RULES = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'calls', 0, 'last', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('HSET', KEYS[1], 'rv', ARGV[3], 'rules', ARGV[4], 'rk', ARGV[5], 'rn', ARGV[6])
redis.call('HDEL', KEYS[1], 'fx')
return 1
"""

# ARGV: now, expiry (ms), new rules version, changes (JSON: [["put", {id, json}] | ["remove", ref], ...]),
# counter fields of the put rules (JSON list; they start over). Folds the changes into the session's 'fx'
# (puts by id, in order, each kept as JSON text so Lua never re-encodes rule data; removed refs) in one step,
# so two replicas applying effects at once both take hold. Returns the rules version it replaced.
_CHANGE_RULES = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'calls', 0, 'last', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local got = redis.call('HMGET', KEYS[1], 'rv', 'fx', 'rk')
local fx = cjson.decode(got[2] or '{}')
local puts = fx['put'] or {}
local gone = fx['gone'] or {}
for _, change in ipairs(cjson.decode(ARGV[4])) do
  local id = change[2]
  if change[1] == 'put' then id = change[2]['id'] end
  local kept = {}
  for _, p in ipairs(puts) do if p['id'] ~= id then table.insert(kept, p) end end
  puts = kept
  if change[1] == 'put' then
    table.insert(puts, change[2])
  else
    local seen = false
    for _, g in ipairs(gone) do if g == id then seen = true end end
    if not seen then table.insert(gone, id) end
  end
end
local rk = cjson.decode(got[3] or '[]')
for _, field in ipairs(cjson.decode(ARGV[5])) do
  redis.call('HDEL', KEYS[1], field)
  table.insert(rk, field)
end
local fx_text = cjson.encode({put = puts, gone = gone})
redis.call('HSET', KEYS[1], 'fx', fx_text, 'rv', ARGV[3], 'rk', cjson.encode(rk))
return got[1] or ''
"""

# Removes the session's rules and their counters; returns how many rules it had.
_CLEAR_RULES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local got = redis.call('HMGET', KEYS[1], 'rk', 'rn')
if not got[1] then return 0 end
for _, field in ipairs(cjson.decode(got[1])) do redis.call('HDEL', KEYS[1], field) end
redis.call('HDEL', KEYS[1], 'rv', 'rules', 'rk', 'rn', 'fx')
return tonumber(got[2] or '0')
"""

# ARGV: the idle limit (wall seconds). Drops the session if it has been idle since before it.
_DROP_IF_IDLE = """
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
if last >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', unpack(KEYS))
return 1
"""

# ARGV: the record's field, its JSON ("null": removed), expiry (ms). A record keeps the place (the sequence
# number before its JSON) it got when its key was first changed, so every replica lists records alike.
_PUT_RECORD = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local seq
if old then seq = string.match(old, '^%d+') else seq = redis.call('HINCRBY', KEYS[1], 'dseq', 1) end
redis.call('HSET', KEYS[1], ARGV[1], seq .. ' ' .. ARGV[2])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# The session's record fields and values, in one round trip.
_RECORDS = """
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) == 'd:' then out[#out + 1] = all[i]; out[#out + 1] = all[i + 1] end
end
return out
"""

_COUNTER = "c:"  # hash fields of counters are prefixed: they never clash with the session's own fields
_RECORD = (
    "d:"  # a data record's field: d:COLLECTION:KEY (collection names are words, so the first ':' ends it)
)


def redact_url(url: str) -> str:
    """The store URL as logs and errors show it: the password (and a user name) replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _text(value: Any) -> str | None:
    """A Redis reply's text (None for a missing field)."""
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _name(text: str) -> str:
    return urllib.parse.quote(text, safe="")


class _Local:
    """What stays in this process for one session: its compiled rules, generator and handler dict."""

    __slots__ = ("data", "rng", "rules", "rules_version")

    def __init__(self) -> None:
        self.rules: RuleSet = EMPTY_RULES
        self.rules_version = ""
        self.rng: random.Random | None = None
        self.data: dict[str, Any] = {}


class RedisSession:
    """A session in Redis, as one call sees it; every change is one script run by Redis."""

    __slots__ = ("_counted", "_key", "_local", "_step", "_store", "calls", "id", "rules", "scenario")

    def __init__(
        self,
        store: RedisStore,
        scenario: str,
        session_id: str,
        key: str,
        local: _Local,
        calls: int,
        counted: bool = False,
        step: tuple[str, int] | None = None,
    ):
        self._store = store
        self._counted = counted  # the look-up counted the call already: the next touch() is free
        self._step = step  # (counter, step) the look-up moved already: the next advance() of it is free
        self._key = key
        self._local = local
        self.scenario = scenario
        self.id = session_id
        self.calls = calls
        self.rules: RuleSet = local.rules

    @property
    def data(self) -> MutableMapping[str, Any]:
        return self._local.data

    @property
    def clock(self) -> None:
        """Always wall time: see ``RedisStore.no_virtual_clock``."""
        return None

    @property
    def rng(self) -> random.Random:
        local = self._local
        if local.rng is None:
            local.rng = seeded_rng(self.scenario, self.id)
        return local.rng

    def touch(self) -> int:
        if self._counted:
            self._counted = False
            return self.calls
        store = self._store
        with store._reach():
            n = int(store.link.run(store._touch, [self._key], [time.time(), store._expiry_ms]))
        self.calls = n
        return n

    def take(self, counter: str, limit: int) -> int:
        store = self._store
        with store._reach():
            return int(store.link.run(store._take, [self._key], [_COUNTER + counter, limit]))

    def advance(self, counter: str) -> int:
        step = self._step
        if step is not None and step[0] == counter:
            self._step = None
            return step[1]
        store = self._store
        with store._reach():
            return int(store.link.command("HINCRBY", self._key, _COUNTER + counter, 1)) - 1

    def used(self, counter: str) -> int:
        store = self._store
        with store._reach():
            value = store.link.command("HGET", self._key, _COUNTER + counter)
        return int(value or 0)

    def enter(self, limit: int) -> bool:
        store = self._store
        with store._reach():
            return bool(store.link.run(store._enter, [self._key], [limit]))

    def leave(self) -> None:
        store = self._store
        with store._reach():
            store.link.command("HINCRBY", self._key, "inflight", -1)

    def records(self) -> dict[str, dict[str, Any]]:
        store = self._store
        with store._reach():
            flat = store._records(keys=[self._key])
        found = []
        for i in range(0, len(flat), 2):
            field, value = (x.decode() if isinstance(x, bytes) else x for x in flat[i : i + 2])
            collection, _, key = field[len(_RECORD) :].partition(":")
            seq, _, text = value.partition(" ")
            found.append((int(seq), collection, key, json.loads(text)))
        out: dict[str, dict[str, Any]] = {}
        for _seq, collection, key, record in sorted(found, key=lambda f: f[0]):
            out.setdefault(collection, {})[key] = record
        return out

    def put_record(self, collection: str, key: str, record: dict[str, Any] | None) -> None:
        store = self._store
        field = f"{_RECORD}{collection}:{key}"
        with store._reach():
            store._put_record(keys=[self._key], args=[field, json.dumps(record), store._expiry_ms])


class RedisStore:
    """Sessions in Redis (a single server or a Cluster, found out on connecting), idle ones expiring after
    ``ttl`` seconds as in the memory store; Redis itself expires a session a sweep interval later, so keys of
    replicas that stopped never outlive it for long.

    ``compile_rules`` turns a session's stored rules source into rules in this process (the server sets it);
    ``namespace`` prefixes every key, so several virtual services may share one Redis.
    """

    #: why sessions here cannot run on virtual time (``virtsvc.engine.clock.switch`` refuses with it)
    no_virtual_clock = (
        "a virtual clock holds calls on threads of one process, and this server keeps sessions in Redis, "
        "shared by every replica (a call held on one replica would not wake when another advances the "
        "clock); run the test against a server with the memory store (--store memory) to use virtual time"
    )

    def __init__(
        self,
        url: str,
        ttl: float = 3600.0,
        *,
        namespace: str = "virtsvc",
        compile_rules: RuleCompiler | None = None,
        client: Any = None,
    ) -> None:
        self.url = url
        self.name = redact_url(url)
        self.ttl = ttl
        self.namespace = namespace
        self.compile_rules = compile_rules
        self.healthy = True
        self._health_listeners: list[Callable[[bool], None]] = []
        self._listeners: list[DropListener] = []
        self._local: dict[tuple[str, str], _Local] = {}
        self._lock = threading.Lock()
        self._sweep_every = min(ttl, 60.0)
        # Redis drops what no replica swept (all stopped) a sweep interval after the TTL.
        self._expiry_ms = int((ttl + self._sweep_every) * 1000)
        self._next_sweep = time.monotonic() + self._sweep_every
        self.client = client if client is not None else connect(url)
        import redis

        self.cluster = isinstance(self.client, redis.RedisCluster)
        #: the list of admin changes (scenarios put and deleted) every process applies in order
        self.changes_key = f"{namespace}:admin-changes"
        #: how many of them this process has applied (its listener moves it on)
        self.changes_seen = 0
        self._changes_listener: Callable[[int], None] | None = None
        #: the round trips calls make (the admin API and sweeps use the client's own pool)
        self.link = Link(self.client, self.cluster)
        self._session = self.link.script(_SESSION)
        self._find = self.link.script(_FIND)
        self._touch = self.link.script(_TOUCH)
        self._take = self.link.script(_TAKE)
        self._enter = self.link.script(_ENTER)
        self._put_rules = self.client.register_script(_PUT_RULES)
        self._clear_rules = self.client.register_script(_CLEAR_RULES)
        self._change_rules = self.client.register_script(_CHANGE_RULES)
        self._drop_if_idle = self.client.register_script(_DROP_IF_IDLE)
        self._put_record = self.client.register_script(_PUT_RECORD)
        self._records = self.client.register_script(_RECORDS)

    # -- keys ------------------------------------------------------------------------------------

    def key(self, scenario: str, session_id: str) -> str:
        """The session's hash; every key of one session shares its ``{scenario|session}`` hash tag."""
        return f"{self.namespace}:{{{_name(scenario)}|{_name(session_id)}}}"

    def session_keys(self, scenario: str, session_id: str) -> list[str]:
        """Every key one session owns (its hash first)."""
        return [self.key(scenario, session_id)]

    def _parse(self, key: str) -> tuple[str, str] | None:
        head = f"{self.namespace}:{{"
        if not (key.startswith(head) and key.endswith("}")):
            return None
        scenario, sep, session_id = key[len(head) : -1].partition("|")
        if not sep:
            return None
        return urllib.parse.unquote(scenario), urllib.parse.unquote(session_id)

    def _scan(self, scenario: str | None = None) -> Iterator[tuple[str, tuple[str, str]]]:
        pattern = f"{self.namespace}:{{{_name(scenario) + '|' if scenario is not None else ''}*}}"
        with self._reach():
            found = list(self.client.scan_iter(match=pattern, count=1000, _type="HASH"))
        for raw in found:
            key = raw.decode() if isinstance(raw, bytes) else raw
            names = self._parse(key)
            if names is not None:
                yield key, names

    # -- errors and health -------------------------------------------------------------------------

    @contextmanager
    def _reach(self) -> Iterator[None]:
        import redis

        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError, OSError) as exc:
            self.link.reset()  # the idle connections are as dead as the one that failed
            self._set_health(False)
            raise Refusal(grpc.StatusCode.UNAVAILABLE, self.unreachable_message(exc)) from None
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            # A replica's Redis going down in a Cluster shows as these until it is back.
            if text.startswith(("CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN")):
                self._set_health(False)
                raise Refusal(grpc.StatusCode.UNAVAILABLE, self.unreachable_message(exc)) from None
            raise
        else:
            if not self.healthy:
                self._set_health(True)

    def unreachable_message(self, exc: BaseException) -> str:
        detail = str(exc).replace(self.url, self.name) or type(exc).__name__
        return f"session store {self.name} unreachable: {detail}"

    def _set_health(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            log.info("store.reachable", store=self.name)
        else:
            log.warning("store.unreachable", store=self.name)
        for listener in self._health_listeners:
            try:
                listener(healthy)
            except Exception as exc:  # a listener's bug must not hide the store's state from the others
                log.warning("store.listener_failed", error=f"{type(exc).__name__}: {exc}")

    def on_health(self, listener: Callable[[bool], None]) -> None:
        """Calls ``listener(healthy)`` whenever Redis becomes unreachable or reachable again."""
        self._health_listeners = [*self._health_listeners, listener]

    def ping(self) -> bool:
        """Whether Redis answers now (updates ``healthy``)."""
        try:
            with self._reach():
                self.client.ping()
        except Refusal:
            return False
        return True

    # -- the Store protocol ------------------------------------------------------------------------

    def _local_of(self, scenario: str, session_id: str) -> _Local:
        names = (scenario, session_id)
        local = self._local.get(names)
        if local is None:
            with self._lock:
                local = self._local.setdefault(names, _Local())
        return local

    def _opened(
        self,
        scenario: str,
        session_id: str,
        key: str,
        local: _Local,
        reply: list[Any],
        held: str,
        counted: bool = False,
        step: str | None = None,
    ) -> RedisSession:
        """The session from a _SESSION/_FIND reply to a look-up that sent the rules version ``held`` (the
        local one may have moved since, by another thread of this process) and asked to move ``step``."""
        made, calls, changes = int(reply[0]), int(reply[1] or 0), int(reply[2])
        if made and (local.rng is not None or local.data):
            # Reset (or expired) through another process: what this one kept of the old session goes too.
            local.rng, local.data = None, {}
        self._heard(changes)
        version = reply[3].decode() if isinstance(reply[3], bytes) else (reply[3] or "")
        if version != held:  # Redis holds other rules than this process did: the reply has their source
            rules = EMPTY_RULES if not version else self._compile(scenario, _text(reply[5]), _text(reply[6]))
            with self._lock:
                local.rules, local.rules_version = rules, version
        moved = int(reply[4])
        taken = (step, moved) if step is not None and moved >= 0 else None
        return RedisSession(self, scenario, session_id, key, local, calls, counted, taken)

    def _compile(self, scenario: str, source: str | None, effects: str | None = None) -> RuleSet:
        """The session's rules from their source and the changes effects made (both as Redis keeps them)."""
        compile_rules = self.compile_rules
        if compile_rules is None:
            log.warning("store.rules_not_compiled", scenario=scenario, reason="no rule compiler")
            return RuleSet((), source=None if source is None else json.loads(source))
        base = EMPTY_RULES if source is None else compile_rules(scenario, json.loads(source))
        if effects is None:
            return base
        fx = json.loads(effects)
        puts = []
        for entry in fx.get("put") or ():  # an empty list comes back from Lua as {}
            put = json.loads(entry["json"])
            compiled = compile_rules(put["scenario"], {"effect": put["id"], "rule": put["rule"]})
            puts.append(PutRule(put["id"], put["scenario"], put["rule"], compiled.base[0]))
        return RuleSet(base.base, base.source, puts=puts, gone=fx.get("gone") or ())

    def _keys(self, key: str) -> list[str]:
        # On a Cluster the admin log lives in another slot than the session: it is read on its own.
        return [key] if self.cluster else [key, self.changes_key]

    def session(
        self,
        scenario: str,
        session_id: str,
        *,
        calling: bool = False,
        step: Callable[[], str | None] | None = None,
    ) -> RedisSession:
        key = self.key(scenario, session_id)
        local = self._local_of(scenario, session_id)
        held = local.rules_version
        # Read before ``step()`` looks at the scenarios: they hold at least these changes (the count moves
        # once they are applied), so Redis moving the step only if its log is this long proves them current.
        seen = self.changes_seen
        counter = step() if step is not None and not held and not self.cluster else None
        with self._reach():
            args = [time.time(), self._expiry_ms, held, "1" if calling else "0"]
            args += [_COUNTER + counter if counter else "", seen]
            reply = self.link.run(self._session, self._keys(key), args)
            if self.cluster:
                reply[2] = self.client.llen(self.changes_key)
        now = time.monotonic()
        if now >= self._next_sweep:
            self.expire(now)
        return self._opened(scenario, session_id, key, local, reply, held, counted=calling, step=counter)

    def find(self, scenario: str, session_id: str) -> RedisSession | None:
        key = self.key(scenario, session_id)
        local = self._local.get((scenario, session_id)) or _Local()
        held = local.rules_version
        with self._reach():
            reply = self.link.run(self._find, self._keys(key), [held])
            if self.cluster:
                reply[0 if len(reply) == 1 else 2] = self.client.llen(self.changes_key)
        if len(reply) == 1:
            self._heard(int(reply[0]))
            return None
        if (scenario, session_id) not in self._local:
            local = self._local_of(scenario, session_id)
        return self._opened(scenario, session_id, key, local, reply, held)

    # -- admin changes shared by every process ----------------------------------------------------------

    def on_changes(self, listener: Callable[[int], None]) -> None:
        """Calls ``listener(length)`` from the call that first sees the admin log longer (or shorter: Redis
        lost it) than this process last heard; the call waits for it, so it is answered with the change."""
        self._changes_listener = listener

    def _heard(self, changes: int) -> None:
        if changes != self.changes_seen and self._changes_listener is not None:
            self._changes_listener(changes)

    def changes(self, start: int = 0) -> list[Any]:
        """The admin changes from ``start`` on (0-based), oldest first, as :meth:`add_change` took them."""
        with self._reach():
            raw = self.client.lrange(self.changes_key, start, -1)
        return [json.loads(item) for item in raw]

    def add_change(self, change: Any) -> int:
        """Appends an admin change (JSON-ready) to the log every process applies in order; returns its
        length."""
        with self._reach():
            return int(self.client.rpush(self.changes_key, json.dumps(change)))

    def check_changes(self) -> None:
        """Hears the admin log now (a call about to be refused as naming no known scenario asks first)."""
        with self._reach():
            changes = int(self.client.llen(self.changes_key))
        self._heard(changes)

    def put_rules(self, scenario: str, session_id: str, rules: RuleSet) -> None:
        version = uuid.uuid4().hex
        counters = sorted(_COUNTER + k for k in rules.counter_keys())
        args = [
            time.time(),
            self._expiry_ms,
            version,
            json.dumps(rules.source),
            json.dumps(counters),
            len(rules.rules()),
        ]
        with self._reach():
            self._put_rules(keys=[self.key(scenario, session_id)], args=args)
        local = self._local_of(scenario, session_id)
        local.rules, local.rules_version = rules, version

    def change_rules(self, scenario: str, session_id: str, changes: Sequence[RuleChange]) -> None:
        version = uuid.uuid4().hex
        payload = [
            [kind, {"id": value.id, "json": json.dumps(value.to_json())}]
            if isinstance(value, PutRule)
            else [kind, value]
            for kind, value in changes
        ]
        put = RuleSet(value.rule for _kind, value in changes if isinstance(value, PutRule))
        counters = sorted(_COUNTER + key for key in put.counter_keys())
        args = [time.time(), self._expiry_ms, version, json.dumps(payload), json.dumps(counters)]
        with self._reach():
            replaced = self._change_rules(keys=[self.key(scenario, session_id)], args=args)
        local = self._local_of(scenario, session_id)
        with self._lock:  # checked and set at once: a version always names the rules it stands for
            if _text(replaced) == local.rules_version:
                local.rules, local.rules_version = local.rules.changed(changes), version
        # else another process changed them meanwhile: the next look-up compiles what Redis holds

    def clear_rules(self, scenario: str, session_id: str) -> int:
        with self._reach():
            removed = int(self._clear_rules(keys=[self.key(scenario, session_id)]))
        local = self._local.get((scenario, session_id))
        if local is not None:
            local.rules, local.rules_version = EMPTY_RULES, ""
        return removed

    def reset(self, scenario: str, session_id: str) -> bool:
        with self._reach():
            existed = bool(self.client.delete(*self.session_keys(scenario, session_id)))
        self._forget(scenario, session_id)
        if existed:
            self._dropped(scenario, session_id)
        return existed

    def drop_scenario(self, scenario: str) -> int:
        dropped = 0
        for _key, names in list(self._scan(scenario)):
            with self._reach():
                gone = bool(self.client.delete(*self.session_keys(*names)))
            self._forget(*names)
            if gone:
                dropped += 1
                self._dropped(*names)
        return dropped

    def expire(self, now: float | None = None) -> int:
        """Drops sessions idle for longer than the TTL (``now`` on the monotonic clock, as in memory); runs at
        most once a minute from ``session``. Each drop is checked and done by Redis in one script, so two
        replicas sweeping at once drop (and announce) a session once."""
        mono = time.monotonic()
        now = mono if now is None else now
        self._next_sweep = now + self._sweep_every
        limit = time.time() + (now - mono) - self.ttl  # last use is kept on the wall clock, shared
        dropped = 0
        for _key, names in list(self._scan()):
            with self._reach():
                gone = bool(self._drop_if_idle(keys=self.session_keys(*names), args=[limit]))
            if gone:
                dropped += 1
                self._forget(*names)
                self._dropped(*names)
        return dropped

    def subscribe(self, listener: DropListener) -> Callable[[], None]:
        self._listeners = [*self._listeners, listener]

        def unsubscribe() -> None:
            self._listeners = [x for x in self._listeners if x is not listener]

        return unsubscribe

    def _forget(self, scenario: str, session_id: str) -> None:
        with self._lock:
            self._local.pop((scenario, session_id), None)

    def _dropped(self, scenario: str, session_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(scenario, session_id)
            except Exception as exc:  # a listener's bug must not stop the others, nor the caller
                log.warning("store.listener_failed", error=f"{type(exc).__name__}: {exc}")

    def keys(self) -> list[tuple[str, str]]:
        return [names for _key, names in self._scan()]

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        self.link.close()
        self.client.close()


def connect(url: str) -> Any:
    """A client for ``url`` (``redis://``, ``rediss://``, a password in it): a cluster client when the server
    is a Redis Cluster node, else a plain one. ConfigError when the ``redis`` library is missing or the URL is
    not one."""
    try:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry
    except ImportError:
        raise ConfigError(
            f"--store {redact_url(url)} needs the redis client library: pip install 'virtsvc[redis]'"
        ) from None
    if urllib.parse.urlsplit(url).scheme not in ("redis", "rediss"):
        raise ConfigError(
            f"--store {redact_url(url)}: expected memory, redis://HOST:PORT/DB or rediss://HOST:PORT/DB"
        )
    # Short timeouts and few retries: a call waits on Redis at most a few seconds before UNAVAILABLE.
    settings: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    }
    try:
        probe = redis.Redis.from_url(url, **settings)
        try:
            cluster = bool(probe.info("cluster").get("cluster_enabled"))
        finally:
            probe.close()
    except redis.exceptions.AuthenticationError as exc:  # a ConnectionError: tell it apart first
        raise ConfigError(f"session store {redact_url(url)} refused the credentials: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ConfigError(f"session store {redact_url(url)} unreachable: {exc}") from None
    if cluster:
        return redis.RedisCluster.from_url(url, **settings)
    return redis.Redis.from_url(url, **settings)
