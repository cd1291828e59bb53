"""Read-your-writes: where each user's last write ends in the primary's WAL,
and how far a replica must have replayed to serve that user's reads.

After a user's write commits, the primary's WAL insert position is stored in
Redis under ``ryw:<user>`` for ``ryw_ttl_s``, so every process of the server
knows it; a local copy spares the look-up when this process made the write.
A replica may serve the user only once its replay position has reached it
(server/db/replicas.py). Without Redis, other processes' writes are unknown
and the user's reads go to the primary.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import redis.asyncio as aioredis
import redis.exceptions

from server.db.batching import Batcher
from server.outbox import UNREACHABLE, Outbox, RedisUnavailable

log = logging.getLogger("hangout.db")

# Who wrote: a user, several, or a function of the write's result (for a
# user the write created); None for nobody.
Writers = uuid.UUID | Iterable[uuid.UUID] | Callable[[Any], "uuid.UUID | Iterable[uuid.UUID] | None"] | None

# The write position of a write whose position could not be read after its
# commit: past any replica's, so the writer's reads go to the primary until
# the record expires (``ryw_ttl_s`` after the user's last write, as any record).
UNKNOWN_POSITION = "80000000/00000000"  # 2**63: no real position gets there

# Present as long as Redis has kept its data; see WritePositions._set_floor.
RYW_FLOOR_KEY = "ryw:floor"

# The newest write position any process recorded (``ryw:newest``, no TTL):
# every id a client can know of was made by a write at or before it.
NEWEST = "newest"

# Raise KEYS[1] to ARGV[1], never lower it. With ARGV[2], the key lives that
# many seconds from now (a user's write position); without, it keeps no TTL
# (the floor, see ``_set_floor``).
SET_MAX_LUA = """
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


def parse_lsn(text: str | None) -> int:
    if not text:
        return 0
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@dataclass(frozen=True)
class Committed:
    """What a write query returns when it committed by itself and read the
    primary's WAL insert position afterwards, in the same round trip (see
    sql/007): the write's position then needs no look-up of its own."""

    value: Any
    wal_lsn: str | None  # None: nothing was written


class _Deferred(list):
    """Write positions sent to Redis, not yet acknowledged, of one call
    (``WritePositions.recording``). A task the call spawned inherits it;
    once the call is over it is closed, and such a task waits for its own."""

    closed = False


_DEFERRED_RECORDS: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar(
    "deferred_write_records", default=None
)


async def _recorded(recorded: Awaitable[Any]) -> None:
    try:
        await recorded
    except RedisUnavailable:
        pass  # logged once when Redis stopped answering (server/outbox.py)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        log.warning("could not record write position in redis: %r", exc)


