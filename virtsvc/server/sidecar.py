"""`virtsvc serve`: the long-running sidecar around a VirtualServer.

Ready event, scenario hot reload (``--watch``), and a graceful stop on SIGTERM/SIGINT: health turns
NOT_SERVING, no new calls are accepted, in-flight calls get ``--grace`` seconds, then exit 0. Its lifecycle
events: ``serving`` (the address, and where metrics are served), ``reloaded`` (or ``reload_failed``, the
old scenarios kept), ``draining`` (a signal arrived) and ``stopped``.
"""

from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from virtsvc import _logs
from virtsvc.contracts.catalog import Catalog
from virtsvc.errors import ConfigError, ScenarioError
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.scenarios.sources import SUFFIXES
from virtsvc.server.options import ServeOptions
from virtsvc.server.virtual_server import VirtualServer
from virtsvc.server.workers import WorkerLink

__all__ = ["ScenarioWatcher", "run_sidecar"]

log = _logs.get_logger("virtsvc")


def run_sidecar(
    *,
    catalog: Catalog,
    scenario_paths: Sequence[Path],
    options: ServeOptions,
    worker: WorkerLink | None = None,
) -> int:
    """Serves until SIGTERM/SIGINT, then drains for ``options.grace`` seconds; returns the exit status.

    As one ``worker`` of ``serve --workers`` it shares the supervisor's port, tells the supervisor (not the
    log) that it serves, and stops when told to or when the supervisor is gone; the supervisor logs the
    lifecycle events for all its workers.
    """
    if worker is not None:
        options = _as_worker(options, worker)
    server = VirtualServer(catalog, load_scenarios(scenario_paths, catalog, options.upstreams), options)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if worker is None:
            log.info("draining", signal=signal.Signals(signum).name, grace=options.grace)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _settle_heap()
    server.start()
    watcher = None
    if options.watch:
        watcher = ScenarioWatcher(server, scenario_paths)
        watcher.start()
    if worker is not None:
        worker.watch_supervisor(stop.set)
    serving = dict(
        host=options.host,
        port=server.port,
        address=server.address,
        services=list(catalog.services),
        scenarios=server.registry.names(),
        default_scenario=options.default_scenario,
        watch=options.watch,
        mode=options.mode,
        upstreams=dict(options.upstreams),
        tls=server.tls,
        admin_auth=bool(options.admin_token),  # whether a token is set; the token itself is never logged
        max_concurrency=server.max_concurrency,
        max_concurrency_per_session=server.max_concurrency_per_session,
        dashboard=server.dashboard.url if server.dashboard is not None else None,
        metrics=server.metrics_endpoint.url if server.metrics_endpoint is not None else None,
        traces=server.tracing is not None,
        log_calls=options.log_calls,
        store=server.store_name,  # without the password
        time_scale=options.time_scale,
    )
    if worker is None:
        log.info("serving", **serving)
    else:
        worker.ready(serving)
    while not stop.wait(0.5):
        pass
    if watcher is not None:
        watcher.stop()
    server.stop(options.grace)
    if worker is None:
        log.info("stopped")
    return 0


def _as_worker(options: ServeOptions, worker: WorkerLink) -> ServeOptions:
    """A worker's settings: the shared port; a metrics port of its own (the ones after ``--metrics-port``, or
    each a free one for 0), and the dashboard on the first worker alone."""
    metrics_port = options.metrics_port
    if metrics_port:
        metrics_port += worker.index
    return options.replace(
        port=worker.port,
        reuse_port=True,
        metrics_port=metrics_port,
        dashboard_port=options.dashboard_port if worker.index == 0 else None,
    )


class ScenarioWatcher(threading.Thread):
    """Polls the scenario paths and reloads on change; a reload that fails validation keeps the old ones."""

    def __init__(self, server: VirtualServer, paths: Sequence[Path], interval: float = 0.3) -> None:
        super().__init__(name="virtsvc-watch", daemon=True)
        self.server = server
        self.paths = list(paths)
        self.interval = interval
        self._stop = threading.Event()
        self._seen = self._snapshot()

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        seen: dict[str, tuple[int, int]] = {}
        for root in self.paths:
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES)
            for path in files:
                try:
                    st = path.stat()
                except OSError:
                    continue
                seen[str(path)] = (st.st_mtime_ns, st.st_size)
        return seen

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            current = self._snapshot()
            if current != self._seen:
                self._seen = current
                self.reload()

    def reload(self) -> bool:
        try:
            scenarios = load_scenarios(self.paths, self.server.catalog, self.server.upstreams)
        except ScenarioError as exc:
            problems = [str(p) for p in exc.problems]
            log.error("reload_failed", problems=problems, kept=self.server.registry.names())
            return False
        except ConfigError as exc:
            log.error("reload_failed", problems=[str(exc)], kept=self.server.registry.names())
            return False
        # Scenarios put through the admin API are not files: they survive a reload of the files.
        kept = [s for s in self.server.registry.scenarios() if s.location.file.startswith("<")]
        names = {s.name for s in scenarios}
        self.server.reload([*scenarios, *(s for s in kept if s.name not in names)])
        _settle_heap(refreeze=True)
        log.info("reloaded", scenarios=self.server.registry.names())
        return True

    def stop(self) -> None:
        self._stop.set()


_YOUNG_THRESHOLD = 7_000


def _settle_heap(refreeze: bool = False) -> None:
    """Moves what was loaded (descriptors, compiled scenarios) out of the cyclic collector's sight.

    Tens of thousands of long-lived rule objects otherwise get walked by every full collection, which
    made per-call cost grow with the number of rules loaded. Only the sidecar does this: it owns its
    process. `virtsvc serve` has frozen what it imported already (cli._cmd_serve), so this collection
    walks only what was loaded.

    The youngest generation is collected after 7,000 net allocations instead of 700: a call allocates a few
    dozen objects that reference counting frees anyway, and collecting ten times less often cut the
    server's CPU per call by 4-7% (bench, same run). The older generations keep their defaults: raising
    those let garbage cycles from cancelled calls pile up (the soak's memory more than doubled).
    """
    if refreeze:
        gc.unfreeze()  # the replaced scenarios must become collectable
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNG_THRESHOLD, older, oldest)
