"""Virtual time: a session's clock that moves only when the test advances it.

A session on virtual time holds every delayed answer (a step's ``delay``, a stream item's) until its clock
reaches the answer's due time, so a test of a timeout, a retry with backoff or a slow dependency runs at
once and the same way every time. A clock starts at the wall-clock time it was switched on and never moves
by itself: ``advance`` moves it and wakes the calls now due; ``run_until_idle`` moves it from one held call's
due time to the next until none is held. Client deadlines stay real: a held call whose client gives up ends
as it would on wall time.

The clock lives on the session (``MemorySession.clock``), so it goes with it; a dropped session releases the
calls still held (they end ABORTED). Held calls wait on threads of this process, which is why a store shared
by several processes (Redis) cannot hold them: ``switch`` refuses there.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from virtsvc.errors import Refusal

__all__ = ["ClockClosed", "Held", "VirtualClock", "clock_of", "switch"]

_STOP_POLL = 1.0  # seconds between looks at whether the server is stopping, while a call is held


class ClockClosed(Exception):
    """The session (and its clock) was dropped while a call was held on it."""


@dataclass(frozen=True, slots=True)
class Held:
    """A call waiting on a virtual clock: what it is and when (virtual epoch seconds) it is due."""

    method: str
    due: float
    seq: int = field(default=0, compare=False)


class _Waiter:
    __slots__ = ("held", "reached", "wake")

    def __init__(self, held: Held, wake: threading.Event) -> None:
        self.held = held
        self.wake = wake
        self.reached = False


class VirtualClock:
    """One session's virtual clock (epoch seconds). Thread-safe: calls wait on it from grpc's workers."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._cond = threading.Condition()
        self._waiters: dict[int, _Waiter] = {}
        self._seq = itertools.count()
        self._closed = False

    def now(self) -> float:
        """The virtual time, epoch seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Moves the clock on by ``seconds`` (>= 0) and wakes the calls now due; returns the new time."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"a virtual clock only moves forward: advance by {seconds!r} seconds")
        with self._cond:
            self._now += seconds
            self._wake_due()
            return self._now

    def run_until_idle(self) -> float:
        """Moves the clock to each held call's due time in turn (earliest first), waking it, until no
        call is held; returns how many virtual seconds it moved. Later arrivals are not waited for."""
        moved = 0.0
        with self._cond:
            while self._waiters:
                due = min(w.held.due for w in self._waiters.values())
                if due > self._now:
                    moved += due - self._now
                    self._now = due
                self._wake_due()
        return moved

    def pending(self) -> list[Held]:
        """The calls held now, earliest due first."""
        with self._cond:
            return sorted((w.held for w in self._waiters.values()), key=lambda h: (h.due, h.seq))

    def wait_for_pending(self, count: int = 1, timeout: float = 5.0) -> list[Held]:
        """Waits (wall time, at most ``timeout``) until at least ``count`` calls are held; returns them.

        For tests whose client runs on another thread: the call is held once this returns. Raises
        TimeoutError naming how many arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._waiters) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(self._waiters)} call(s) held on the virtual clock after {timeout:g} s; "
                        f"expected {count}"
                    )
                self._cond.wait(left)
        return self.pending()

    def hold(self, method: str, seconds: float, ended: threading.Event, stopping: threading.Event) -> bool:
        """Holds the calling thread until the clock has moved ``seconds`` on (True), or until ``ended`` is
        set by someone else first: the call ended (False). Raises ClockClosed when the session is dropped."""
        with self._cond:
            if self._closed:
                raise ClockClosed
            held = Held(method, self._now + seconds, next(self._seq))
            waiter = _Waiter(held, ended)
            if seconds <= 0:
                return True
            self._waiters[held.seq] = waiter
            self._cond.notify_all()  # wait_for_pending
        try:
            while not ended.wait(_STOP_POLL):
                if stopping.is_set():
                    break
        finally:
            with self._cond:
                self._waiters.pop(held.seq, None)
                closed = self._closed and not waiter.reached
        if closed:
            raise ClockClosed
        return waiter.reached

    def close(self) -> None:
        """The session was dropped: releases every held call (``hold`` raises ClockClosed)."""
        with self._cond:
            self._closed = True
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for waiter in waiters:
            waiter.wake.set()

    def _wake_due(self) -> None:
        """Under the lock: wakes the calls whose due time has come."""
        now = self._now
        for seq in [s for s, w in self._waiters.items() if w.held.due <= now]:
            waiter = self._waiters.pop(seq)
            waiter.reached = True
            waiter.wake.set()


def clock_of(session: Any) -> VirtualClock | None:
    """The session's virtual clock, or None on wall time."""
    return getattr(session, "clock", None)


def switch(store: Any, scenario: str, session_id: str) -> VirtualClock:
    """Puts one session on virtual time (making the session if needed); its clock if it already is.

    A store whose sessions several processes share cannot hold calls across them: FAILED_PRECONDITION."""
    why = getattr(store, "no_virtual_clock", None)
    if why:
        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, why)
    return switch_session(store.session(scenario, session_id))


def switch_session(session: Any) -> VirtualClock:
    clock: VirtualClock | None = getattr(session, "clock", None)
    if clock is None:
        lock = getattr(session, "_lock", None)
        with lock if lock is not None else threading.Lock():
            clock = session.clock
            if clock is None:
                clock = session.clock = VirtualClock()
    return clock
