"""Prometheus metrics of a virtual server, exposed by prometheus-client (the ``metrics`` extra).

The static reply is the hot path, so a call pays for metrics only a ``deque.append`` of its journal entry
(the subscriber is the deque's own method: no Python frame, no lock). The endpoint's thread drains the
deque every :data:`DRAIN_INTERVAL` seconds, and every scrape first, into plain integers per (method,
scenario) under one lock; prometheus-client reads them only when scraped, through a collector, instead of
its per-child locks and label look-ups on every call. The in-flight gauge is the dispatcher's own
lock-free count.

Label cardinality is bounded whatever the clients send: a session id is never a label, a method is one of
the catalog's, a code one of gRPC's, and a scenario one that was loaded when a call named it (an unknown
name sent in a header is counted as ``(unknown)``; past :data:`MAX_SCENARIO_LABELS` distinct names, say
after many scenarios put and deleted through the admin API, further ones are ``(other)``).
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable, Container, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from virtsvc.engine.router import NO_SCENARIO
from virtsvc.errors import ConfigError

if TYPE_CHECKING:
    from virtsvc.engine.journal import Entry, Journal

__all__ = [
    "DRAIN_INTERVAL",
    "DURATION_BUCKETS",
    "MAX_SCENARIO_LABELS",
    "OVERHEAD_BUCKETS",
    "CallMetrics",
    "MetricsEndpoint",
    "import_prometheus",
]

#: Upper bounds (seconds) of the total-time histogram: from a static reply's tenth of a millisecond to
#: simulated delays of seconds.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)  # fmt: skip
#: Upper bounds (seconds) of virtsvc's own time per call (the total less the simulated delay).
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
MAX_SCENARIO_LABELS = 200
#: seconds between the drains of recorded entries into the counts (a scrape drains first, so it is exact)
DRAIN_INTERVAL = 0.25
UNKNOWN_SCENARIO = "(unknown)"  # a name no loaded scenario has (sent in a header, or since deleted)
NO_SCENARIO_LABEL = "(none)"  # the call named no scenario and there is no default
OTHER_SCENARIO = "(other)"  # past MAX_SCENARIO_LABELS distinct names


def import_prometheus() -> Any:
    """The ``prometheus_client`` module, or a ConfigError saying how to install it."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            "metrics need prometheus-client: pip install 'virtsvc[metrics]' (or prometheus-client)"
        ) from None
    return prometheus_client


class _Child:
    """The counts of one (method, scenario label): calls by status code, unmatched calls, and the two
    histograms as per-bucket counts (made cumulative at scrape) with their sums."""

    __slots__ = ("codes", "duration", "duration_sum", "method", "overhead", "overhead_sum", "scenario",
                 "unmatched")  # fmt: skip

    def __init__(self, method: str, scenario: str, buckets: int, own_buckets: int) -> None:
        self.method = method
        self.scenario = scenario
        self.codes: dict[int, int] = {}  # id(StatusCode) -> calls: hashing an enum member costs more
        self.unmatched = 0
        self.duration = [0] * (buckets + 1)  # the last one is +Inf
        self.duration_sum = 0.0
        self.overhead = [0] * (own_buckets + 1)
        self.overhead_sum = 0.0


_CODE_NAMES = {id(code): code.name for code in grpc.StatusCode}


