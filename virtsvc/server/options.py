"""``ServeOptions``: every setting of a virtual server, in one typed object.

The CLI (``virtsvc serve`` flags over ``[tool.virtsvc]``), the pytest plugin and ``serve_in_process`` all
build one and hand it to :class:`~virtsvc.server.VirtualServer`, so a new setting is added in one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtsvc import _text
from virtsvc.config import time_scale as checked_time_scale
from virtsvc.engine.forward import MODES
from virtsvc.engine.limits import DEFAULT_MAX_MESSAGE_BYTES
from virtsvc.errors import ConfigError

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "MAX_PING_STRIKES", "ServeOptions", "is_loopback"]

#: Pings sooner than min_ping_interval a client may send before it is told too_many_pings (grpc's default 2).
MAX_PING_STRIKES = 2


@dataclass(frozen=True)
class ServeOptions:
    """How a virtual server listens, what it keeps and what it allows."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    # Share the port with other processes that set it too (SO_REUSEPORT), as `serve --workers` does; off,
    # a port in use is an error rather than a silently shared socket.
    reuse_port: bool = False
    default_scenario: str | None = None  # answers calls that name no scenario
    max_workers: int = 64  # threads serving calls
    journal_size: int = 500  # journal entries kept per session
    journal_total: int = 100_000  # journal entries kept in all (least recently active sessions go first)
    session_ttl: float = 3600.0  # seconds an idle session lives
    # Where sessions live: "memory" (this process) or redis://HOST:PORT/DB (rediss://, a password in the URL)
    # shared by every process and replica; kept out of repr, as it may hold a password.
    store: str = field(default="memory", repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # both directions
    max_concurrency: int | None = None  # calls in flight in the whole server
    max_concurrency_per_session: int | None = None
    admin: bool = True  # serve the admin API on the same port
    admin_token: str | None = None  # admin calls need "authorization: Bearer <token>"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS
    grace: float = 10.0  # seconds in-flight calls get on shutdown (the sidecar)
    watch: bool = False  # reload changed scenario files (the sidecar)
    # Seconds: the shortest interval between the keepalive pings a client may send, with or without calls
    # in flight (Google's client libraries ping every 30 s); a client pinging faster is told too_many_pings.
    min_ping_interval: float = 10.0
    # Real services by name (NAME -> HOST:PORT) that `passthrough:` and the modes forward calls to.
    upstreams: Mapping[str, str] = field(default_factory=dict)
    # simulate (scenarios only), spy (scenarios first, then the real service) or passthrough (real only);
    # spy and passthrough forward to the first upstream declared.
    mode: str = "simulate"
    # The live dashboard's HTTP port on the same host (0 picks a free one); None serves no dashboard.
    dashboard_port: int | None = None
    history: Path | None = None  # a run history (virtsvc report --history) whose trends the dashboard shows
    # Observability (README, "Observability"): Prometheus /metrics on this port of `host` (0 picks one), the
    # `rpc` log event per call, and spans: None follows the OTEL_ variables, True requires them, False never.
    metrics_port: int | None = None
    log_calls: bool = False
    traces: bool | None = None
    # Every delay is multiplied by it (``--time-scale``): 2 stretches them to twice as long, 0.1 compresses
    # them tenfold; the journal records the delay waited.
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "max_concurrency",
            "max_concurrency_per_session",
            "max_message_bytes",
            "max_workers",
            "journal_size",
            "journal_total",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, not {value}")
        if self.mode not in MODES:
            raise ConfigError(
                f"mode must be one of {', '.join(MODES)}, not {self.mode!r}"
                + _text.did_you_mean(str(self.mode), MODES)
            )
        if self.mode != "simulate" and not self.upstreams:
            raise ConfigError(
                f"--mode {self.mode} forwards calls to a real service: declare it with "
                "--upstream NAME=HOST:PORT"
            )
        if self.dashboard_port is not None and not 0 <= self.dashboard_port <= 65535:
            raise ConfigError(f"dashboard_port must be between 0 and 65535, not {self.dashboard_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be a port number from 0 to 65535, not {self.metrics_port}")
        if self.store != "memory" and not self.store.startswith(("redis://", "rediss://")):
            from virtsvc.engine.redis_store import redact_url

            raise ConfigError(
                f"store must be memory, redis://HOST:PORT/DB or rediss://HOST:PORT/DB, not "
                f"{redact_url(str(self.store))!r}"
            )
        checked_time_scale(self.time_scale, "time_scale")
        if not self.min_ping_interval > 0:
            raise ConfigError(f"min_ping_interval must be more than 0 seconds, not {self.min_ping_interval}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def grpc_options(self) -> list[tuple[str, int]]:
        """The grpc server channel arguments these settings make (keepalive policy, message sizes)."""
        return [
            ("grpc.so_reuseport", int(self.reuse_port)),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Keepalive: accept a client's pings every min_ping_interval, calls in flight or not (grpc's
            # default of 5 minutes ended long-lived streams of clients pinging every 30 s with GOAWAY).
            ("grpc.http2.min_ping_interval_without_data_ms", max(1, round(self.min_ping_interval * 1000))),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ]

    def replace(self, **changes: Any) -> ServeOptions:
        """A copy with ``changes``; an unknown name is a TypeError naming the closest setting."""
        known = self.names()
        for name in changes:
            if name not in known:
                raise TypeError(f"unknown server setting {name!r}{_text.did_you_mean(name, known)}")
        return dataclasses.replace(self, **changes)


def is_loopback(host: str) -> bool:
    """Whether ``host`` can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
