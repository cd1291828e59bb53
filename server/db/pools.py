"""asyncpg pools for the primary and the replicas, and read routing.

Writes, and reads that decide a write, run on the primary through
``Database.write``. Reads the protocol marks "Replica" run through
``Database.read``: on a healthy replica that has replayed the caller's last
write (read-your-writes), otherwise on the primary.

Read-your-writes across sockets and processes: after a user's write commits,
the primary's WAL insert position is stored in Redis under ``ryw:<user>`` for
``RYW_TTL_S``. A replica may serve that user only once its replay position
(polled by the health loop every ``REPLICA_CHECK_INTERVAL_S``) has reached it.
The polled position only lags the real one, so the check errs towards the
primary, never towards stale data.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterable, TypeVar
from urllib.parse import urlparse

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from protocol.errors import ErrorCode, RpcError
from server.config import Config
from server.outbox import UNREACHABLE, Outbox, RedisUnavailable

log = logging.getLogger("hangout.db")

T = TypeVar("T")
Query = Callable[..., Awaitable[T]]
Writers = uuid.UUID | Iterable[uuid.UUID] | Callable[[Any], "uuid.UUID | Iterable[uuid.UUID] | None"] | None

# Errors after which a replica is presumed dead and the read is retried on the primary.
_REPLICA_FAILURES = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    # shutting down, cannot connect now, query canceled (e.g. a recovery
    # conflict on the standby)
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.SerializationError,
    OSError,
    asyncio.TimeoutError,
)

# The contract promises a write an answer within 5 s even when the primary
# does not answer at all (then ``unavailable``): every use of the primary by
# ``write``/``read`` is cut off after this long. A replica that does not
# answer a read within REPLICA_DEADLINE_S is skipped for the primary.
PRIMARY_DEADLINE_S = 4.0
# The write position of a write whose position could not be read after its
# commit: past any replica's, so the writer's reads go to the primary until
# the record expires (RYW_TTL_S after the user's last write, as any record).
UNKNOWN_POSITION = "80000000/00000000"  # 2**63: no real position gets there
REPLICA_DEADLINE_S = 2.0


class _Deferred(list):
    """Write positions sent to Redis, not yet acknowledged, of one call
    (``Database.recording_writes``). A task the call spawned inherits it;
    once the call is over it is closed, and such a task waits for its own."""

    closed = False


_DEFERRED_RECORDS: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar(
    "deferred_write_records", default=None
)


async def _recorded(recorded: asyncio.Future) -> None:
    try:
        await recorded
    except RedisUnavailable:
        pass  # logged once when Redis stopped answering (server/outbox.py)
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("could not record write position in redis: %r", exc)


@dataclass(frozen=True)
class Committed:
    """What a write query returns when it committed by itself and read the
    primary's WAL insert position afterwards, in the same round trip (see
    sql/007): ``Database.write`` then skips its own look-up of the position."""

    value: Any
    wal_lsn: str | None  # None: nothing was written


def parse_lsn(text: str | None) -> int:
    if not text:
        return 0
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def redact(url: str) -> str:
    u = urlparse(url)
    return f"{u.hostname}:{u.port or 5432}{u.path}"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release. asyncpg has already rolled back any open
    transaction; its default would then send ``SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`` - a second round trip per query. Pooled
    connections never hold session state here (no SET, LISTEN, cursors or
    session advisory locks; migrations use a connection of their own), so
    there is nothing to undo."""


class FairPool:
    """An asyncpg pool that hands out connections in the order they were
    asked for.

    asyncpg's pool waits on an ``asyncio.Queue``: a freed connection wakes
    the first waiter, but an acquire that arrives before that waiter runs
    finds the connection and takes it, and the waiter goes back to the end
    of the line. Under load some calls were passed over again and again: in
    loadtests/bench_bookings.py at 50 clients, a pool of 8 gave p99 105 ms
    against 75 ms with 20 at the same p50. A FIFO semaphore of the pool's
    size in front (asyncio's is fair since Python 3.11.1) means the pool
    itself never makes anyone wait."""

    __slots__ = ("pool", "gate", "waiting")

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.gate = asyncio.Semaphore(pool.get_max_size())
        self.waiting = 0  # callers waiting for a connection (/readyz)

    async def acquire(self) -> asyncpg.Connection:
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


async def _create_pool(url: str, **kwargs: Any) -> FairPool:
    return FairPool(await asyncpg.create_pool(url, **kwargs))


