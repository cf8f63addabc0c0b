"""The virtual server: router + health + reflection + admin on one grpc server.

Start, drain and stop. Health reports SERVING only once the server accepts calls and NOT_SERVING while it
drains, so orchestrators and test fixtures can wait on it.

Limits: ``max_message_bytes`` both ways (RESOURCE_EXHAUSTED beyond it), ``max_concurrency`` for the whole
server and ``max_concurrency_per_session`` (RESOURCE_EXHAUSTED beyond them, at once, with a message naming the
limit); ``credentials`` (see :func:`tls_credentials`) for TLS and mutual TLS on the serving port.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2

from virtsvc import _logs
from virtsvc.contracts.catalog import Catalog
from virtsvc.contracts.reflection import add_reflection
from virtsvc.engine import clock
from virtsvc.engine.clock import VirtualClock
from virtsvc.engine.journal import Entry, Journal
from virtsvc.engine.observers import CallObserver
from virtsvc.engine.pipeline import Dispatcher, server_stopping_message
from virtsvc.engine.router import Registry, Router
from virtsvc.engine.store import MemoryStore, RuleSet, Store
from virtsvc.errors import ConfigError, Refusal
from virtsvc.scenarios.model import CompiledScenario
from virtsvc.server.health import ScenarioHealth
from virtsvc.server.options import DEFAULT_MAX_MESSAGE_BYTES, ServeOptions
from virtsvc.upstream import GrpcUpstream

if TYPE_CHECKING:
    from virtsvc.observe.dashboard import Dashboard
    from virtsvc.server.replicas import SharedChanges

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ServeOptions",
    "VirtualServer",
    "tls_credentials",
    "tls_from_options",
]

if TYPE_CHECKING:
    from virtsvc.observe.metrics import CallMetrics, MetricsEndpoint
    from virtsvc.observe.traces import Tracing

log = _logs.get_logger("virtsvc.server.virtual_server")

# Workers kept free beyond --max-concurrency, so that calls over the limit are refused at once rather than
# queued behind the busy ones (a refusal needs a worker thread too, for a few microseconds).
SPARE_WORKERS = 8
STORE_PING_INTERVAL = 1.0  # seconds between the pings that let health follow a shared store


def _read_pem(path: str | Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path}: not a PEM file (no -----BEGIN ...----- block)")
    return data


def tls_from_options(options: ServeOptions) -> grpc.ServerCredentials | None:
    """TLS credentials from the options' --tls-cert/--tls-key (and --tls-client-ca), else None."""
    cert, key, client_ca = options.tls_cert, options.tls_key, options.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together: give both, or neither to serve plaintext")
    return tls_credentials(cert, key, client_ca)


def tls_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """Server credentials for TLS from PEM files; with ``client_ca``, mutual TLS: every client must present
    a certificate signed by that CA (``require_client_auth``), others are refused during the handshake.

    Unreadable or invalid files raise ConfigError with one line naming the file and the flag
    (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``).
    """
    cert_pem = _read_pem(cert, "--tls-cert")
    key_pem = _read_pem(key, "--tls-key")
    ca_pem = _read_pem(client_ca, "--tls-client-ca") if client_ca is not None else None
    # grpc reports bad PEM only when the port is added, as an opaque failure; the ssl module says why.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a usable certificate and matching private key "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:  # pragma: no cover - read above
        raise ConfigError(f"--tls-cert {cert}: cannot read: {exc.strerror or exc}") from None
    if ca_pem is not None:
        try:
            context.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(
                f"--tls-client-ca {client_ca}: not a usable CA certificate ({reason})"
            ) from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


