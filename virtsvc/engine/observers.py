"""Call observers: what watches each call as it starts and as it ends (metrics, traces, logs, a dashboard).

The journal tells its subscribers about a call once it has ended; an observer also hears of it as it
arrives, before it is routed, which is what an in-flight gauge or a span that starts with the call needs.
Without observers the pipeline pays one ``is None`` test per call.

``on_start`` runs on the serving thread as the call arrives, its metadata read (``exchange.metadata``,
text values) but before it is routed or limited (scenario and session are not known yet); what it
returns is handed back to ``on_finish``, which runs once the call has been journaled (``exchange.entry``
is its complete entry). Exactly one ``on_finish`` follows each ``on_start``. Both run on serving threads
and must be quick; an observer that raises is logged and removed, and the call goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from virtsvc import _logs

if TYPE_CHECKING:
    from virtsvc.engine.pipeline import Exchange

__all__ = ["CallObserver", "Observers"]

log = _logs.get_logger("virtsvc.engine.observers")


class CallObserver(Protocol):
    """Hears of every call as it starts and as it ends."""

    def on_start(self, exchange: Exchange) -> object:
        """The call has arrived; returns what ``on_finish`` is handed back (a span, a start time, None)."""

    def on_finish(self, exchange: Exchange, token: object) -> None:
        """The call has ended and been journaled (``exchange.entry``)."""


class Observers:
    """The observers of one dispatcher, called in the order added (finished in reverse), each guarded."""

    def __init__(self, changed: Callable[[Observers], None]) -> None:
        self.observers: tuple[CallObserver, ...] = ()
        self._changed = changed  # told after every add or remove (the dispatcher drops us when empty)
        self._lock = threading.Lock()

    def add(self, observer: CallObserver) -> Callable[[], None]:
        """Adds ``observer`` for the calls that start from now on; returns the remover."""
        with self._lock:
            self.observers = (*self.observers, observer)
        self._changed(self)
        return lambda: self.remove(observer)

    def remove(self, observer: CallObserver) -> None:
        with self._lock:
            self.observers = tuple(o for o in self.observers if o is not observer)
        self._changed(self)

    def on_start(self, exchange: Exchange) -> tuple[tuple[CallObserver, ...], list[object]]:
        observers = self.observers  # the call is finished by those it started with
        tokens: list[object] = []
        for observer in observers:
            try:
                tokens.append(observer.on_start(exchange))
            except Exception as exc:
                tokens.append(None)
                self._failed(observer, exc)
        return observers, tokens

    def on_finish(self, exchange: Exchange, started: tuple[tuple[CallObserver, ...], list[object]]) -> None:
        observers, tokens = started
        for i in range(len(observers) - 1, -1, -1):
            try:
                observers[i].on_finish(exchange, tokens[i])
            except Exception as exc:
                self._failed(observers[i], exc)

    def __len__(self) -> int:
        return len(self.observers)

    def _failed(self, observer: CallObserver, exc: Exception) -> None:
        # An observer's bug never breaks a call: it is logged and removed (once, however many calls saw it).
        if observer in self.observers:
            self.remove(observer)
            name = type(observer).__qualname__
            log.error("observer.dropped", observer=name, error=f"{type(exc).__name__}: {exc}")
