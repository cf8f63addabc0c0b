"""`virtsvc serve --workers N`: N sidecar processes answering on one port, as one server.

Python answers calls on one core per process; more cores need more processes. The supervisor (the process
`virtsvc serve` started) serves nothing itself: it settles the port once (``--port 0`` becomes a free port it
holds, with SO_REUSEPORT, until every worker listens on it), starts the first worker alone, so that a bad
flag or scenario is reported once, by it, then the others, each the same command line with
``VIRTSVC_WORKER`` set. Each worker binds the port with SO_REUSEPORT and the kernel spreads incoming
connections over them. The state calls share (sessions, sequences, ``times``, journals, admin changes) must
then live in a shared store, so more than one worker needs ``--store redis://...``.

Lifecycle events, one of each for the whole server: ``serving`` once every worker is ready (the single-worker
fields, plus ``workers``: each worker's pid and metrics URL), ``draining`` when SIGTERM/SIGINT arrives (it
is passed on to every worker, which drains for ``--grace`` as a single server does) and ``stopped``. A
worker that exits on its own is reported as ``worker_exited`` (its pid, exit status or signal); the
supervisor then drains the others and exits 1, so the orchestrator restarts the replica as a whole and
counts the failure, instead of a restart inside it that nobody sees.

Each worker holds one end of a socket pair to the supervisor: it writes its ready line on it, and when the
supervisor goes away (even by SIGKILL) the worker reads end-of-file and drains itself: no orphans.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtsvc import _logs
from virtsvc.errors import ConfigError

__all__ = ["ENVIRONMENT", "WorkerLink", "run_workers"]

#: The variable that makes `virtsvc serve` one worker of a supervisor: JSON with index, count, port, fd.
ENVIRONMENT = "VIRTSVC_WORKER"

#: How long a worker may take to become ready (loading large contracts on a loaded machine is slow).
READY_TIMEOUT = 120.0

log = _logs.get_logger("virtsvc")


@dataclass
class WorkerLink:
    """A worker's side: which worker it is, the port it shares, and its line to the supervisor."""

    index: int
    count: int
    port: int
    sock: socket.socket

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> WorkerLink | None:
        """The link the supervisor handed this process, or None when it is not a worker."""
        text = environ.get(ENVIRONMENT)
        if not text:
            return None
        try:
            spec = json.loads(text)
            sock = socket.socket(fileno=int(spec["fd"]))
            return cls(int(spec["index"]), int(spec["count"]), int(spec["port"]), sock)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ConfigError(f"{ENVIRONMENT}={text!r}: not a worker hand-over ({exc})") from None

    def ready(self, fields: Mapping[str, Any]) -> None:
        """Tells the supervisor this worker serves; ``fields`` are those of its ``serving`` event."""
        self.sock.sendall(json.dumps({"pid": os.getpid(), **fields}).encode() + b"\n")

    def watch_supervisor(self, on_gone: Callable[[], None]) -> None:
        """Calls ``on_gone()`` (on a daemon thread) once the supervisor's end of the link is closed."""

        def watch() -> None:
            try:
                while self.sock.recv(64):
                    pass
            except OSError:
                pass
            on_gone()

        threading.Thread(target=watch, name="virtsvc-supervisor", daemon=True).start()


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    sock: socket.socket
    buffer: bytes = b""
    ready: dict[str, Any] | None = None
    reported: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class _Supervisor:
    argv: Sequence[str]
    count: int
    host: str
    port: int
    grace: float
    workers: list[_Worker] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        spec = {"index": index, "count": self.count, "port": self.port, "fd": theirs.fileno()}
        process = subprocess.Popen(
            [sys.executable, "-m", "virtsvc.cli", *self.argv],
            env={**os.environ, ENVIRONMENT: json.dumps(spec)},
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        worker = _Worker(index, process, ours)
        self.workers.append(worker)
        return worker

    def await_ready(self, workers: Sequence[_Worker]) -> _Worker | None:
        """Waits until ``workers`` are all ready; returns one that exited first, or None."""
        selector = selectors.DefaultSelector()
        pending = {w.sock: w for w in workers}
        for sock in pending:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while pending and not self.stop.is_set():
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"{len(pending)} of {self.count} workers not ready after {READY_TIMEOUT:.0f} s"
                    )
                for key, _ in selector.select(0.2):
                    worker = pending[key.fileobj]  # type: ignore[index]
                    chunk = worker.sock.recv(65536)
                    worker.buffer += chunk
                    if b"\n" in worker.buffer:
                        worker.ready = json.loads(worker.buffer.partition(b"\n")[0])
                    if worker.ready is not None or not chunk:
                        selector.unregister(worker.sock)
                        del pending[worker.sock]
                for worker in workers:
                    if worker.ready is None and worker.process.poll() is not None:
                        return worker
            for worker in workers:  # its link closed before it was ready: it is on its way out
                if worker.ready is None and not self.stop.is_set():
                    worker.process.wait()
                    return worker
            return None
        finally:
            selector.close()

    def exited(self) -> _Worker | None:
        for worker in self.workers:
            if worker.process.poll() is not None and not worker.reported:
                return worker
        return None

    def report(self, worker: _Worker) -> None:
        worker.reported = True
        code = worker.process.returncode
        how: dict[str, Any] = {"exit_code": code}
        if code < 0:
            how = {"signal": signal.Signals(-code).name}
        log.error("worker_exited", worker=worker.index, pid=worker.pid, **how)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # exited between poll and signal
                    worker.process.send_signal(signum)

    def drain(self) -> int:
        """SIGTERM to every worker, then waits for them (SIGKILL past the grace and a margin)."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 15.0
        codes = []
        for worker in self.workers:
            try:
                codes.append(worker.process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                codes.append(worker.process.wait())
            worker.sock.close()
        return 0 if all(c == 0 for c in codes) else 1


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT, holding the port for the workers.

    A port someone else holds is refused here, once, in the words of a single server; port 0 becomes the
    free port every worker will share.
    """
    target = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        raise ConfigError(f"cannot listen on {target}: unknown host {host!r}") from None
    family, kind, proto, _, address = infos[0]
    if port:
        with socket.socket(family, kind, proto) as probe:  # without SO_REUSEPORT: nobody else may hold it
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {target}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {target}: {exc.strerror or exc}") from None
    return sock


