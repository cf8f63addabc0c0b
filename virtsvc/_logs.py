"""Loggers that import structlog only when a line needs it.

``import structlog`` costs about 55 ms (its package imports asyncio, colorama and every processor): more than
a third of a ``virtsvc gen`` run, which logs one line. While the command line has called :func:`json_lines`
(json format, structlog not imported yet), the loggers of :func:`get_logger` render their lines themselves,
exactly as :func:`virtsvc.cli.configure_logging`'s json chain would: the event's keys, then ``event``,
``level`` and an ISO UTC ``timestamp``, one ``json.dumps`` line, flushed. Otherwise, and for anything that
chain does more (``exc_info``, ``stack_info``), they hand the call to ``structlog.get_logger(name)``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Logger", "get_logger", "json_lines"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _fallback(value: Any) -> Any:
    """What structlog's JSONRenderer does with values json cannot encode."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


def _now() -> str:
    """``datetime.now(timezone.utc).isoformat()`` with ``Z`` for ``+00:00``, as structlog's TimeStamper(iso,
    utc) writes it (no fraction when the microseconds are 0), without the datetime module (3 ms to import)."""
    ns = time.time_ns()
    seconds, micros = divmod(ns // 1000, 1_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{micros:06d}Z" if micros else f"{text}Z"


class _JsonLines:
    """structlog's json chain (add_log_level, TimeStamper(iso, utc), JSONRenderer, PrintLogger) in brief."""

    def __init__(self, level: int, stream: str, configure: Callable[[], None]) -> None:
        self.level = level
        self.stream = stream
        self.configure = configure  # sets structlog up the same way, for what this class does not render
        self.lock = threading.Lock()

    def emit(self, method: str, event: str, kw: dict[str, Any]) -> None:
        if _LEVELS[method] < self.level:
            return
        line = json.dumps({**kw, "event": event, "level": method, "timestamp": _now()}, default=_fallback)
        with self.lock:
            print(line, file=getattr(sys, self.stream), flush=True)


_lines: _JsonLines | None = None


def json_lines(level: int, stream: str, configure: Callable[[], None]) -> Callable[[], None]:
    """Render this module's loggers' lines as json to ``sys.<stream>`` without structlog; returns the undo.

    ``configure`` must set structlog up identically: it runs before a call this module does not render
    itself is handed to structlog.
    """
    global _lines
    _lines = _JsonLines(level, stream, configure)

    def undo() -> None:
        global _lines
        _lines = None

    return undo


class Logger:
    """The subset of structlog's bound logger virtsvc uses: ``log.info("event.name", key=value, ...)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _log(self, method: str, event: str, kw: dict[str, Any]) -> None:
        lines = _lines
        if lines is not None:
            if "exc_info" not in kw and "stack_info" not in kw:
                lines.emit(method, event, kw)
                return
            lines.configure()
        import structlog

        getattr(structlog.get_logger(self.name), method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, kw)


def get_logger(name: str) -> Logger:
    """A logger named ``name`` (structlog's logger factory argument), free until it logs."""
    return Logger(name)