class VirtualServer:
    """Virtual services for every service of ``catalog``, answering from ``scenarios``.

    Settings come as one :class:`ServeOptions` (``options``) and/or as its fields by keyword
    (``VirtualServer(catalog, scenarios, port=0, max_concurrency=8)``); keywords win. ``store`` replaces the
    embedded in-memory session store; ``credentials`` serve TLS (see :func:`tls_credentials`), else the
    options' ``tls_cert``/``tls_key``/``tls_client_ca`` files do.
    """

    def __init__(
        self,
        catalog: Catalog,
        scenarios: Iterable[CompiledScenario] = (),
        options: ServeOptions | None = None,
        *,
        store: Store | None = None,
        credentials: grpc.ServerCredentials | None = None,
        **settings: Any,
    ) -> None:
        options = (options or ServeOptions()).replace(**settings) if settings else (options or ServeOptions())
        self.options = options
        self.catalog = catalog
        self.host = options.host
        self.requested_port = options.port
        self.port = 0
        self._owns_store = store is None
        self.store: Store = store if store is not None else self._make_store(options)
        self.journal = self._make_journal(options, catalog)
        #: the store as logs name it (a Redis URL without its password)
        self.store_name: str = getattr(self.store, "name", "memory")
        self.store.subscribe(self.journal.drop_session)  # a dropped session's journal goes with it
        self.registry = Registry(scenarios)
        default_scenario = options.default_scenario
        if default_scenario is not None and default_scenario not in self.registry:
            raise ConfigError(
                f'default scenario "{default_scenario}" is not loaded; loaded scenarios: '
                + (", ".join(self.registry.names()) or "none")
            )
        #: the real services calls may be forwarded to, by name (``options.upstreams``)
        self.upstreams = {
            name: GrpcUpstream(name, address, max_message_bytes=options.max_message_bytes)
            for name, address in options.upstreams.items()
        }
        if getattr(self.store, "compile_rules", False) is None:
            self.store.compile_rules = self.compile_session_rules  # type: ignore[attr-defined]
        #: the admin changes shared with other replicas through the store (None: this process alone)
        self.changes: SharedChanges | None = None
        if hasattr(self.store, "on_changes"):
            from virtsvc.server.replicas import SharedChanges

            self.changes = SharedChanges(self)
        self.router = Router(
            self.registry,
            self.store,
            default_scenario,
            mode=options.mode,
            upstream=next(iter(self.upstreams), None),
        )
        self.stopping = threading.Event()  # the grace is over: delays and waits end now
        self.draining = threading.Event()  # stop() has begun: long-lived watches end now
        self.dispatcher = Dispatcher(
            catalog,
            self.router,
            self.journal,
            stopping=self.stopping,
            max_message_bytes=options.max_message_bytes,
            max_concurrency=options.max_concurrency,
            max_concurrency_per_session=options.max_concurrency_per_session,
            upstreams=self.upstreams,
            time_scale=options.time_scale,
        )
        # A session's end ends the streams its calls held open for the test.
        self.store.subscribe(self.dispatcher.streams.end_session)
        self.health = ScenarioHealth(self.router, self.dispatcher, catalog)
        max_workers = options.max_workers
        if options.max_concurrency is not None:
            # Enough workers for every admitted call plus a few to refuse the rest at once.
            max_workers = max(max_workers, options.max_concurrency + SPARE_WORKERS)
        self.max_concurrency = options.max_concurrency
        self.max_concurrency_per_session = options.max_concurrency_per_session
        self._max_workers = max_workers
        self.executor: futures.ThreadPoolExecutor | None = None
        if credentials is None:
            credentials = tls_from_options(options)
        self._credentials = credentials
        self.tls = "mutual" if options.tls_client_ca is not None else bool(credentials)
        self._server: grpc.Server | None = None
        self._services: list[str] = []
        self.dashboard: Dashboard | None = None
        if options.dashboard_port is not None:
            from virtsvc.observe.dashboard import Dashboard

            # Made here, so a dashboard that may not serve (off loopback without a token) fails before
            # anything listens; it starts and stops with the server.
            self.dashboard = Dashboard(
                self.journal,
                self.registry,
                host=options.host,
                port=options.dashboard_port,
                token=options.admin_token,
                history=options.history,
            )
        self._observe(options)

    def _observe(self, options: ServeOptions) -> None:
        """What watches the calls: the ``rpc`` log, metrics and traces, each only when asked for."""
        if options.log_calls:
            from virtsvc.observe.logs import CallLog

            self.subscribe(CallLog())
        #: the call counters behind /metrics (None without ``metrics_port``)
        self.metrics: CallMetrics | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        if options.metrics_port is not None:
            from virtsvc.observe.metrics import CallMetrics, import_prometheus

            import_prometheus()  # missing: a ConfigError now, not at start
            store = self.store
            in_flight = self.dispatcher.in_flight
            self.metrics = CallMetrics(
                self.registry, self.journal, lambda: len(store), lambda: in_flight.value
            )
            self.subscribe(self.metrics.record)
        #: the spans of calls (None when OpenTelemetry is not configured, see virtsvc.observe.traces)
        self.tracing: Tracing | None = None
        if options.traces is not False:
            from virtsvc.observe.traces import tracing_from_environment

            self.tracing = tracing_from_environment(required=options.traces is True)
            if self.tracing is not None:
                self.add_observer(self.tracing)

    def subscribe(self, subscriber: Callable[[Entry], None]) -> Callable[[], None]:
        """Calls ``subscriber(entry)`` with every journal entry as its call finishes (on the serving thread:
        keep it quick). A subscriber that raises is logged and dropped; it never breaks a call. Returns a
        function that unsubscribes."""
        return self.journal.subscribe(subscriber)

    def add_observer(self, observer: CallObserver) -> Callable[[], None]:
        """Adds a call observer, told of every call as it starts and as it ends (see
        ``virtsvc.engine.observers``: metrics, traces, an in-flight count). Returns its remover."""
        return self.dispatcher.add_observer(observer)

    @property
    def address(self) -> str:
        """``host:port`` to dial (brackets around IPv6 hosts)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def default_scenario(self) -> str | None:
        return self.router.default_scenario

    def start(self) -> VirtualServer:
        if self.changes is not None:
            try:
                self.changes.catch_up()  # scenarios other replicas put before this one started
            except Refusal as exc:
                raise ConfigError(exc.message) from None
        options = self.options.grpc_options()
        self.draining.clear()
        self.executor = futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="virtsvc"
        )
        server = grpc.server(
            self.executor,
            handlers=[self.dispatcher],
            options=options,
            # With a limit, grpc itself bounds the calls waiting for a worker too (a backstop that counts
            # health and admin calls as well), so a flood faster than the refusals cannot queue without end.
            maximum_concurrent_rpcs=(
                None if self.max_concurrency is None else self.max_concurrency + self._max_workers
            ),
        )
        # Registered methods: the C core matches them itself, skipping the generic-handler lookup per call
        # (what generated servicers do too). The dispatcher stays as the generic fallback.
        for service, specs in self.catalog.by_service().items():
            server.add_registered_method_handlers(
                service, {spec.name: self.dispatcher.handler_for(spec) for spec in specs}
            )
        self.health.add_to(server)
        services = [*self.catalog.services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if self.options.admin:
            from virtsvc.server.admin import add_admin

            services.append(add_admin(server, self, token=self.options.admin_token))
        add_reflection(server, services, self.catalog.pool)
        server.add_generic_rpc_handlers([self.dispatcher.unknown_method_handler()])
        target = f"{self.host}:{self.requested_port}"
        if self.requested_port and not self.options.reuse_port:
            _probe(self.host, self.requested_port, target)  # say so ourselves, before grpc logs to stderr
        try:
            if self._credentials is not None:
                port = server.add_secure_port(target, self._credentials)
            else:
                port = server.add_insecure_port(target)
        except RuntimeError:
            port = 0
        if not port:
            server.stop(None)
            raise ConfigError(f"cannot listen on {target}: the address is in use or not available here")
        self.port = port
        if self.metrics is not None and self.metrics_endpoint is None:
            from virtsvc.observe.metrics import MetricsEndpoint

            try:
                self.metrics_endpoint = MetricsEndpoint(
                    self.metrics, self.host, self.options.metrics_port or 0
                )
            except ConfigError:
                server.stop(None)
                raise
        if self.dashboard is not None:
            self.dashboard.info.update(address=self.address, default_scenario=self.default_scenario)
            try:
                self.dashboard.start()
            except ConfigError:
                server.stop(None)
                self._close_metrics()
                raise
        server.start()
        self._server = server
        self._services = ["", *services]
        self._set_serving(getattr(self.store, "healthy", True))
        if hasattr(self.store, "on_health"):
            self.store.on_health(self._store_health)
            self._store_watch = threading.Thread(target=self._watch_store, name="virtsvc-store", daemon=True)
            self._store_watch.start()
        return self

    def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._services:
            self.health.set(name, status)

    def _store_health(self, healthy: bool) -> None:
        """A shared store that cannot be reached makes the server NOT_SERVING until it can be again."""
        if self._server is not None and not self.draining.is_set():
            self._set_serving(healthy)

    def _watch_store(self) -> None:
        # Pings the shared store, so health follows it even when no call arrives (a readiness probe alone).
        ping = getattr(self.store, "ping", None)
        while ping is not None and not self.draining.wait(STORE_PING_INTERVAL):
            ping()

    @staticmethod
    def _make_store(options: ServeOptions) -> Store:
        if options.store == "memory":
            return MemoryStore(ttl=options.session_ttl)
        from virtsvc.engine.redis_store import RedisStore

        return RedisStore(options.store, ttl=options.session_ttl)

    def _make_journal(self, options: ServeOptions, catalog: Catalog) -> Journal:
        """With a Redis store the journal lives there too, so every replica reads every replica's calls."""
        from virtsvc.engine.redis_store import RedisStore

        if isinstance(self.store, RedisStore):
            from virtsvc.engine.redis_journal import RedisJournal

            return RedisJournal(self.store, catalog, options.journal_size)
        return Journal(options.journal_size, options.journal_total)

    def compile_session_rules(self, scenario: str, source: Any) -> RuleSet:
        """A session's rules from the source a shared store kept: admin text (``PutSessionRules``), the
        pytest plugin's inline rules (a list) or a rule an effect put (``{"effect": ID, "rule": DATA}``),
        compiled as their writers compile them."""
        from virtsvc.admin.api import ORIGIN
        from virtsvc.scenarios.loader import compile_put, compile_rules

        if isinstance(source, dict) and "effect" in source:
            return RuleSet((compile_put(source["rule"], self.catalog, scenario, self.upstreams),))
        if isinstance(source, str):
            rules = compile_rules(
                source,
                self.catalog,
                scenario=scenario,
                origin=ORIGIN,
                key_prefix="session:",
                upstreams=self.upstreams,
            )
        else:
            rules = compile_rules(
                source, self.catalog, scenario=scenario, origin="<inline>", key_prefix="inline:"
            )
        return RuleSet(rules, source=source)

    def clock(self, scenario: str, session_id: str, *, switch: bool = False) -> VirtualClock | None:
        """A session's virtual clock: None while it runs on wall time, unless ``switch`` puts it on virtual
        time. A session of a ``clock: virtual`` scenario is on virtual time whether it has had calls yet or
        not. Refusal FAILED_PRECONDITION where the store cannot hold virtual clocks (Redis)."""
        compiled = self.registry.get(scenario) if scenario else None
        if switch or (compiled is not None and compiled.clock == "virtual"):
            return clock.switch(self.store, scenario, session_id)
        return clock.clock_of(self.store.find(scenario, session_id))

    def stop(self, grace: float | None = 5.0) -> None:
        """Drains: health NOT_SERVING, no new calls, in-flight calls get ``grace`` seconds to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        self.health.enter_graceful_shutdown()
        self.draining.set()
        # Streams held open for a test would never end by themselves: end them now, saying why.
        for stream in self.dispatcher.streams:
            stream.abort(
                grpc.StatusCode.UNAVAILABLE, server_stopping_message(stream.spec), "the server stopped"
            )
        event = server.stop(grace)
        # Delays and dropped calls still waiting when the grace runs out end now.
        timer = threading.Timer(grace or 0.0, self.stopping.set)
        timer.daemon = True
        timer.start()
        event.wait()
        timer.cancel()
        self.stopping.set()
        for upstream in self.upstreams.values():
            upstream.close()
        close_store = getattr(self.store, "close", None)
        if close_store is not None and self._owns_store:
            close_store()
        if self.dashboard is not None:
            self.dashboard.stop()
        self._close_metrics()
        if self.tracing is not None:
            self.tracing.close()

    def _close_metrics(self) -> None:
        endpoint, self.metrics_endpoint = self.metrics_endpoint, None
        if endpoint is not None:
            endpoint.close()

    def wait(self, timeout: float | None = None) -> bool:
        server = self._server
        return True if server is None else server.wait_for_termination(timeout)

    def reload(self, scenarios: Iterable[CompiledScenario]) -> None:
        """Swaps in a new set of scenarios; calls in flight finish with the rules they started with."""
        self.registry.replace_all(scenarios)

    def __enter__(self) -> VirtualServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(0)


def _probe(host: str, port: int, target: str) -> None:
    """Fails with a clear ConfigError when ``host:port`` is already taken."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        raise ConfigError(f"cannot listen on {target}: unknown host {host!r}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {target}: {exc.strerror or exc}") from None
