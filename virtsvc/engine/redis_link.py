"""The round trips a call makes to Redis, kept cheap: every call of a stateful scenario pays for them.

On a single Redis server, scripts run on connections of the ``redis`` client taken from a stack of idle
ones (``deque`` pop and append need no lock, where the client's pool takes one twice per command, which
threads of a busy server wait on) and by SHA, loaded again when Redis lost its script cache (a restart).
:meth:`Link.send` writes a script and leaves its reply to be read by the next user of that connection, so a
journal write costs no wait: at most one reply is pending per connection and it is read before the next
command is sent, so a process killed after ``send`` returned never discards a command Redis has not run
(the kernel resets a connection with unread data, and that data can only be the reply of a command run).

On a Redis Cluster every round trip goes through the cluster client, which routes it by key slot.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from virtsvc import _logs

__all__ = ["Link", "LinkScript"]

log = _logs.get_logger("virtsvc.store")


_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # hiredis (the client's C parser, installed with virtsvc[redis]) packs a command in C
    import hiredis

    _pack = hiredis.pack_command
except ImportError:  # pragma: no cover - the client's own packer then
    _pack = None


class LinkScript:
    """A Lua script known to a :class:`Link`: its source and SHA1."""

    __slots__ = ("_registered", "sha", "source")

    def __init__(self, source: str, registered: Any) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._registered = registered  # the client's Script, for the Cluster path


class Link:
    """Runs commands and scripts on ``client`` (a ``redis.Redis`` or ``redis.RedisCluster``)."""

    def __init__(self, client: Any, cluster: bool) -> None:
        self.client = client
        self.cluster = cluster
        self._idle: deque[Any] = deque()
        pool = None if cluster else client.connection_pool
        self._connection_class = None if pool is None else pool.connection_class
        self._connection_kwargs = None if pool is None else dict(pool.connection_kwargs)

    def script(self, source: str) -> LinkScript:
        return LinkScript(source, self.client.register_script(source))

    # -- round trips ------------------------------------------------------------------------------------

    def run(self, script: LinkScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply (one round trip)."""
        if self.cluster:
            return script._registered(keys=keys, args=args)
        return self._exchange(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def send(self, script: LinkScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Writes the script for Redis to run and returns without its reply (a Redis error in it is logged
        when the reply is read)."""
        if self.cluster:
            script._registered(keys=keys, args=args)
            return
        # EVAL (Redis finds the script by its SHA): a reply read later could not retry a NOSCRIPT.
        self._exchange(("EVAL", script.source, len(keys), *keys, *args), script, wait=False)

    def command(self, *args: Any) -> Any:
        """A plain command's reply, as the client parses it."""
        if self.cluster:
            return self.client.execute_command(*args)
        return self._exchange(args)

    def _exchange(
        self, command: tuple[Any, ...], script: LinkScript | None = None, *, wait: bool = True
    ) -> Any:
        import redis

        conn, reused = self._take()
        packed = [_pack(command)] if _pack is not None else conn.pack_command(*command)
        try:
            while True:
                try:
                    conn.send_packed_command(packed, check_health=False)
                    if not wait:
                        conn.virtsvc_pending = script
                        self._idle.append(conn)
                        return None
                    try:
                        reply = conn.read_response()
                    except redis.exceptions.NoScriptError:  # Redis restarted: EVAL runs it, caches it again
                        assert script is not None
                        conn.send_command("EVAL", script.source, *command[2:], check_health=False)
                        reply = conn.read_response()
                    break
                except redis.ConnectionError:
                    if not reused:
                        raise
                    # Redis closed it while it was idle (a restart): once more, on a new socket. Checking
                    # each idle connection before its use instead would cost every call a system call.
                    reused = False
                    conn.disconnect()
        except redis.exceptions.ResponseError:
            self._idle.append(conn)  # the connection is fine: the command failed
            raise
        except BaseException:
            conn.disconnect()
            raise
        self._idle.append(conn)
        return reply

    def _take(self) -> tuple[Any, bool]:
        """An idle connection with no reply pending (a new one when none is idle), and whether it was idle."""
        try:
            conn = self._idle.pop()
        except IndexError:
            assert self._connection_class is not None and self._connection_kwargs is not None
            conn = self._connection_class(**self._connection_kwargs)
            conn.virtsvc_pending = None
            return conn, False
        pending = conn.virtsvc_pending
        if pending is not None:
            conn.virtsvc_pending = None
            self._settle(conn, pending)
        return conn, True

    @staticmethod
    def _settle(conn: Any, pending: LinkScript) -> None:
        """Reads the reply of a script sent without waiting; a connection that broke meanwhile is closed, to
        reconnect on its next send."""
        import redis

        try:
            conn.read_response()
        except redis.exceptions.ResponseError as exc:
            log.warning("store.write_failed", error=str(exc), script=pending.sha)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            conn.disconnect()
            log.warning("store.write_unconfirmed", error=str(exc) or type(exc).__name__, script=pending.sha)

    def reset(self) -> None:
        """Drops every idle connection (after Redis went away: they are all dead)."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            conn.disconnect()

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            pending = conn.virtsvc_pending
            if pending is not None:
                conn.virtsvc_pending = None
                self._settle(conn, pending)
            conn.disconnect()
