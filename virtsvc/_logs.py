"""Loggers that import structlog only when a line needs it.

``import structlog`` costs 20 to 55 ms (its package imports every processor, colorama, uuid, and asyncio when
nothing has yet): more than a third of a ``virtsvc gen`` run, which logs one line. While the command line has
set :func:`json_lines` up and structlog is not imported, the loggers of :func:`get_logger` write their lines
themselves, exactly as :func:`virtsvc.cli.configure_logging`'s json chain would: the event's keys, then
``event``, ``level`` and an ISO UTC ``timestamp``, one ``json.dumps`` line, flushed. Otherwise (library use,
console format, once anything has imported structlog, and for what that chain does more: ``exc_info``,
``stack_info``, ``exception()``) they hand the call to ``structlog.get_logger(name)``, after configuring
structlog the command line's way if it has not been yet.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Logger", "get_logger", "json_lines", "structlog_if_imported"]

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
        self._configure: Callable[[], None] | None = configure  # structlog set up the same way
        self.lock = threading.Lock()

    def emit(self, method: str, event: str, kw: dict[str, Any]) -> None:
        if _LEVELS[method] < self.level:
            return
        line = json.dumps({**kw, "event": event, "level": method, "timestamp": _now()}, default=_fallback)
        with self.lock:
            print(line, file=getattr(sys, self.stream), flush=True)

    def configure_structlog(self) -> None:
        """Configure structlog (once) for the lines this class does not write."""
        with self.lock:
            configure, self._configure = self._configure, None
        if configure is not None:
            configure()


_lines: _JsonLines | None = None


def json_lines(level: int, stream: str, configure: Callable[[], None]) -> Callable[[], None]:
    """Write this module's loggers' lines as json to ``sys.<stream>`` while structlog is not imported.

    ``configure`` must set structlog up identically; it runs (once) when a line goes to structlog after
    all. Returns the undo.
    """
    global _lines
    _lines = _JsonLines(level, stream, configure)

    def undo() -> None:
        global _lines
        _lines = None

    return undo


def structlog_if_imported() -> None:
    """Under :func:`json_lines`: configure structlog now if something has imported it, so that modules
    logging through structlog directly write the same lines from their first one."""
    lines = _lines
    if lines is not None and "structlog" in sys.modules:
        lines.configure_structlog()


class Logger:
    """The subset of structlog's bound logger virtsvc uses: ``log.info("event.name", key=value, ...)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _log(self, method: str, event: str, kw: dict[str, Any]) -> None:
        lines = _lines
        if lines is not None:
            # Once structlog is imported, someone may have bound context variables or reconfigured it:
            # from then on the lines are structlog's.
            plain = method in _LEVELS and "exc_info" not in kw and "stack_info" not in kw
            if plain and "structlog" not in sys.modules:
                lines.emit(method, event, kw)
                return
            lines.configure_structlog()
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

    def exception(self, event: str, **kw: Any) -> None:
        """An error with the exception being handled (``exc_info``): always structlog's rendering."""
        self._log("exception", event, kw)


def get_logger(name: str) -> Logger:
    """A logger named ``name`` (structlog's logger factory argument), free until it logs."""
    return Logger(name)