class CallMetrics:
    """Counts calls for Prometheus: a journal subscriber (:attr:`record`) and a collector.

    ``scenarios`` says whether a scenario name is loaded (the server's registry); ``sessions`` how many
    sessions live now; ``in_flight`` how many calls are being answered (the dispatcher counts them, lock
    free); ``journal`` is read for the entries its bound dropped.
    """

    def __init__(
        self,
        scenarios: Container[str],
        journal: Journal,
        sessions: Callable[[], int],
        in_flight: Callable[[], int],
        *,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        overhead_buckets: Sequence[float] = OVERHEAD_BUCKETS,
    ) -> None:
        self._scenarios = scenarios
        self._journal = journal
        self._sessions = sessions
        self._in_flight = in_flight
        self.duration_buckets = tuple(duration_buckets)
        self.overhead_buckets = tuple(overhead_buckets)
        self._lock = threading.Lock()
        self._labels: dict[str, str] = {}  # scenario name -> its label, for the names seen so far
        # (method, scenario name) -> its child: one look-up per call. Names that are not labels of their
        # own (unknown, past the bound) share their label's child but are never keys here.
        self._children: dict[tuple[str, str], _Child] = {}
        self._by_label: dict[tuple[str, str], _Child] = {}
        self._pending: deque[Entry] = deque()
        #: the journal subscriber (``VirtualServer.subscribe``): a C method, so a call runs no Python code
        #: for metrics; the entries are counted later, off the call's path, by :meth:`drain`
        self.record: Callable[[Entry], None] = self._pending.append

    # -- the subscriber ----------------------------------------------------------------------------------

    def drain(self) -> None:
        """Counts the entries recorded since the last drain (the endpoint's thread calls it every
        :data:`DRAIN_INTERVAL` seconds, and every scrape first)."""
        pending = self._pending
        bounds, own_bounds = self.duration_buckets, self.overhead_buckets
        children = self._children
        with self._lock:
            while pending:
                entry = pending.popleft()
                key = (entry.method, entry.scenario)
                child = children.get(key) or self._child(key)
                codes = child.codes
                code = id(entry.code)
                codes[code] = codes.get(code, 0) + 1
                if entry.near_miss is not None:
                    child.unmatched += 1
                total = entry.duration
                own = total - entry.delay
                child.duration[bisect.bisect_left(bounds, total)] += 1
                child.duration_sum += total
                child.overhead[bisect.bisect_left(own_bounds, own)] += 1
                child.overhead_sum += own

    def _child(self, key: tuple[str, str]) -> _Child:
        """The child of a (method, scenario name) not seen before (under the lock); only loaded names are
        remembered."""
        method, name = key
        if name == NO_SCENARIO:
            label = NO_SCENARIO_LABEL
        elif name not in self._scenarios:
            label = UNKNOWN_SCENARIO  # never remembered: a client may send any number of names
        else:
            label = self._labels.get(name) or (
                name if len(self._labels) < MAX_SCENARIO_LABELS else OTHER_SCENARIO
            )
            self._labels[name] = label
        child = self._by_label.get((method, label))
        if child is None:
            child = _Child(method, label, len(self.duration_buckets), len(self.overhead_buckets))
            self._by_label[method, label] = child
        if label != UNKNOWN_SCENARIO:
            self._children[key] = child
        return child

    @property
    def in_flight(self) -> int:
        """Calls started and not yet finished."""
        return self._in_flight()

    # -- the collector (prometheus-client calls it at each scrape) ----------------------------------

    def describe(self) -> list[Any]:
        return []  # no description at registration: collect() is only called when scraped

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        in_flight = self._in_flight()
        self.drain()
        with self._lock:
            children = sorted(self._by_label.values(), key=lambda c: (c.method, c.scenario))
            calls = {
                (c.method, c.scenario, _CODE_NAMES[code]): n for c in children for code, n in c.codes.items()
            }
            unmatched = {(c.method, c.scenario): c.unmatched for c in children if c.unmatched}
            durations = {(c.method, c.scenario): (list(c.duration), c.duration_sum) for c in children}
            overheads = {(c.method, c.scenario): (list(c.overhead), c.overhead_sum) for c in children}
        family = CounterMetricFamily(
            "virtsvc_calls",
            "Calls answered, by method, scenario and status code",
            labels=["method", "scenario", "code"],
        )
        for (method, scenario, code), n in sorted(calls.items()):
            family.add_metric([method, scenario, code], n)
        yield family
        family = CounterMetricFamily(
            "virtsvc_unmatched_calls",
            "Calls no rule answered (the near miss is in the journal and the rpc log event)",
            labels=["method", "scenario"],
        )
        for (method, scenario), n in sorted(unmatched.items()):
            family.add_metric([method, scenario], n)
        yield family
        yield _histogram(
            "virtsvc_call_duration_seconds",
            "Total time of a call, simulated delay included, from its arrival to its status",
            self.duration_buckets,
            durations,
        )
        yield _histogram(
            "virtsvc_overhead_seconds",
            "virtsvc's own time per call: the total less the simulated delay",
            self.overhead_buckets,
            overheads,
        )
        gauge = GaugeMetricFamily("virtsvc_calls_in_flight", "Calls being answered now (queue depth)")
        gauge.add_metric([], in_flight)
        yield gauge
        gauge = GaugeMetricFamily("virtsvc_sessions", "Sessions live now (holding state or rules)")
        gauge.add_metric([], self._sessions())
        yield gauge
        counter = CounterMetricFamily(
            "virtsvc_journal_dropped_entries",
            "Journal entries dropped by its total bound (--journal-total), least recently active first",
        )
        counter.add_metric([], self._journal.dropped)
        yield counter


def _histogram(
    name: str, doc: str, bounds: tuple[float, ...], children: dict[tuple[str, str], tuple[list[int], float]]
) -> Any:
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    family = HistogramMetricFamily(name, doc, labels=["method", "scenario"])
    for (method, scenario), (counts, total) in sorted(children.items()):
        cumulative, running = [], 0
        for bound, n in zip((*bounds, float("inf")), counts, strict=True):
            running += n
            cumulative.append((floatToGoString(bound), running))
        family.add_metric([method, scenario], cumulative, total)
    return family


class MetricsEndpoint:
    """``/metrics`` over HTTP (prometheus-client's own server) for one :class:`CallMetrics`."""

    def __init__(self, metrics: CallMetrics, host: str, port: int) -> None:
        prometheus = import_prometheus()
        self.registry = prometheus.CollectorRegistry(auto_describe=False)
        self.registry.register(metrics)
        # The process's own CPU, memory and file descriptors, as every Prometheus target has them.
        prometheus.ProcessCollector(registry=self.registry)
        self.host = host
        try:
            self._server, self._thread = prometheus.start_http_server(
                port, addr=host.strip("[]"), registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (--metrics-port)"
            ) from None
        self.port: int = self._server.server_port
        self._metrics = metrics
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain, name="virtsvc-metrics", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL):
            self._metrics.drain()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._stop.set()
        self._drainer.join(5)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