def run_workers(argv: Sequence[str], *, count: int, host: str, port: int, grace: float) -> int:
    """Runs ``virtsvc ARGV`` as ``count`` workers sharing ``host:port``; returns the exit status.

    ``argv`` is the serve command line as given: each worker parses it again (the same flags, the same
    ``[tool.virtsvc]``), and takes the port and its place from ``VIRTSVC_WORKER``.
    """
    reservation = _reserve(host, port)
    supervisor = _Supervisor(argv, count, host, reservation.getsockname()[1], grace)

    def on_signal(signum: int, frame: object) -> None:
        if not supervisor.stop.is_set():
            log.info("draining", signal=signal.Signals(signum).name, grace=grace, workers=count)
        supervisor.stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(supervisor, reservation)
    finally:
        reservation.close()
        for worker in supervisor.workers:  # whatever happened, no worker outlives its supervisor
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _supervise(supervisor: _Supervisor, reservation: socket.socket) -> int:
    first = supervisor.spawn(0)
    failed = supervisor.await_ready([first])
    if failed is not None:  # it said why on stderr, as a single server would have
        return failed.process.wait() or 1
    failed = supervisor.await_ready([supervisor.spawn(i) for i in range(1, supervisor.count)])
    if failed is not None:
        supervisor.report(failed)
        supervisor.drain()
        return 1
    if supervisor.stop.is_set():
        supervisor.drain()
        log.info("stopped")
        return 0
    reservation.close()  # every worker listens now: the port is theirs
    ready = dict(first.ready or {})
    ready.pop("pid", None)
    log.info(
        "serving",
        **ready,
        workers=[{"pid": w.pid, "metrics": (w.ready or {}).get("metrics")} for w in supervisor.workers],
    )
    exited = None
    while not supervisor.stop.wait(0.2):
        exited = supervisor.exited()
        if exited is not None:
            supervisor.report(exited)
            break
    status = supervisor.drain()
    log.info("stopped")
    return 1 if exited is not None else status
