"""The dashboard's HTTP server: one page, its static files, a JSON API and a server-sent event stream.

The standard library's ThreadingHTTPServer, one thread per connection: a page holds one event stream open
and fetches a call's details when it is clicked, so a handful of threads serve a handful of people. Streams
are capped (``MAX_STREAMS``) and every socket write has a timeout, so a browser that stops reading costs one
thread for at most ``WRITE_TIMEOUT`` seconds and never the calls: the stream reads from its own bounded
queue (see :mod:`virtsvc.observe.dashboard.hub`).

Access: with an admin token set, every page and API answer needs it: ``authorization: Bearer <token>``
(scripts, curl), or a cookie set by the login form (browsers). The cookie holds an HMAC of the token, not
the token, so it cannot be replayed against the admin API. Without a token the dashboard serves only on a
loopback address, and (on loopback) answers only requests whose ``Host`` names a loopback host, so a web
page elsewhere cannot read it through a DNS name rebound to 127.0.0.1. Everything served is read-only.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import importlib
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtsvc import _logs
from virtsvc.errors import ConfigError, VirtsvcError
from virtsvc.observe.dashboard.hub import Hub

if TYPE_CHECKING:
    from virtsvc.engine.journal import Journal
    from virtsvc.engine.router import Registry

__all__ = ["COOKIE", "Dashboard", "cookie_value"]

log = _logs.get_logger("virtsvc.dashboard")

COOKIE = "virtsvc_dashboard"
MAX_STREAMS = 32  # open event streams (each holds a thread)
WRITE_TIMEOUT = 30.0  # seconds a socket write may block before the connection is given up
POLL = 0.1  # seconds a stream sleeps when it has nothing to send (it also looks for shutdown then)
FIGURES_EVERY = 0.5  # seconds between two figure updates on one stream
SCENARIOS_EVERY = 1.0  # seconds between two looks at whether the loaded scenarios changed
PING_EVERY = 15.0  # seconds of silence before a comment line keeps proxies and the browser connected
BATCH = 200  # calls sent in one event at most
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    # The page runs only its own script and style: data shown from calls can never run as code.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def cookie_value(token: str) -> str:
    """What the login cookie holds for ``token``: a keyed hash, useless as an admin token."""
    return hmac.new(token.encode(), b"virtsvc-dashboard-v1", hashlib.sha256).hexdigest()


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Dashboard:
    """The live dashboard of one virtual server, from its ``journal`` and ``registry``.

    ``history`` is a run history (``virtsvc report --history FILE``) whose trends the page shows. ``info``
    is shown in the page's header (the gRPC address, the default scenario).
    """

    def __init__(
        self,
        journal: Journal,
        registry: Registry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        history: str | Path | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        if token is not None and not token.strip():
            raise ConfigError("the admin token is empty: give a non-empty token, or none")
        if token is None and not _is_loopback(host):
            raise ConfigError(
                f"the dashboard would show every call to anyone who can reach {host}: serve it on a loopback "
                "address, or set --admin-token (or VIRTSVC_ADMIN_TOKEN) to require it"
            )
        self.host = host
        self.requested_port = port
        self.port = 0
        self.token = token
        self.history = Path(history) if history is not None else None
        self.info = dict(info or {})
        self.hub = Hub(journal, registry)
        self.closing = threading.Event()
        self.streams = 0
        self._streams_lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Dashboard:
        try:
            infos = socket.getaddrinfo(self.host.strip("[]"), self.requested_port, type=socket.SOCK_STREAM)
        except OSError:
            raise ConfigError(f"cannot serve the dashboard on {self.host}: unknown host") from None
        family, _, _, _, address = infos[0]
        try:
            httpd = _Server(address[:2], self, family)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the dashboard on {self.host}:{self.requested_port}: {exc.strerror or exc}"
            ) from None
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self.closing.clear()
        self.hub.start()
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": POLL},
            name="virtsvc-dashboard-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.closing.set()  # open streams end within POLL seconds
        httpd.shutdown()
        httpd.server_close()
        self.hub.stop()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Dashboard:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- access ------------------------------------------------------------------------------------------

    def authorized(self, headers: Any) -> bool:
        token = self.token
        if token is None:
            return True
        ok = False
        for value in headers.get_all("Authorization") or ():
            scheme, _, credentials = value.strip().partition(" ")
            ok |= scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.strip().encode(), token.encode()
            )
        expected = cookie_value(token).encode()
        for value in headers.get_all("Cookie") or ():
            for part in value.split(";"):
                name, _, cookie = part.strip().partition("=")
                ok |= name == COOKIE and hmac.compare_digest(cookie.encode(), expected)
        return ok

    def host_allowed(self, header: str | None) -> bool:
        """On loopback, only requests addressed to a loopback name (against DNS rebinding)."""
        if header is None or not _is_loopback(self.host):
            return True
        name = header.strip()
        if name.startswith("["):
            name = name[1 : name.find("]")] if "]" in name else name
        else:
            name = name.rpartition(":")[0] if name.count(":") == 1 else name
        return name.lower() in LOOPBACK_NAMES or name == self.host.strip("[]") or _is_loopback(name)

    def open_stream(self) -> bool:
        with self._streams_lock:
            if self.streams >= MAX_STREAMS:
                return False
            self.streams += 1
            return True

    def close_stream(self) -> None:
        with self._streams_lock:
            self.streams -= 1

    # -- data ----------------------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """What a page learns once: the server it shows and whether it has a history."""
        return {**self.info, "history": str(self.history) if self.history is not None else None}

    def trends(self) -> dict[str, Any]:
        return history_trends(self.history)


def history_trends(path: Path | None, last: int = 20) -> dict[str, Any]:
    """The last runs of a run history (``virtsvc report --history FILE``): its runs, flaky tests and the
    trends of error rate and p99 per method and per test, from :class:`virtsvc.observe.history.History`."""
    if path is None:
        return {"available": False, "reason": "no history: serve with --history FILE to show its trends"}
    if not path.is_file():
        # Not made here: reading must not leave an empty history behind a typo.
        return {
            "available": False,
            "reason": f"{path}: no such file yet (virtsvc report --history writes it)",
        }
    try:
        history: Any = importlib.import_module("virtsvc.observe.history")
    except ImportError:
        return {"available": False, "reason": "this virtsvc cannot read run histories"}
    try:
        return {"available": True, **history.History(path).view(last)}
    except VirtsvcError as exc:  # not a history, or one from a newer virtsvc: said on the page
        return {"available": False, "reason": str(exc)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream still open at shutdown ends with the process, not after it
    block_on_close = False

    def __init__(self, address: Any, dashboard: Dashboard, family: socket.AddressFamily) -> None:
        self.dashboard = dashboard
        self.address_family = family
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a browser that went away
        log.exception("dashboard.request_failed", peer=str(client_address[0]))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "virtsvc-dashboard"
    timeout = WRITE_TIMEOUT

    @property
    def dashboard(self) -> Dashboard:
        return self.server.dashboard

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request and per stream is noise; the calls are what is logged

    # -- routing -------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if not self.dashboard.host_allowed(self.headers.get("Host")):
            self._text(
                HTTPStatus.MISDIRECTED_REQUEST, "this dashboard answers only to a loopback host name\n"
            )
            return
        if path.startswith("/static/"):  # no data in them: the login page uses the stylesheet too
            self._static(path.removeprefix("/static/"))
            return
        if path == "/favicon.ico":  # browsers ask for one; there is none
            self._body(HTTPStatus.NO_CONTENT, "image/x-icon", b"")
            return
        if not self.dashboard.authorized(self.headers):
            if path.startswith("/api/"):
                self._json(
                    {"error": "the dashboard needs the admin token (authorization: Bearer TOKEN)"}, 401
                )
            else:
                self._login(HTTPStatus.UNAUTHORIZED)
            return
        routes: dict[str, Callable[[], None]] = {
            "/": lambda: self._static("index.html"),
            "/index.html": lambda: self._static("index.html"),
            "/api/events": self._events,
            "/api/state": lambda: self._json({**self.dashboard.hub.snapshot(), **self._hello()}),
            "/api/history": lambda: self._json(self.dashboard.trends()),
            "/logout": self._logout,
        }
        route = routes.get(path)
        if route is not None:
            route()
        elif path.startswith("/api/calls/"):
            self._call(path.removeprefix("/api/calls/"))
        else:
            self._json({"error": f"no such page: {path}"}, 404)

    def do_POST(self) -> None:
        if not self.dashboard.host_allowed(self.headers.get("Host")):
            self._text(
                HTTPStatus.MISDIRECTED_REQUEST, "this dashboard answers only to a loopback host name\n"
            )
            return
        if urllib.parse.urlsplit(self.path).path != "/login":
            self._json({"error": "the dashboard is read-only"}, 405)
            return
        token = self.dashboard.token
        length = min(int(self.headers.get("Content-Length") or 0), 4096)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip()
        if token is None:
            self._redirect("/")
            return
        if not hmac.compare_digest(given.encode(), token.encode()):
            log.warning("dashboard.unauthenticated", peer=self.client_address[0])
            self._login(HTTPStatus.UNAUTHORIZED, "That is not the admin token.")
            return
        self._redirect(
            "/", f"{COOKIE}={cookie_value(token)}; Path=/; HttpOnly; SameSite=Strict; Max-Age=604800"
        )

    # -- answers ---------------------------------------------------------------------------------------------

    def _hello(self) -> dict[str, Any]:
        return {"server": self.dashboard.hello()}

    def _head(self, status: int, content_type: str, length: int | None = None, **extra: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in {**SECURITY_HEADERS, **extra}.items():
            self.send_header(key, value)
        self.end_headers()

    def _body(self, status: int, content_type: str, body: bytes, **extra: str) -> None:
        self._head(status, content_type, len(body), **extra)
        self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        body = json.dumps(value, default=str, separators=(",", ":")).encode()
        self._body(status, "application/json", body)

    def _text(self, status: int, text: str) -> None:
        self._body(status, "text/plain; charset=utf-8", text.encode())

    def _static(self, name: str) -> None:
        kind = STATIC.get(name)
        if kind is None:
            self._json({"error": f"no such file: {name}"}, 404)
            return
        body = resources.files("virtsvc.observe.dashboard").joinpath(f"static/{name}").read_bytes()
        self._body(200, f"{kind}; charset=utf-8", body)

    def _call(self, text: str) -> None:
        try:
            seq = int(text)
        except ValueError:
            self._json({"error": f"not a call number: {text!r}"}, 400)
            return
        details = self.dashboard.hub.details(seq)
        if details is None:
            self._json(
                {"error": f"call {seq} is no longer kept (the dashboard keeps the most recent calls)"}, 404
            )
            return
        self._json(details)

    def _redirect(self, where: str, cookie: str | None = None) -> None:
        extra = {"Location": where, **({"Set-Cookie": cookie} if cookie else {})}
        self._body(HTTPStatus.SEE_OTHER, "text/plain; charset=utf-8", b"", **extra)

    def _logout(self) -> None:
        self._redirect("/", f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")

    def _login(self, status: int, problem: str = "") -> None:
        note = f'<p class="problem">{html.escape(problem)}</p>' if problem else ""
        page = LOGIN_PAGE.replace("{note}", note).encode()
        self._body(status, "text/html; charset=utf-8", page)

    # -- the event stream ------------------------------------------------------------------------------------

    def _events(self) -> None:
        dashboard = self.dashboard
        if not dashboard.open_stream():
            self._json({"error": f"{MAX_STREAMS} dashboard streams are open, the most it serves"}, 503)
            return
        hub = dashboard.hub
        client, snapshot = hub.attach()
        try:
            self._head(200, "text/event-stream; charset=utf-8", None, **{"X-Accel-Buffering": "no"})
            self._send("retry: 2000\n\n")
            self._event("snapshot", {**snapshot, **self._hello()})
            figures_at = scenarios_at = spoke_at = time.monotonic()
            figures_version = hub.version
            scenarios_key = snapshot["scenarios"]["key"]
            while not dashboard.closing.is_set():
                if client.lagging.is_set():
                    # It fell behind: start it over from a fresh snapshot rather than send a gap.
                    hub.detach(client)
                    client, snapshot = hub.attach()
                    self._event("snapshot", {**snapshot, **self._hello(), "resync": True})
                    figures_version = hub.version
                    continue
                batch = client.take(BATCH)
                if not batch:
                    dashboard.closing.wait(POLL)
                    batch = client.take(BATCH)
                now = time.monotonic()
                if batch:
                    self._event("calls", batch)
                    spoke_at = now
                if hub.version != figures_version and now - figures_at >= FIGURES_EVERY:
                    figures = hub.figures()
                    figures_version, figures_at = figures["version"], now
                    self._event("figures", figures)
                    spoke_at = now
                if now - scenarios_at >= SCENARIOS_EVERY:
                    scenarios_at = now
                    key = hub.scenarios_key()
                    if key != scenarios_key:
                        scenarios = hub.scenarios()
                        scenarios_key = scenarios["key"]
                        self._event("scenarios", scenarios)
                if now - spoke_at >= PING_EVERY:
                    self._send(": ping\n\n")
                    spoke_at = now
        except (ConnectionError, TimeoutError, OSError):
            pass  # the browser went away, or stopped reading for WRITE_TIMEOUT seconds
        finally:
            hub.detach(client)
            dashboard.close_stream()
            self.close_connection = True

    def _event(self, name: str, data: Any) -> None:
        self._send(f"event: {name}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n")

    def _send(self, text: str) -> None:
        self.wfile.write(text.encode())
        self.wfile.flush()


LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>virtsvc dashboard: sign in</title>
<link rel="stylesheet" href="/static/app.css">
</head>
<body class="login">
<form method="post" action="/login">
<h1>virtsvc dashboard</h1>
<p>This server has an admin token: enter it to see its calls.</p>
{note}
<label>Admin token <input type="password" name="token" autocomplete="current-password" autofocus></label>
<button type="submit">Sign in</button>
</form>
</body>
</html>
"""