@dataclass
class Replica:
    url: str
    pool: FairPool | None = None
    healthy: bool = False
    replay_lsn: int = 0
    lag_bytes: int | None = None
    error: str | None = None
    served: int = 0  # reads served, for /readyz and tests


@dataclass
class Database:
    config: Config
    redis: aioredis.Redis
    outbox: Outbox
    primary: FairPool | None = None
    replicas: list[Replica] = field(default_factory=list)
    _local_lsn: dict[uuid.UUID, int] = field(default_factory=dict)
    _health_task: asyncio.Task | None = None
    _rr: int = 0
    primary_reads: int = 0
    _merged: dict[Any, "_Batcher"] = field(default_factory=dict)
    _merged_writes: dict[Any, "_WriteBatcher"] = field(default_factory=dict)
    _ryw_lookups: "_Batcher | None" = None
    _heads: "_Batcher | None" = None  # primary WAL position look-ups after writes

    def _pool_args(self) -> dict[str, Any]:
        c = self.config
        return dict(
            min_size=c.db_pool_min,
            max_size=c.db_pool_max,
            statement_cache_size=c.db_statement_cache_size,
            command_timeout=c.db_command_timeout_s,
            timeout=c.db_command_timeout_s,  # connect timeout
            max_inactive_connection_lifetime=300,
            reset=_keep_session,
        )

    async def start(self) -> None:
        assert self.config.database_url
        self.primary = await _create_pool(self.config.database_url, **self._pool_args())
        self.replicas = [Replica(url) for url in self.config.replica_urls]
        await self.check_replicas()
        self._health_task = asyncio.create_task(self._health_loop(), name="replica-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for batcher in [*self._merged.values(), *self._merged_writes.values(),
                        *(b for b in (self._ryw_lookups, self._heads) if b)]:
            await batcher.close()
        pools = [r.pool for r in self.replicas if r.pool is not None]
        if self.primary is not None:
            pools.append(self.primary)
        await asyncio.gather(*(asyncio.wait_for(p.close(), 5) for p in pools), return_exceptions=True)

    # ---- health ----------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.replica_check_interval_s)
            try:
                await self.check_replicas()
            except Exception:  # never let the loop die
                log.exception("replica health check failed")

    async def primary_lsn(self) -> int:
        async with self.acquire_primary(deadline=REPLICA_DEADLINE_S) as conn:
            return parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))

    async def check_replicas(self) -> None:
        if not self.replicas:
            return
        try:
            head = await self.primary_lsn()
        except Exception:
            head = None
        await asyncio.gather(*(self._check(r, head) for r in self.replicas))

    async def _check(self, replica: Replica, head: int | None) -> None:
        try:
            if replica.pool is None:
                replica.pool = await _create_pool(replica.url, **{**self._pool_args(), "min_size": 1, "timeout": 2})
            async with _Acquire(replica.pool, REPLICA_DEADLINE_S, REPLICA_DEADLINE_S) as conn:
                lsn = await conn.fetchval("SELECT pg_last_wal_replay_lsn()::text")
        except Exception as exc:
            if replica.healthy:
                log.warning("replica %s down: %r", redact(replica.url), exc)
            replica.healthy = False
            replica.error = repr(exc.__cause__ or exc)
            replica.lag_bytes = None
            return
        replica.replay_lsn = parse_lsn(lsn)
        replica.lag_bytes = max(0, head - replica.replay_lsn) if head is not None else None
        replica.error = None
        healthy = replica.lag_bytes is None or replica.lag_bytes <= self.config.replica_max_lag_bytes
        if healthy != replica.healthy:
            log.info("replica %s %s (lag %s bytes)", redact(replica.url), "healthy" if healthy else "lagging", replica.lag_bytes)
        replica.healthy = healthy

    # ---- writes ----------------------------------------------------------

    async def write(self, users: Writers, query: Query[T], *args: Any) -> T:
        """Run ``query(conn, *args)`` on the primary, then record the WAL
        position for each user in ``users`` so their next reads see it.
        ``users`` may be a function of the result (for a user just created).
        A query that returns ``Committed`` brings that position itself."""
        assert self.primary is not None
        async with self.acquire_primary(deadline=PRIMARY_DEADLINE_S) as conn:
            result = await query(conn, *args)
        return await self._record_write(users, result)

    async def _record_write(self, users: Writers, result: Any, lsn: str | None = None) -> Any:
        """Record the write position of a committed ``result`` for ``users``
        (see ``write``); ``lsn`` if the caller knows it. Returns the result."""
        if isinstance(result, Committed):
            result, lsn = result.value, result.wal_lsn
        if callable(users):
            users = users(result)
        if users is not None:
            if lsn is None:
                if self._heads is None:
                    self._heads = _Batcher(self._primary_head, max_running=1)
                # Any position read after the commit covers it, so writes that
                # committed meanwhile share one look-up (and free their
                # connection before it).
                try:
                    lsn = await self._heads.get(None)
                except Exception as exc:  # no connection, a deadline, a dropped or restarting primary...
                    # The write is committed: answering an error now would
                    # invite a retry that writes twice. Its position is unknown,
                    # so these users' reads go to the primary for a while.
                    log.warning("a committed write's WAL position could not be read (%r): its users read "
                                "from the primary for %ss", exc, self.config.ryw_ttl_s)
                    lsn = UNKNOWN_POSITION
            await self.remember_write([users] if isinstance(users, uuid.UUID) else list(users), lsn)
        return result

    async def write_merged(self, users: Writers, query: Query[Any], query_many: Query[Committed],
                           locks: frozenset, *args: Any) -> Any:
        """``write(users, query, *args)``, except that calls which overlap in
        time are merged: ``query_many(conn, [args, ...])`` makes several in
        one transaction and answers ``Committed([result, ...], position)``.
        At low load a call runs ``query`` alone, as ``write`` would.

        ``locks`` name what the call locks in the database: a batch never
        runs beside another that shares one of them (it would only wait for
        it), so calls that could collide run one batch after another.
        If a batch of several fails with a database error, each of its calls
        is made alone, so that each gets its own answer."""
        try:
            result, lsn = await self._write_batcher(query, query_many).submit(args, locks)
        except _BatchFailed:
            return await self.write(users, query, *args)
        return await self._record_write(users, result, lsn)

    def _write_batcher(self, query: Query[Any], query_many: Query[Committed]) -> "_WriteBatcher":
        """The batcher of ``query_many``'s calls, made on first use."""
        merged = self._merged_writes.get(query_many)
        if merged is None:
            merged = self._merged_writes[query_many] = _WriteBatcher(self, query, query_many)
        return merged

    def merged_write_stats(self) -> dict[str, int]:
        """Totals of ``write_merged`` since start: batches of two calls or
        more, the calls in them, and the batches that failed; and the calls
        waiting for a batch now."""
        batchers = self._merged_writes.values()
        stats = {k: sum(getattr(b, k) for b in batchers) for k in ("batches", "calls", "failed")}
        stats["waiting"] = sum(len(b.waiting) for b in batchers)
        return stats

    async def _insert_head(self, deadline: float | None = PRIMARY_DEADLINE_S) -> str:
        """The primary's WAL insert position now: it covers every write
        acknowledged before."""
        async with self.acquire_primary(deadline=deadline) as conn:
            return await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")

    async def _primary_head(self, _keys: list[Any], _required: int) -> dict[None, str]:
        return {None: await self._insert_head()}

    def acquire_primary(self, deadline: float | None = None) -> "_Acquire":
        """A primary connection; with ``deadline``, the whole use of it is cut
        off (``unavailable``) after that many seconds (see ``_Acquire``)."""
        assert self.primary is not None
        return _Acquire(self.primary, self.config.db_command_timeout_s, deadline)

    async def remember_write(self, users: list[uuid.UUID], lsn_text: str) -> None:
        lsn = parse_lsn(lsn_text)
        # The local hint has no expiry: an unknown position lives in Redis
        # only, where it expires with the other positions (RYW_TTL_S).
        if lsn_text != UNKNOWN_POSITION:
            for u in users:
                if self._local_lsn.get(u, 0) < lsn:
                    self._local_lsn[u] = lsn
            if len(self._local_lsn) > 100_000:  # keep the local hint bounded
                self._local_lsn.clear()
                for u in users:
                    self._local_lsn[u] = lsn
        # Keep the highest position; a plain SET could move it back.
        recorded = self.outbox.submit([("EVAL", _SET_MAX_LUA, 1, f"ryw:{u}", lsn, self.config.ryw_ttl_s) for u in users])
        deferred = _DEFERRED_RECORDS.get()
        if deferred is not None and not deferred.closed:
            deferred.append(recorded)
        else:
            await _recorded(recorded)

    @contextlib.asynccontextmanager
    async def recording_writes(self) -> AsyncIterator[None]:
        """Within this block (one RPC call), ``write`` does not wait for its
        write position to reach Redis; the block's exit does, before the
        call's reply goes out. The events the call publishes meanwhile then
        travel in the same pipeline, behind the position (server/outbox.py)."""
        pending = _Deferred()
        token = _DEFERRED_RECORDS.set(pending)
        try:
            yield
        finally:
            _DEFERRED_RECORDS.reset(token)
            try:
                for recorded in pending:
                    await _recorded(recorded)
            finally:
                pending.closed = True

    # ---- reads -----------------------------------------------------------

    async def required_lsn(self, user: uuid.UUID | None) -> int:
        if user is None:
            return 0
        local = self._local_lsn.get(user, 0)
        if not self.outbox.available:
            return -1  # Redis is not answering: other processes' writes are unknown
        if self._ryw_lookups is None:
            # Look-ups that overlap in time go as one MGET. Each is sent after
            # its read arrived, so it sees every write acknowledged before.
            self._ryw_lookups = _Batcher(self._write_positions, max_running=2)
        try:
            remote = await self._ryw_lookups.get(user)
        except (redis.exceptions.RedisError, OSError) as exc:
            # Without Redis we cannot know what other processes wrote: be safe.
            if isinstance(exc, UNREACHABLE):
                self.outbox.unreachable(exc)
            return -1
        return max(local, int(remote) if remote else 0)

    async def _write_positions(self, users: list[uuid.UUID], _required: int) -> dict[uuid.UUID, Any]:
        floor, *positions = await self.redis.mget([RYW_FLOOR_KEY, *(f"ryw:{u}" for u in users)])
        if floor is None:
            floor = await self._set_floor()
        floor = int(floor)
        return {u: max(floor, int(p) if p else 0) for u, p in zip(users, positions)}

    async def _set_floor(self) -> int:
        """Redis has lost every recorded write position (it restarted without
        persistence, or this is its first use). Any write acknowledged before
        now ends at or before the primary's current position, so that becomes
        the floor of every user's position: reads go to the primary until the
        replicas have replayed past it, then to the replicas again."""
        head = await self._insert_head(deadline=None)
        await self.redis.set(RYW_FLOOR_KEY, parse_lsn(head), nx=True)
        return int(await self.redis.get(RYW_FLOOR_KEY) or parse_lsn(head))

    async def raise_floor(self) -> None:
        """Redis answers again after this process stopped sending to it: the
        write positions it did not record meanwhile are lost, so the floor
        of every user's position becomes the primary's current one (as in
        ``_set_floor``). Run before the outbox opens again."""
        await self.redis.eval(_SET_MAX_LUA, 1, RYW_FLOOR_KEY, parse_lsn(await self._insert_head()))

    def pick_replica(self, required: int) -> Replica | None:
        if required < 0:
            return None
        candidates = [r for r in self.replicas if r.healthy and r.pool is not None and r.replay_lsn >= required]
        if not candidates:
            return None
        self._rr = (self._rr + 1) % len(candidates)
        return candidates[self._rr]

    async def read(self, user: uuid.UUID | None, query: Query[T], *args: Any) -> T:
        """Run ``query(conn, *args)`` on a replica that has replayed
        ``user``'s writes, or on the primary. Never fails because of a replica."""
        return await self._read_after(await self.required_lsn(user) if self.replicas else 0, query, *args)

    async def read_primary(self, query: Query[T], *args: Any) -> T:
        """A read that must see everything committed: on the primary."""
        async with self.acquire_primary(deadline=PRIMARY_DEADLINE_S) as conn:
            return await query(conn, *args)

    async def read_one(self, user: uuid.UUID | None, query_many: Callable[..., Awaitable[dict]], key: Any) -> Any:
        """The row for ``key`` (None if absent), read like ``read(user, ...)``,
        with ``query_many(conn, keys) -> {key: row}``. Calls that overlap in
        time share one query: under load one statement serves many calls
        (a DataLoader), so the database, the pool and the event loop each
        do one round trip's work for a whole batch of them."""
        required = await self.required_lsn(user) if self.replicas else 0
        merged = self._merged.get(query_many)
        if merged is None:
            async def fetch(keys: list[Any], required: int) -> dict:
                return await self._read_after(required, query_many, keys)

            merged = self._merged[query_many] = _Batcher(fetch, max_running=4)
        return await merged.get(key, required)

    async def _read_after(self, required: int, query: Query[T], *args: Any) -> T:
        """``read`` for a caller whose writes end at WAL position ``required``
        (-1: unknown, so the primary)."""
        replica = self.pick_replica(required) if self.replicas else None
        if replica is not None:
            try:
                async with _Acquire(replica.pool, REPLICA_DEADLINE_S, REPLICA_DEADLINE_S) as conn:  # type: ignore[arg-type]
                    result = await query(conn, *args)
                replica.served += 1
                return result
            except (*_REPLICA_FAILURES, RpcError) as exc:
                # RpcError: no connection could be had (see _Acquire); a dead
                # replica must never fail a read that the primary can serve.
                if isinstance(exc, RpcError) and exc.code is not ErrorCode.UNAVAILABLE:
                    raise
                log.warning("replica %s failed a read, using primary: %r", redact(replica.url), exc.__cause__ or exc)
                replica.healthy = False
        self.primary_reads += 1
        async with self.acquire_primary(deadline=PRIMARY_DEADLINE_S) as conn:
            return await query(conn, *args)


