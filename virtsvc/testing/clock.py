"""A test's view of its session's virtual clock: ``virtual_service.clock``.

The first use switches the test's session to virtual time (its clock starts at the wall-clock time of the
switch and never moves by itself); delayed answers are then held until the test moves the clock on::

    clock = virtual_service.clock
    reply = pool.submit(stub.GetQuote, request)   # the rule has delay: 30s: the call is held
    clock.wait_for_pending()                      # (the client runs on another thread)
    clock.advance(30)                             # due now: answered
    assert reply.result().price == 100

With an in-process server the clock is the session's own object; with a server in another process every
operation is an admin call (``SetClock``, ``AdvanceClock``, ``GetClock``).
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from virtsvc.engine.clock import Held, VirtualClock
from virtsvc.errors import Refusal, VirtsvcError

if TYPE_CHECKING:
    from virtsvc.admin.api import AdminClient
    from virtsvc.server.virtual_server import VirtualServer

__all__ = ["Held", "SessionClock"]

_POLL = 0.01  # seconds between GetClock calls while waiting for held calls on a remote server


class SessionClock:
    """The virtual clock of one session (``scenario``, ``session``); times are epoch seconds."""

    def __init__(self, scenario: str, session: str, driver: _Driver) -> None:
        self.scenario = scenario
        self.session = session
        self._driver = driver

    def now(self) -> float:
        """The session's virtual time."""
        return self._driver.now()

    def advance(self, seconds: float) -> float:
        """Moves the clock on by ``seconds`` and wakes the calls now due; returns the new time. Also the
        ``sleep`` to give code under test whose own waits should pass in virtual time."""
        return self._driver.advance(float(seconds))

    def pending(self) -> list[Held]:
        """The calls held on the clock now (``.method``, ``.due``), earliest due first."""
        return self._driver.pending()

    def run_until_idle(self) -> float:
        """Moves the clock to each held call's due time in turn until none is held; returns the virtual
        seconds it moved. A call that arrives afterwards is not waited for (see ``wait_for_pending``)."""
        return self._driver.run_until_idle()

    def wait_for_pending(self, count: int = 1, timeout: float = 5.0) -> list[Held]:
        """Waits, at most ``timeout`` seconds of wall time, until ``count`` calls are held; returns them.
        For a client running on another thread: once this returns, its call is waiting on the clock."""
        return self._driver.wait_for_pending(count, timeout)

    def __repr__(self) -> str:
        return f"<SessionClock {self.scenario}/{self.session} now={self.now():.6f}>"


class _Driver(Protocol):
    def now(self) -> float: ...
    def advance(self, seconds: float) -> float: ...
    def pending(self) -> list[Held]: ...
    def run_until_idle(self) -> float: ...
    def wait_for_pending(self, count: int, timeout: float) -> list[Held]: ...


class _Local:
    """The session's clock object itself (an in-process server)."""

    def __init__(self, server: VirtualServer, scenario: str, session: str) -> None:
        try:
            clock = server.clock(scenario, session, switch=True)
        except Refusal as exc:  # a store that cannot hold virtual clocks
            raise VirtsvcError(f"virtual_service.clock: {exc.message}") from None
        assert clock is not None
        self._clock: VirtualClock = clock

    def now(self) -> float:
        return self._clock.now()

    def advance(self, seconds: float) -> float:
        return self._clock.advance(seconds)

    def pending(self) -> list[Held]:
        return self._clock.pending()

    def run_until_idle(self) -> float:
        return self._clock.run_until_idle()

    def wait_for_pending(self, count: int, timeout: float) -> list[Held]:
        return self._clock.wait_for_pending(count, timeout)


class _Remote:
    """Admin calls to a server in another process."""

    def __init__(self, admin: AdminClient, address: str, scenario: str, session: str) -> None:
        self._admin = admin
        self._address = address
        self._where = {"scenario": scenario, "session": session}
        self._call("SetClock", virtual=True)

    def _call(self, method: str, **fields: Any) -> Any:
        try:
            return self._admin.call(method, **self._where, **fields)
        except grpc.RpcError as exc:
            raise VirtsvcError(
                f"the virtual server at {self._address} refused {method}: {exc.details() or exc.code().name}"
            ) from None

    def now(self) -> float:
        return float(self._call("GetClock").now.ToNanoseconds() / 1e9)

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a virtual clock only moves forward: advance by {seconds!r} seconds")
        state = self._call("AdvanceClock", duration=datetime.timedelta(seconds=seconds))
        return float(state.now.ToNanoseconds() / 1e9)

    def pending(self) -> list[Held]:
        return _held(self._call("GetClock"))

    def run_until_idle(self) -> float:
        return float(self._call("AdvanceClock", run_until_idle=True).advanced.ToNanoseconds() / 1e9)

    def wait_for_pending(self, count: int, timeout: float) -> list[Held]:
        deadline = time.monotonic() + timeout
        while True:
            held = self.pending()
            if len(held) >= count:
                return held
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(held)} call(s) held on the virtual clock after {timeout:g} s; expected {count}"
                )
            time.sleep(_POLL)


def _held(state: Any) -> list[Held]:
    return [Held(p.method, p.due.ToNanoseconds() / 1e9, seq) for seq, p in enumerate(state.pending)]


def local_clock(server: VirtualServer, scenario: str, session: str) -> SessionClock:
    return SessionClock(scenario, session, _Local(server, scenario, session))


def remote_clock(admin: AdminClient, address: str, scenario: str, session: str) -> SessionClock:
    return SessionClock(scenario, session, _Remote(admin, address, scenario, session))
