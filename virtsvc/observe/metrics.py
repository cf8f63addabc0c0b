"""Prometheus metrics of a virtual server, exposed by prometheus-client (the ``metrics`` extra).

A call observer counts each call as it ends (and as it starts, for the in-flight gauge) in plain integers
under one lock; prometheus-client reads them only when scraped, through a collector. Per call that is one
dict look-up per family and a ``bisect`` per histogram, instead of prometheus-client's per-child locks and
label look-ups: the static reply is the hot path.

Label cardinality is bounded whatever the clients send: a session id is never a label, a method is one of
the catalog's, a code one of gRPC's, and a scenario one that was loaded when a call named it (an unknown
name sent in a header is counted as ``(unknown)``; past :data:`MAX_SCENARIO_LABELS` distinct names, say
after many scenarios put and deleted through the admin API, further ones are ``(other)``).
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Container, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from virtsvc.engine.router import NO_SCENARIO
from virtsvc.errors import ConfigError

if TYPE_CHECKING:
    from virtsvc.engine.journal import Journal
    from virtsvc.engine.pipeline import Exchange

__all__ = [
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


class _Histogram:
    """One histogram child: per-bucket counts (not cumulative: made so at scrape), their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.sum = 0.0


class CallMetrics:
    """Counts calls for Prometheus; a call observer (``VirtualServer.add_observer``) and a collector.

    ``scenarios`` says whether a scenario name is loaded (the server's registry); ``sessions`` how many
    sessions live now; ``journal`` is read for the entries its bound dropped.
    """

    def __init__(
        self,
        scenarios: Container[str],
        journal: Journal,
        sessions: Callable[[], int],
        *,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        overhead_buckets: Sequence[float] = OVERHEAD_BUCKETS,
    ) -> None:
        self._scenarios = scenarios
        self._journal = journal
        self._sessions = sessions
        self.duration_buckets = tuple(duration_buckets)
        self.overhead_buckets = tuple(overhead_buckets)
        self._lock = threading.Lock()
        # Calls started: next() on a count is atomic under the GIL, so a call's start takes no lock; reading
        # it advances it too, which _reads makes up for.
        self._starts = itertools.count()
        self._reads = 0
        self._finished = 0
        self._labels: dict[str, str] = {}  # scenario name -> its label, for the names seen so far
        self._calls: dict[tuple[str, str, str], int] = {}  # (method, scenario, code)
        self._unmatched: dict[tuple[str, str], int] = {}  # (method, scenario)
        self._duration: dict[tuple[str, str], _Histogram] = {}
        self._overhead: dict[tuple[str, str], _Histogram] = {}

    # -- the observer ----------------------------------------------------------------------------------

    def on_start(self, exchange: Exchange) -> object:
        next(self._starts)
        return None

    def on_finish(self, exchange: Exchange, token: object) -> None:
        entry = exchange.entry
        if entry is None:  # pragma: no cover - every call opens its entry before it ends
            with self._lock:
                self._finished += 1
            return
        scenario = self._labels.get(entry.scenario) or self._label(entry.scenario)
        key = (entry.method, scenario)
        total = entry.duration
        own = total - entry.delay
        bounds, own_bounds = self.duration_buckets, self.overhead_buckets
        with self._lock:
            self._finished += 1
            calls = (entry.method, scenario, entry.code.name)
            self._calls[calls] = self._calls.get(calls, 0) + 1
            if entry.near_miss is not None:
                self._unmatched[key] = self._unmatched.get(key, 0) + 1
            duration = self._duration.get(key)
            if duration is None:
                duration = self._duration[key] = _Histogram(len(bounds))
                self._overhead[key] = _Histogram(len(own_bounds))
            duration.counts[bisect.bisect_left(bounds, total)] += 1
            duration.sum += total
            overhead = self._overhead[key]
            overhead.counts[bisect.bisect_left(own_bounds, own)] += 1
            overhead.sum += own

    def _label(self, name: str) -> str:
        """The label of a scenario name not seen before (only names of loaded scenarios are kept)."""
        if name == NO_SCENARIO:
            return NO_SCENARIO_LABEL
        if name not in self._scenarios:
            return UNKNOWN_SCENARIO  # never remembered: a client may send any number of names
        with self._lock:
            label = self._labels.get(name)
            if label is None:
                label = name if len(self._labels) < MAX_SCENARIO_LABELS else OTHER_SCENARIO
                self._labels[name] = label
        return label

    @property
    def in_flight(self) -> int:
        """Calls started and not yet finished."""
        with self._lock:
            return self._in_flight()

    def _in_flight(self) -> int:
        # under the lock: no call finishes meanwhile, so it never reads below the calls it has counted
        self._reads += 1
        return next(self._starts) - self._reads + 1 - self._finished

    # -- the collector (prometheus-client calls it at each scrape) ----------------------------------

    def describe(self) -> list[Any]:
        return []  # no description at registration: collect() is only called when scraped

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            in_flight = self._in_flight()
            calls = dict(self._calls)
            unmatched = dict(self._unmatched)
            durations = {k: (list(h.counts), h.sum) for k, h in self._duration.items()}
            overheads = {k: (list(h.counts), h.sum) for k, h in self._overhead.items()}
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

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