class _Merging(abc.ABC):
    """What the batchers below share: requests gathered in one loop turn go
    at the end of it if fewer than ``max_running`` are running, else as soon
    as one of them ends. So at low load a call waits for nothing, and the
    busier the process, the more calls a request serves. A subclass says
    what is waiting (``_waiting``) and starts requests (``_send``, with
    ``_start``)."""

    def __init__(self, max_running: int) -> None:
        self.max_running = max_running
        self.running: dict[asyncio.Task, frozenset] = {}  # each with the locks it holds
        self.scheduled = False

    def _wake(self) -> None:
        """Something was added to what is waiting."""
        if not self.scheduled and len(self.running) < self.max_running:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    @abc.abstractmethod
    def _waiting(self) -> bool:
        """Whether a call waits to be sent."""

    @abc.abstractmethod
    def _send(self) -> None:
        """Start requests for what waits, as many as may run (``_start``)."""

    def _start(self, request: Coroutine[Any, Any, None], locks: frozenset = frozenset()) -> None:
        task = asyncio.create_task(request)
        self.running[task] = locks
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.running.pop(task, None)
        if self._waiting() and not self.scheduled:
            self._send()

    async def close(self) -> None:
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)


class _Batcher(_Merging):
    """Merges concurrent single-key look-ups of one kind into one request
    (see ``_Merging``). ``fetch(keys, required)`` answers ``{key: value}``;
    ``required`` is the strictest read-your-writes position among the
    batch's callers (-1 for "the primary"), which is never less safe than
    reading for each alone.
    """

    def __init__(self, fetch: Callable[[list[Any], int], Awaitable[dict]], max_running: int) -> None:
        super().__init__(max_running)
        self.fetch = fetch
        self.keys: list[Any] = []
        self.waiters: list[asyncio.Future] = []
        self.required = 0

    async def get(self, key: Any, required: int = 0) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.keys.append(key)
        self.waiters.append(fut)
        self.required = -1 if required < 0 or self.required < 0 else max(self.required, required)
        self._wake()
        return await fut

    def _waiting(self) -> bool:
        return bool(self.keys)

    def _send(self) -> None:
        self.scheduled = False
        if not self.keys:
            return
        keys, waiters, required = self.keys, self.waiters, self.required
        self.keys, self.waiters, self.required = [], [], 0
        self._start(self._run(keys, waiters, required))

    async def _run(self, keys: list[Any], waiters: list[asyncio.Future], required: int) -> None:
        try:
            found = await self.fetch(list(dict.fromkeys(keys)), required)
        except BaseException as exc:
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RpcError(ErrorCode.UNAVAILABLE))
            if not isinstance(exc, Exception):
                raise
        else:
            for key, fut in zip(keys, waiters):
                if not fut.done():  # a caller whose socket closed meanwhile
                    fut.set_result(found.get(key))


