"""The primary's replicas: their health, polled by a loop, and which one
serves a read. The loop polls the primary's WAL position too, replicas or
not: it measures their lag, tells /readyz whether the primary answers, and
is the newest commit a process knows of (server/db/database.py).

A replica serves a read only while it is healthy (it answers, and lags the
primary by at most ``replica_max_lag_bytes``) and has replayed the reader's
last write (``required``, see server/db/positions.py). The replay positions
are polled every ``replica_check_interval_s``; a polled position only lags
the real one, so the choice errs towards the primary, never towards stale
data.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import urlparse

import asyncpg

from server.db.errors import DatabaseUnavailable
from server.db.pool import REPLICA_DEADLINE_S, Acquire, FairPool, create_pool
from server.db.positions import parse_lsn
from server.periodic import Periodic

log = logging.getLogger("hangout.db")

# Errors after which a replica is presumed dead and the read is retried on
# the primary.
REPLICA_FAILURES = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    # shutting down, cannot connect now, query canceled (e.g. a recovery
    # conflict on the standby)
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.SerializationError,
    OSError,
    asyncio.TimeoutError,
    # no connection could be had, or none in time (see Acquire)
    DatabaseUnavailable,
)


# How far a member has replayed the primary's WAL. A member that is not in
# recovery was promoted (a failover): it is a primary now, has everything it
# ever replayed and more, and still serves reads; its own WAL position
# stands in for the replayed one.
REPLAYED_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END)::text, NOT pg_is_in_recovery()"
)


def redact(url: str) -> str:
    """A database URL without its credentials, for logs and /readyz. A
    multi-host URL (``h1:p1,h2:p2``) keeps all its hosts."""
    u = urlparse(url)
    hosts = u.netloc.rpartition("@")[2]
    return f"{hosts if ':' in hosts or ',' in hosts else hosts + ':5432'}{u.path}"


@dataclass
class Replica:
    url: str
    pool: FairPool | None = None
    healthy: bool = False
    replay_lsn: int = 0
    lag_bytes: int | None = None
    error: str | None = None
    served: int = 0  # reads served, for /readyz and tests
    promoted: bool = False  # it is a primary now, not in recovery (a failover)


class Replicas:
    """The replicas (``members``), the loop that checks their health, and the
    choice of one for a read. Iterating gives the members."""

    def __init__(self, urls: tuple[str, ...] | list[str], pool_args: dict[str, Any],
                 primary_lsn: Callable[[], Awaitable[int]], max_lag_bytes: int, interval_s: float) -> None:
        self.members = [Replica(url) for url in urls]
        # A replica's pool is small and gives up connecting sooner than the primary's.
        self.pool_args = {**pool_args, "min_size": 1, "timeout": 2}
        self.primary_lsn = primary_lsn
        self.max_lag_bytes = max_lag_bytes
        self.head = 0  # the primary's WAL position as last polled
        self._turn = 0
        self._poller = Periodic("replica-health", self.check, interval_s)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    async def start(self) -> None:
        """Check every replica once, then keep checking in the background."""
        await self._poller.start(first_pass_now=True)

    async def stop(self) -> None:
        """Stop checking; the pools stay open (``pools`` lists them)."""
        await self._poller.stop()

    def pools(self) -> list[FairPool]:
        return [r.pool for r in self.members if r.pool is not None]

    async def check(self) -> None:
        try:
            head: int | None = await self.primary_lsn()
        except Exception:
            head = None
        self.head = max(self.head, head or 0)
        await asyncio.gather(*(self._check(r, head) for r in self.members))

    async def _check(self, replica: Replica, head: int | None) -> None:
        try:
            if replica.pool is None:
                replica.pool = await create_pool(replica.url, **self.pool_args)
            async with Acquire(replica.pool, REPLICA_DEADLINE_S, REPLICA_DEADLINE_S) as conn:
                lsn, promoted = await conn.fetchrow(REPLAYED_SQL)
        except Exception as exc:
            if replica.healthy:
                log.warning("replica %s down: %r", redact(replica.url), exc)
            replica.healthy = False
            replica.error = repr(exc.__cause__ or exc)
            replica.lag_bytes = None
            return
        if promoted != replica.promoted:
            log.warning("replica %s %s", redact(replica.url),
                        "is a primary now (promoted), still serving reads" if promoted else "is a replica again")
        replica.promoted = promoted
        replica.replay_lsn = parse_lsn(lsn)
        replica.lag_bytes = max(0, head - replica.replay_lsn) if head is not None else None
        replica.error = None
        healthy = replica.lag_bytes is None or replica.lag_bytes <= self.max_lag_bytes
        if healthy != replica.healthy:
            log.info("replica %s %s (lag %s bytes)", redact(replica.url), "healthy" if healthy else "lagging",
                     replica.lag_bytes)
        replica.healthy = healthy

    def pick(self, required: int) -> Replica | None:
        """A healthy replica that has replayed up to WAL position ``required``
        (-1: none may serve), taken in turn; None if there is none."""
        if required < 0:
            return None
        candidates = [r for r in self.members if r.healthy and r.pool is not None and r.replay_lsn >= required]
        if not candidates:
            return None
        self._turn = (self._turn + 1) % len(candidates)
        return candidates[self._turn]

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """``replica`` failed a read: it serves none until the health loop
        finds it answering again."""
        log.warning("replica %s failed a read, using primary: %r", redact(replica.url), exc.__cause__ or exc)
        replica.healthy = False