class WritePositions:
    """The write positions of users, recorded after their writes and looked
    up before their reads. ``insert_head(deadline)`` reads the primary's WAL
    insert position now."""

    def __init__(self, redis: aioredis.Redis, outbox: Outbox, ttl_s: int,
                 insert_head: Callable[..., Awaitable[str]]) -> None:
        self.redis = redis
        # On a Redis Cluster the floor and the users' positions live in
        # different slots: the cluster client reads them slot by slot.
        self._mget = getattr(redis, "mget_nonatomic", redis.mget)
        self.outbox = outbox
        self.ttl_s = ttl_s
        self.insert_head = insert_head
        self.local: dict[uuid.UUID, int] = {}  # this process's writes
        self.newest = 0  # the highest of them, of any user
        # The highest ``ryw:newest`` this process has sent to Redis: a write
        # at or below it (the rest of a merged batch, which shares one
        # position) need not send it again. Should Redis lose it, the floor
        # (``_set_floor``, ``raise_floor``) is at least as high.
        self._newest_sent = 0
        # Any position read after a commit covers it, so writes that
        # committed meanwhile share one look-up (and free their connection
        # before it).
        self._heads = Batcher(self._head, max_running=1)
        # Look-ups that overlap in time go as one MGET. Each is sent after
        # its read arrived, so it sees every write acknowledged before.
        self._lookups = Batcher(self._write_positions, max_running=2)

    async def close(self) -> None:
        await self._heads.close()
        await self._lookups.close()

    # ---- after a write ---------------------------------------------------

    async def record(self, users: Writers, result: Any, lsn: str | None = None) -> Any:
        """Record the write position of a committed ``result`` for ``users``
        (a function of the result, if callable); ``lsn`` if the caller knows
        it, or brought by a ``Committed`` result. Returns the result."""
        if isinstance(result, Committed):
            result, lsn = result.value, result.wal_lsn
        if callable(users):
            users = users(result)
        if users is not None:
            if lsn is None:
                try:
                    lsn = await self._heads.get(None)
                except Exception as exc:  # no connection, a deadline, a dropped or restarting primary...
                    # The write is committed: answering an error now would
                    # invite a retry that writes twice. Its position is unknown,
                    # so these users' reads go to the primary for a while.
                    log.warning("a committed write's WAL position could not be read (%r): its users read "
                                "from the primary for %ss", exc, self.ttl_s)
                    lsn = UNKNOWN_POSITION
            await self.remember([users] if isinstance(users, uuid.UUID) else list(users), lsn)
        return result

    async def _head(self, _keys: list[Any], _required: int) -> dict[None, str]:
        return {None: await self.insert_head()}

    def fail_head_lookups(self, error: Exception | None) -> None:
        """Fault injection for tests (``test.fail_position_lookups``): while
        ``error`` is set, reading the primary's position after a commit
        raises it, as when the primary stops answering just then. None
        restores the look-up."""
        if error is None:
            self._heads.fetch = self._head
            return

        async def fail(_keys: list[Any], _required: int) -> dict:
            raise error

        self._heads.fetch = fail

    async def remember(self, users: list[uuid.UUID], lsn_text: str) -> None:
        lsn = parse_lsn(lsn_text)
        # The local hint has no expiry: an unknown position lives in Redis
        # only, where it expires with the other positions (ttl_s).
        if lsn_text != UNKNOWN_POSITION:
            self.newest = max(self.newest, lsn)
            for u in users:
                if self.local.get(u, 0) < lsn:
                    self.local[u] = lsn
            if len(self.local) > 100_000:  # keep the local hint bounded
                self.local.clear()
                for u in users:
                    self.local[u] = lsn
        # Keep the highest position; a plain SET could move it back.
        # An unknown position stays the writers' own: it would send every
        # miss of everyone to the primary (server/db/database.py).
        newest = []
        if lsn_text != UNKNOWN_POSITION and lsn > self._newest_sent:
            newest = [("EVAL", SET_MAX_LUA, 1, f"ryw:{NEWEST}", lsn)]
            self._newest_sent = lsn
        recorded = self.outbox.submit([("EVAL", SET_MAX_LUA, 1, f"ryw:{u}", lsn, self.ttl_s) for u in users]
                                      + newest)
        deferred = _DEFERRED_RECORDS.get()
        if deferred is not None and not deferred.closed:
            deferred.append(recorded)
        else:
            await _recorded(recorded)

    @contextlib.asynccontextmanager
    async def recording(self) -> AsyncIterator[None]:
        """Within this block (one RPC call), a write does not wait for its
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

    # ---- before a read ---------------------------------------------------

    async def required(self, user: uuid.UUID | None) -> int:
        """The WAL position a replica must have replayed to serve ``user``
        (-1: unknown, so only the primary may)."""
        if user is None:
            return 0
        return await self._recorded_position(user, self.local.get(user, 0))

    async def newest_anywhere(self) -> int:
        """The newest write position recorded by any process (-1: unknown)."""
        return await self._recorded_position(NEWEST, self.newest)

    async def _recorded_position(self, key: uuid.UUID | str, local: int) -> int:
        if not self.outbox.available:
            return -1  # Redis is not answering: other processes' writes are unknown
        try:
            remote = await self._lookups.get(key)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
            # Without Redis we cannot know what other processes wrote: be safe.
            if isinstance(exc, UNREACHABLE):
                self.outbox.unreachable(exc)
            return -1
        return max(local, int(remote) if remote else 0)

    async def _write_positions(self, users: list[uuid.UUID | str], _required: int) -> dict[uuid.UUID | str, Any]:
        floor, *positions = await self._mget([RYW_FLOOR_KEY, *(f"ryw:{u}" for u in users)])
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
        head = await self.insert_head(deadline=None)
        await self.redis.set(RYW_FLOOR_KEY, parse_lsn(head), nx=True)
        return int(await self.redis.get(RYW_FLOOR_KEY) or parse_lsn(head))

    async def raise_floor(self) -> None:
        """Redis answers again after this process stopped sending to it: the
        write positions it did not record meanwhile are lost, so the floor
        of every user's position becomes the primary's current one (as in
        ``_set_floor``). Run before the outbox opens again."""
        self._newest_sent = 0  # what was sent meanwhile may not have arrived
        await self.redis.eval(SET_MAX_LUA, 1, RYW_FLOOR_KEY, parse_lsn(await self.insert_head()))
