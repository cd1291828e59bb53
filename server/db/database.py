"""The database as the rest of the server sees it: where each query runs.

Writes, and reads that decide a write, run on the primary through
``Database.write``. Reads the protocol marks "Replica" run through
``Database.read``: on a healthy replica that has replayed the caller's last
write (read-your-writes, server/db/positions.py), otherwise on the primary.
A replica never fails a read that the primary can serve.

A read that finds nothing on a replica ("no such user") goes to the primary
only when that replica may be behind: anyone can ask for ids that do not
exist, and each such read must not cost the primary a query.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg
import redis.asyncio as aioredis

from server.config import Config
from server.db.batching import Batcher, BatchFailed, MergedWrite, WriteBatcher
from server.db.pool import PRIMARY_DEADLINE_S, REPLICA_DEADLINE_S, Acquire, FairPool, create_pool, pool_args
from server.db.positions import WritePositions, Writers, parse_lsn
from server.db.replicas import REPLAYED_SQL, REPLICA_FAILURES, Replicas
from server.outbox import Outbox

T = TypeVar("T")

# A replica that lacks a row may only be a little behind (it replays within
# milliseconds under load): it gets this long to catch up before the
# primary is asked, so that ids which do not exist cost the primary nothing.
MISS_CATCH_UP_S = 0.1
MISS_CATCH_UP_POLLS = 20
Query = Callable[..., Awaitable[T]]


class Database:
    """The primary's pool, the replicas and the users' write positions of one
    process; each query goes through it to where it must run."""

    def __init__(self, config: Config, redis: aioredis.Redis, outbox: Outbox) -> None:
        self.config = config
        self.primary: FairPool | None = None
        self.replicas = Replicas(config.replica_urls, pool_args(config), self.primary_lsn,
                                 config.replica_max_lag_bytes, config.replica_check_interval_s)
        # The health loop's own connection to the primary (``primary_lsn``):
        # it polls, and /readyz reports, whether the primary answers without
        # waiting behind the calls for a pooled connection.
        self._probe: asyncpg.Connection | None = None
        self.primary_answers = False
        self.primary_error: str | None = None
        self.positions = WritePositions(redis, outbox, config.ryw_ttl_s, self.insert_head)
        # Every RPC call enters this (server/dispatch.py): bound once, not
        # delegated per call. See WritePositions.recording.
        self.recording_writes = self.positions.recording
        self.primary_reads = 0  # reads the primary answered, for /readyz and tests
        self._merged_reads: dict[Any, Batcher] = {}
        self._merged_writes: dict[Any, WriteBatcher] = {}

    async def start(self) -> None:
        assert self.config.database_url
        self.primary = await create_pool(self.config.database_url, **pool_args(self.config))
        await self.replicas.start()

    async def close(self) -> None:
        await self.replicas.stop()
        for batcher in [*self._merged_reads.values(), *self._merged_writes.values()]:
            await batcher.close()
        await self.positions.close()
        if self._probe is not None:
            self._probe.terminate()
        pools = self.replicas.pools()
        if self.primary is not None:
            pools.append(self.primary)
        await asyncio.gather(*(asyncio.wait_for(p.close(), 5) for p in pools), return_exceptions=True)

    def acquire_primary(self, deadline: float | None = None) -> Acquire:
        """A primary connection; with ``deadline``, the whole use of it is cut
        off (``DatabaseUnavailable``) after that many seconds (see ``Acquire``)."""
        assert self.primary is not None
        return Acquire(self.primary, self.config.db_command_timeout_s, deadline)

    async def primary_lsn(self) -> int:
        """The primary's flushed WAL position (how far replicas lag), read
        on the probe connection; records whether the primary answered. The
        flushed one: a replica cannot have more, and with asynchronous
        commit what is merely written may wait for the WAL writer."""
        assert self.config.database_url
        try:
            if self._probe is None or self._probe.is_closed():
                self._probe = await asyncpg.connect(self.config.database_url, timeout=REPLICA_DEADLINE_S,
                                                    statement_cache_size=0)
            lsn = parse_lsn(await self._probe.fetchval("SELECT pg_current_wal_flush_lsn()::text",
                                                       timeout=REPLICA_DEADLINE_S))
        except Exception as exc:
            self.primary_answers, self.primary_error = False, repr(exc)
            if self._probe is not None:
                self._probe.terminate()
                self._probe = None
            raise
        self.primary_answers, self.primary_error = True, None
        return lsn

    def newest_commit(self) -> int:
        """The newest WAL position this process knows the primary reached:
        as last polled, or of its own last write."""
        return max(self.replicas.head, self.positions.newest)

    async def insert_head(self, deadline: float | None = PRIMARY_DEADLINE_S) -> str:
        """The primary's WAL insert position now: it covers every write
        acknowledged before."""
        async with self.acquire_primary(deadline=deadline) as conn:
            return await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")

    async def raise_floor(self) -> None:
        """See ``WritePositions.raise_floor`` (the outbox calls it when Redis
        answers again)."""
        await self.positions.raise_floor()

    # ---- writes ----------------------------------------------------------

    async def write(self, users: Writers, query: Query[T], *args: Any) -> T:
        """Run ``query(conn, *args)`` on the primary, then record the WAL
        position for each user in ``users`` so their next reads see it.
        ``users`` may be a function of the result (for a user just created).
        A query that returns ``Committed`` brings that position itself."""
        async with self.acquire_primary(deadline=PRIMARY_DEADLINE_S) as conn:
            result = await query(conn, *args)
        return await self.positions.record(users, result)

    async def write_merged(self, users: Writers, write: MergedWrite, locks: frozenset, *args: Any) -> Any:
        """``write(users, write.query, *args)``, except that calls which
        overlap in time are merged: ``write.query_many(conn, [args, ...])``
        makes several in one transaction and answers ``Committed([result,
        ...], position)``. At low load a call runs ``write.query`` alone, as
        ``write`` would.

        ``locks`` name what the call locks in the database: a batch never
        runs beside another that shares one of them (it would only wait for
        it), so calls that could collide run one batch after another.
        If a batch of several fails with a database error, each of its calls
        is made alone, so that each gets its own answer."""
        try:
            result, lsn = await self.write_batcher(write).submit(args, locks)
        except BatchFailed:
            return await self.write(users, write.query, *args)
        return await self.positions.record(users, result, lsn)

    def write_batcher(self, write: MergedWrite) -> WriteBatcher:
        """The batcher of ``write_merged``'s calls of ``write``, made on first
        use. Its ``hold``/``release`` and ``query_many`` are the test seams
        of tests/debug_methods.py."""
        merged = self._merged_writes.get(write)
        if merged is None:
            merged = self._merged_writes[write] = WriteBatcher(self.acquire_primary, write)
        return merged

    def merged_write_stats(self) -> dict[str, int]:
        """Totals of ``write_merged`` since start: batches of two calls or
        more, the calls in them, and the batches that failed; and the calls
        waiting for a batch now."""
        batchers = self._merged_writes.values()
        stats = {k: sum(getattr(b, k) for b in batchers) for k in ("batches", "calls", "failed")}
        stats["waiting"] = sum(len(b.waiting) for b in batchers)
        return stats

    # ---- reads -----------------------------------------------------------

    async def read(self, user: uuid.UUID | None, query: Query[T], *args: Any, checked_miss: bool = False) -> T:
        """Run ``query(conn, *args)`` on a replica that has replayed
        ``user``'s writes, or on the primary. Never fails because of a replica.
        With ``checked_miss``, a None from the replica is its answer unless the
        replica may be behind (``_read_after``)."""
        missed = _is_none if checked_miss else None
        return await self._read_after(await self.positions.required(user) if self.replicas.members else 0,
                                      missed, query, *args)

    async def read_primary(self, query: Query[T], *args: Any) -> T:
        """A read that must see everything committed: on the primary."""
        self.primary_reads += 1
        async with self.acquire_primary(deadline=PRIMARY_DEADLINE_S) as conn:
            return await query(conn, *args)

    async def read_one(self, user: uuid.UUID | None, query_many: Callable[..., Awaitable[dict]], key: Any,
                       checked_miss: bool = False) -> Any:
        """The row for ``key`` (None if absent), read like ``read(user, ...)``,
        with ``query_many(conn, keys) -> {key: row}``. Calls that overlap in
        time share one query: under load one statement serves many calls
        (a DataLoader), so the database, the pool and the event loop each
        do one round trip's work for a whole batch of them. ``checked_miss``
        as in ``read``: a key the replica lacks is absent unless it may be behind."""
        required = await self.positions.required(user) if self.replicas.members else 0
        return await self._merged_read(query_many, checked_miss).get(key, required)

    async def read_one_primary(self, query_many: Callable[..., Awaitable[dict]], key: Any) -> Any:
        """``read_one`` of a read that must see everything committed (as
        ``read_primary``): calls that overlap in time share one statement on
        the primary, so it sees everything committed before any of them
        asked. What a reconnect storm reads per client goes this way."""
        return await self._merged_read(query_many, False, primary=True).get(key, -1)

    def _merged_read(self, query_many: Callable[..., Awaitable[dict]], checked_miss: bool,
                     primary: bool = False) -> Batcher:
        """The batcher of ``query_many``'s reads; ``primary``: of those that
        must run there (position -1), kept apart so that they never send
        other callers' reads to the primary too."""
        merged = self._merged_reads.get((query_many, checked_miss, primary))
        if merged is None:
            async def fetch(keys: list[Any], required: int) -> dict:
                missed = (lambda found: len(found) < len(keys)) if checked_miss else None
                return await self._read_after(required, missed, query_many, keys)

            merged = self._merged_reads[(query_many, checked_miss, primary)] = Batcher(fetch, max_running=4)
        return merged

    async def _read_after(self, required: int, missed: Callable[[Any], bool] | None, query: Query[T],
                          *args: Any) -> T:
        """``read`` for a caller whose writes end at WAL position ``required``
        (-1: unknown, so the primary). With ``missed``, a replica's answer
        that misses something is asked of the primary only when the replica
        may be behind (``_caught_up``)."""
        replica = self.replicas.pick(required) if self.replicas.members else None
        if replica is not None:
            try:
                async with Acquire(replica.pool, REPLICA_DEADLINE_S, REPLICA_DEADLINE_S) as conn:  # type: ignore[arg-type]
                    result = await query(conn, *args)
                    if missed is not None and missed(result):
                        if not await self._catch_up(conn):
                            raise _Behind
                        # Asked again: this snapshot is newer than a position
                        # past every write recorded before the call came, so
                        # what it lacks did not exist when the caller asked.
                        result = await query(conn, *args)
                replica.served += 1
                return result
            except _Behind:
                pass
            except REPLICA_FAILURES as exc:
                self.replicas.failed(replica, exc)
        return await self.read_primary(query, *args)

    async def _catch_up(self, conn: asyncpg.Connection) -> bool:
        """Wait, at most ``MISS_CATCH_UP_S``, until the replica on ``conn`` has
        replayed every write this process knows of: its own, the primary's
        position as last polled, and the newest any process recorded (so a
        user created a moment ago on another process is among them). False
        if it has not, or if that newest position is unknown."""
        newest = await self.positions.newest_anywhere()
        if newest < 0:
            return False
        target = max(newest, self.newest_commit())
        for _ in range(MISS_CATCH_UP_POLLS):
            if parse_lsn(await conn.fetchval(REPLAYED_SQL)) >= target:
                return True
            await asyncio.sleep(MISS_CATCH_UP_S / MISS_CATCH_UP_POLLS)
        return False


class _Behind(Exception):
    """The replica may not have a row yet: the primary is asked."""


def _is_none(result: Any) -> bool:
    return result is None
