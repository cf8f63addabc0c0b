"""The journal: a bounded record of every call, per (scenario, session).

Entries keep the raw request and reply bytes and decode them only when read, so recording costs almost
nothing on the hot path. Other readers (metrics, reports, a dashboard, record-and-replay) subscribe to the
stream of entries instead of polling.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import DecodeError, Message

from virtsvc import _logs

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import MethodSpec

__all__ = ["Entry", "Journal", "JournalFilter", "Metadata", "metadata_json"]

log = _logs.get_logger("virtsvc.journal")

Metadata = tuple[tuple[str, "str | bytes"], ...]

_SEQ = itertools.count(1)


class Entry:
    """One call as the journal saw it. ``to_dict()`` is its public, JSON-ready form.

    A plain slotted class rather than a dataclass: one is made for every call, and the call's metadata is
    kept as the mapping the router read (``metadata`` gives the pairs when someone asks).
    """

    __slots__ = (
        "_metadata",
        "code",
        "delay",
        "details",
        "duration",
        "forwarded",
        "headers",
        "label",
        "message",
        "near_miss",
        "raw_replies",
        "raw_requests",
        "rule",
        "scenario",
        "scenario_version",
        "seq",
        "session",
        "spec",
        "started_at",
        "trailers",
    )

    def __init__(
        self,
        scenario: str,
        session: str,
        spec: MethodSpec,
        metadata: Mapping[str, str],
        started_at: float,
        raw_requests: list[bytes] | None = None,
        raw_replies: list[bytes] | None = None,
    ) -> None:
        self.scenario = scenario
        self.session = session
        self.spec = spec
        self._metadata = metadata  # the call's text metadata; never changed once the call is routed
        self.started_at = started_at  # wall clock, seconds since the epoch
        self.raw_requests: list[bytes] = [] if raw_requests is None else raw_requests
        self.raw_replies: list[bytes] = [] if raw_replies is None else raw_replies
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.rule: str | None = None  # file:line of the rule that answered
        self.near_miss: str | None = None  # why no rule answered
        self.duration = 0.0  # seconds
        self.delay = 0.0  # seconds of simulated latency within it
        self.headers: Metadata = ()  # initial metadata sent
        self.trailers: Metadata = ()  # trailing metadata sent (grpc-status-details-bin aside: see details)
        self.details: tuple[bytes, ...] = ()  # the status details sent, serialised google.protobuf.Any
        self.scenario_version: int | str | None = None
        self.forwarded: str | None = None  # the upstream that answered, when the call was forwarded
        self.label: str | None = None  # the session's label once its journal is kept (Journal.keep)
        self.seq = next(_SEQ)

    def __repr__(self) -> str:
        return (
            f"Entry(seq={self.seq}, scenario={self.scenario!r}, session={self.session!r}, "
            f"method={self.method!r}, code={self.code.name}, rule={self.rule!r}, "
            f"near_miss={self.near_miss!r})"
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call's text metadata as (key, value) pairs."""
        return tuple(self._metadata.items())

    @property
    def method(self) -> str:
        return self.spec.full_name

    @property
    def matched(self) -> bool:
        return self.near_miss is None

    def requests(self) -> list[Any]:
        return [_decode(self.spec.input_class, raw) for raw in self.raw_requests]

    def replies(self) -> list[Any]:
        return [_decode(self.spec.output_class, raw) for raw in self.raw_replies]

    def status_details(self) -> list[Any]:
        """The status details sent, as proto3 JSON (``{"@type": ..., ...}``)."""
        return [_detail(raw, self.spec) for raw in self.details]

    def to_dict(self) -> dict[str, Any]:
        requests = self.requests()
        replies = self.replies()
        return {
            "seq": self.seq,
            "scenario": self.scenario,
            "scenario_version": self.scenario_version,
            "session": self.session,
            "method": self.method,
            "kind": self.spec.kind,
            "metadata": dict(self.metadata),
            "request": requests[0] if requests else None,
            "requests": requests,
            "reply": replies[0] if replies else None,
            "replies": replies,
            "headers": metadata_json(self.headers),
            "trailers": metadata_json(self.trailers),
            "code": self.code.name,
            "message": self.message,
            "details": self.status_details(),
            "rule": self.rule,
            "forwarded": self.forwarded,
            "near_miss": self.near_miss,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started_at))
            + f".{int(self.started_at % 1 * 1e6):06d}Z",
            "duration_ms": round(self.duration * 1000, 3),
            "delay_ms": round(self.delay * 1000, 3),
            "label": self.label,
        }


