"""Connection pools: an asyncpg pool that serves callers in order, and a
bounded use of one of its connections."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from server.config import Config
from server.db.errors import DatabaseUnavailable

log = logging.getLogger("hangout.db")

# The contract promises a write an answer within 5 s even when the primary
# does not answer at all (then ``unavailable``): every use of the primary by
# ``Database.write``/``read`` is cut off after this long.
PRIMARY_DEADLINE_S = 4.0
# A replica that does not answer a read within this long is skipped for the
# primary.
REPLICA_DEADLINE_S = 2.0

# No connection could be made: the server is down or starting, or none of
# the hosts of a multi-host URL is the kind asked for (no writable primary
# while a replica is being promoted).
CONNECT_FAILURES = (
    asyncio.TimeoutError, OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)
# A connection that fails with one of these is not worth keeping: its server
# went away, did not answer in time, is shutting
# down, or is no longer writable (an old primary back as a replica after a
# failover). It is dropped, so the pool connects again, to whichever host of
# the URL is now what the pool asks for.
LOST_SERVER = (
    ConnectionError, TimeoutError,  # not every OSError: PermissionError is one
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # the pool handed out a connection that the server was closing (a
    # shutdown's error still being read): the client's protocol refuses it
    asyncpg.exceptions.InternalClientError,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release. asyncpg has already rolled back any open
    transaction; its default would then send ``SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`` - a second round trip per query. Pooled
    connections never hold session state here (no SET, LISTEN, cursors or
    session advisory locks; migrations use a connection of their own), so
    there is nothing to undo."""


def pool_args(config: Config) -> dict[str, Any]:
    """``asyncpg.create_pool`` arguments for the primary's pool (a replica's
    overrides a few)."""
    return dict(
        min_size=config.db_pool_min,
        max_size=config.db_pool_max,
        statement_cache_size=config.db_statement_cache_size,
        command_timeout=config.db_command_timeout_s,
        timeout=config.db_command_timeout_s,  # connect timeout
        max_inactive_connection_lifetime=300,
        reset=_keep_session,
    )


class FairPool:
    """An asyncpg pool that hands out connections in the order they were
    asked for.

    asyncpg's pool waits on an ``asyncio.Queue``: a freed connection wakes
    the first waiter, but an acquire that arrives before that waiter runs
    finds the connection and takes it, and the waiter goes back to the end
    of the line, so under load some calls are passed over again and again.
    A FIFO semaphore of the pool's size in front (asyncio's is fair since
    Python 3.11.1) means the pool itself never makes anyone wait."""

    __slots__ = ("pool", "gate", "waiting", "waits")

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.gate = asyncio.Semaphore(pool.get_max_size())
        self.waiting = 0  # callers waiting for a connection now (metrics)
        self.waits = 0  # callers that found every connection taken, since start

    async def acquire(self) -> asyncpg.Connection:
        if self.gate.locked():
            self.waits += 1
        self.waiting += 1
        try:
            await self.gate.acquire()
        finally:
            self.waiting -= 1
        try:
            return await self.pool.acquire()
        except BaseException:
            self.gate.release()
            raise

    async def release(self, conn: asyncpg.Connection) -> None:
        try:
            await self.pool.release(conn)
        finally:
            self.gate.release()

    async def close(self) -> None:
        await self.pool.close()


async def create_pool(url: str, **kwargs: Any) -> FairPool:
    return FairPool(await asyncpg.create_pool(url, **kwargs))


class Acquire:
    """A pooled connection for one operation, bounded in time.

    Getting a connection waits at most ``timeout``; failing to get one raises
    ``DatabaseUnavailable``. With a ``deadline`` (seconds, counted from the
    acquire), a connection still held when it passes is terminated: whatever
    awaits it fails at once, and the operation ends ``DatabaseUnavailable``.
    asyncpg's own timeouts bound each step (connect, each statement, the
    reset on release) but not their sum, and a release after a cancelled
    statement waits for a server that may never answer.
    """

    __slots__ = ("pool", "timeout", "deadline", "conn", "expired", "_watchdog")

    def __init__(self, pool: FairPool, timeout: float, deadline: float | None = None) -> None:
        self.pool = pool
        self.timeout = timeout if deadline is None else min(timeout, deadline)
        self.deadline = deadline
        self.conn = None
        self.expired = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # asyncio.timeout, not acquire(timeout=): asyncpg's wait_for makes
            # a task per acquire.
            async with asyncio.timeout(self.timeout):
                self.conn = await self.pool.acquire()
        except CONNECT_FAILURES as exc:
            raise DatabaseUnavailable("database unavailable, retry") from exc
        if self.deadline is not None:
            left = max(0.0, self.deadline - (loop.time() - started))
            self._watchdog = loop.call_later(left, self._expire)
        return self.conn

    def _expire(self) -> None:
        self.expired = True
        log.warning("database did not answer within %.1fs, dropping the connection", self.deadline)
        self.conn.terminate()  # type: ignore[union-attr]

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        lost = isinstance(exc, LOST_SERVER)
        if lost:
            log.warning("dropping a connection to a server that failed it: %r", exc)
            try:
                self.conn.terminate()  # type: ignore[union-attr]
            except asyncpg.exceptions.InterfaceError:
                pass  # lost already: asyncpg has taken it back from us
        await self.pool.release(self.conn)
        if self.expired and isinstance(exc, Exception) and not isinstance(exc, DatabaseUnavailable):
            raise DatabaseUnavailable("database did not answer in time, retry") from exc
        if lost:
            raise DatabaseUnavailable("database unavailable, retry") from exc