class _BatchFailed(Exception):
    """A merged batch of writes failed in the database; nothing of it
    committed, and each caller makes its own call alone."""


class _WriteBatcher(_Merging):
    """Merges concurrent calls of one write (``Database.write_merged``; see
    ``_Merging``), at most ``MAX_BATCH`` a batch. A call that shares a lock
    with a running batch waits for the batch after it. A batch of one runs
    the single ``query``."""

    MAX_RUNNING = 2
    # Bounds how long one batch holds its locks, and how long its calls wait
    # for the slowest of them: in loadtests/bench_bookings.py (50 clients)
    # batches of up to 20 gave a p99 about 1.7 times the p50, against 2.0 at
    # 32, for the same throughput (what a batch costs beyond its bookings,
    # about one booking's worth, is then spread over 20 calls, not 32).
    MAX_BATCH = 20
    # And how many locks one batch takes: PostgreSQL's lock table is shared,
    # max_locks_per_transaction (64) per connection; a 12-hour booking takes
    # 24 hour locks. (One call more than this still goes, alone.)
    MAX_LOCKS = 256

    def __init__(self, db: "Database", query: Query[Any], query_many: Query["Committed"]) -> None:
        super().__init__(self.MAX_RUNNING)
        self.db = db
        self.query = query
        self.query_many = query_many
        self.waiting: list[tuple[tuple, frozenset, asyncio.Future]] = []
        # Batches of two calls or more, the calls in them, and those that
        # failed (their calls were then made alone): /readyz shows them.
        self.batches = self.calls = self.failed = 0

    def submit(self, args: tuple, locks: frozenset) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((args, locks, fut))
        self._wake()
        return fut

    def _waiting(self) -> bool:
        return bool(self.waiting)

    def _send(self) -> None:
        self.scheduled = False
        while self.waiting and len(self.running) < self.max_running:
            busy = frozenset().union(*self.running.values())
            batch, rest, locks = [], [], 0
            for item in self.waiting:
                if item[2].done():  # its caller is gone
                    continue
                fits = not batch or (len(batch) < self.MAX_BATCH and locks + len(item[1]) <= self.MAX_LOCKS)
                if fits and not (item[1] & busy):
                    batch.append(item)
                    locks += len(item[1])
                else:
                    rest.append(item)
            self.waiting = rest
            if not batch:
                return
            self._start(self._run(batch), frozenset().union(*(item[1] for item in batch)))

    async def _run(self, batch: list[tuple[tuple, frozenset, asyncio.Future]]) -> None:
        try:
            async with self.db.acquire_primary(deadline=PRIMARY_DEADLINE_S) as conn:
                if len(batch) == 1:
                    results, lsn = [await self.query(conn, *batch[0][0])], None
                else:
                    self.batches += 1
                    self.calls += len(batch)
                    committed = await self.query_many(conn, [item[0] for item in batch])
                    results, lsn = committed.value, committed.wal_lsn
        except BaseException as exc:
            if len(batch) > 1 and isinstance(exc, asyncpg.PostgresError):
                self.failed += 1
                log.warning("a batch of %d merged writes failed, making each alone: %r", len(batch), exc)
                exc = _BatchFailed()
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RpcError(ErrorCode.UNAVAILABLE))
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, _, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result((result, lsn))