def _decode(cls: type[Message], raw: bytes) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return {"@undecodable": base64.b64encode(raw).decode()}
    # The proto3 JSON names (lowerCamelCase, as grpcurl and every other client print them): the journal is
    # read by people comparing it with what their client showed, so it speaks the same JSON.
    return json_format.MessageToDict(msg, descriptor_pool=msg.DESCRIPTOR.file.pool)


def metadata_json(pairs: Metadata) -> dict[str, str]:
    """Metadata as JSON: binary (``-bin``) values in base64, as gRPC's text forms write them."""
    out: dict[str, str] = {}
    for key, value in pairs:
        out[key] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    return out


def _detail(raw: bytes, spec: MethodSpec) -> Any:
    detail = any_pb2.Any.FromString(raw)
    try:
        return json_format.MessageToDict(detail, descriptor_pool=spec.input.file.pool)
    except (TypeError, KeyError, json_format.Error):  # a type the pool lacks: keep what can be kept
        return {"@type": detail.type_url, "@undecodable": base64.b64encode(detail.value).decode()}


Subscriber = Callable[[Entry], None]


class JournalFilter(NamedTuple):
    """Which entries a reader wants: None (or empty) in a field means any."""

    scenario: str | None = None
    session: str | None = None
    method: str | None = None  # "pkg.Svc/Method"

    def admits(self, entry: Entry) -> bool:
        return (
            (not self.scenario or entry.scenario == self.scenario)
            and (not self.session or entry.session == self.session)
            and (not self.method or entry.method == self.method.lstrip("/"))
        )