# Present as long as Redis has kept its data; see Database._set_floor.
RYW_FLOOR_KEY = "ryw:floor"

# Raise KEYS[1] to ARGV[1], never lower it. With ARGV[2], the key lives that
# many seconds from now (a user's write position); without, it keeps no TTL
# (the floor, see ``_set_floor``).
_SET_MAX_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  if ARGV[2] then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
elseif ARGV[2] then
  -- A later write keeps the higher position alive for its own sake; behind
  -- UNKNOWN_POSITION (2**63) too, which then covers it.
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class _Acquire:
    """A pooled connection for one operation, bounded in time.

    Getting a connection waits at most ``timeout``; failing to get one is
    ``unavailable``. With a ``deadline`` (seconds, counted from the acquire),
    a connection still held when it passes is terminated: whatever awaits it
    fails at once, and the operation ends ``unavailable``. asyncpg's own
    timeouts bound each step (connect, each statement, the reset on release)
    but not their sum, and a release after a cancelled statement waits for
    a server that may never answer.
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
            # a task per acquire (about 5 us of CPU each, measured).
            async with asyncio.timeout(self.timeout):
                self.conn = await self.pool.acquire()
        except (asyncio.TimeoutError, OSError, asyncpg.exceptions.PostgresConnectionError,
                asyncpg.exceptions.CannotConnectNowError) as exc:
            raise RpcError(ErrorCode.UNAVAILABLE, "database unavailable, retry") from exc
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
        await self.pool.release(self.conn)
        if self.expired and isinstance(exc, Exception) and not isinstance(exc, RpcError):
            raise RpcError(ErrorCode.UNAVAILABLE, "database did not answer in time, retry") from exc