class Journal:
    """Ring buffers of entries keyed by (scenario, session): ``size`` entries each, ``max_entries`` in all.

    Memory is bounded by ``min(sessions x size, max_entries)`` entries (about 1 KB each for small calls):
    past ``max_entries`` the journal of the least recently active session is dropped first.

    A session's journal goes when the session is dropped, unless it is kept (:meth:`keep`): then it stays
    readable until its deadline, for reports at the end of a run. ``rule_uses`` counts the calls each rule
    (``file:line``) answered since the journal was made, whatever the bound dropped.
    """

    def __init__(self, size: int = 500, max_entries: int = 100_000) -> None:
        if size < 1:
            raise ValueError("journal size must be at least 1")
        if max_entries < 1:
            raise ValueError("the journal's total bound must be at least 1")
        self.size = size
        self.max_entries = max_entries
        # Least recently active session first: past max_entries its whole journal goes, so many
        # sessions cannot add up past the bound while each active session keeps its recent history.
        self._rings: OrderedDict[tuple[str, str], deque[Entry]] = OrderedDict()
        self._total = 0
        self.dropped = 0  # entries dropped by the total bound, ever
        self.rule_uses: dict[str, int] = {}  # rule file:line -> calls it answered, ever
        # Kept journals of dropped sessions: key -> (monotonic deadline, label). Swept when read or kept,
        # never per call.
        self._kept: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def record(self, entry: Entry) -> None:
        key = (entry.scenario, entry.session)
        rings = self._rings
        with self._lock:
            ring = rings.get(key)
            if ring is None:
                ring = rings[key] = deque(maxlen=self.size)
            else:
                rings.move_to_end(key)
            if len(ring) < self.size:
                self._total += 1
                if self._total > self.max_entries:
                    self._drop_oldest()
            ring.append(entry)
            if self._kept:
                kept = self._kept.get(key)
                if kept is not None:  # a late call of a test that has ended
                    entry.label = kept[1]
            rule = entry.rule
            if rule is not None:
                self.rule_uses[rule] = self.rule_uses.get(rule, 0) + 1
        for subscriber in self._subscribers:
            try:
                subscriber(entry)
            except Exception as exc:
                # A subscriber's bug never breaks the call that was recorded: it is logged and dropped.
                self.unsubscribe(subscriber)
                name = getattr(subscriber, "__qualname__", type(subscriber).__name__)
                log.error("journal.subscriber_dropped", subscriber=name, error=f"{type(exc).__name__}: {exc}")

    def _drop_oldest(self) -> None:
        """Past the total bound: drop whole journals, least recently active first (never the newest)."""
        rings = self._rings
        while self._total > self.max_entries and len(rings) > 1:
            key, oldest = rings.popitem(last=False)
            self._kept.pop(key, None)
            self._total -= len(oldest)
            self.dropped += len(oldest)

    def entries(
        self,
        scenario: str | None = None,
        session: str | None = None,
        method: str | None = None,
        limit: int | None = None,
    ) -> list[Entry]:
        """Entries oldest first; each filter narrows; ``limit`` keeps the newest ones."""
        if self._kept:
            self._sweep()
        if scenario is not None and session is not None:
            rings: Iterable[deque[Entry]] = [self._rings.get((scenario, session), deque())]
        else:
            rings = [
                r
                for (sc, se), r in list(self._rings.items())
                if (scenario is None or sc == scenario) and (session is None or se == session)
            ]
        out = [e for ring in rings for e in list(ring)]
        if method is not None:
            wanted = method.lstrip("/")
            out = [e for e in out if e.method == wanted]
        out.sort(key=lambda e: e.seq)
        if limit is not None and limit > 0:
            out = out[-limit:]
        return out

    def clear(self, scenario: str, session: str) -> None:
        with self._lock:
            self._kept.pop((scenario, session), None)
            ring = self._rings.pop((scenario, session), None)
            self._total -= len(ring) if ring is not None else 0

    def keep(self, scenario: str, session: str, label: str | None, ttl: float) -> None:
        """Keeps the session's journal for ``ttl`` seconds after its session is dropped (the drop event no
        longer clears it), labelling its entries, and those still to come, with ``label``."""
        key = (scenario, session)
        with self._lock:
            ring = self._rings.get(key)
            if ring is not None:  # a session without calls leaves nothing to keep
                self._kept[key] = (time.monotonic() + ttl, label or None)
                for entry in ring:
                    entry.label = label or None
        self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:  # at most once a second: readers call this for every read
            return
        self._next_sweep = now + 1.0
        with self._lock:
            for key in [k for k, (deadline, _) in self._kept.items() if deadline <= now]:
                del self._kept[key]
                ring = self._rings.pop(key, None)
                self._total -= len(ring) if ring is not None else 0

    def drop_scenario(self, scenario: str) -> None:
        with self._lock:
            for key in [k for k in self._rings if k[0] == scenario]:
                self._kept.pop(key, None)
                self._total -= len(self._rings.pop(key))

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Calls ``subscriber`` with every entry as its call finishes, on the serving thread (keep it quick:
        hand work to a queue). One that raises is logged and dropped. Returns the unsubscriber."""
        with self._lock:
            self._subscribers = [*self._subscribers, subscriber]
        return lambda: self.unsubscribe(subscriber)

    def watch(self, subscriber: Subscriber) -> Callable[[], None]:
        """Like :meth:`subscribe`, for readers that follow every replica's calls (WatchJournal): in one
        process, the same thing."""
        return self.subscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not subscriber]

    def drop_session(self, scenario: str, session: str) -> None:
        """A store's drop event: the session's journal goes with it, unless it is kept."""
        if (scenario, session) not in self._kept:
            self.clear(scenario, session)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return sum(len(r) for r in list(self._rings.values()))
