"""Presence: whether a user has an authenticated socket on any process.

Redis holds the state every process shares. While a user is online (by the
contract's debounced rule: going online is immediate, going offline waits
until no socket of theirs has been authenticated for 5 s) the key
``online:{user_id}`` exists; it is deleted when they go offline.
``online_among`` is what other parts of the server (the push hook) ask.

The rest of the state, all changed by the scripts below (each atomic, so
that two processes never both make one change):

- ``presence:conns:{user}``: process -> the user's authenticated sockets
  there; ``presence:proc:{process}``: the same counts by user, so that a
  dead process's users can be found.
- ``presence:alive:{process}``: set with a TTL by every heartbeat;
  ``presence:procs``: process -> its last sign of life. A process listed
  there whose key has expired died; the first sweep that sees it takes its
  sockets away, once.
- ``presence:leaving``: users with no socket left, scored by when they go
  offline unless one comes back; ``presence:left``: when their last socket
  went, which becomes their ``last_seen_at``.
- ``presence:last:{user}``: the user's latest change. Its version (Redis's
  clock in microseconds, increasing per user) orders changes that two
  processes announce at once (server/presence_worker.py).

On a Redis Cluster every key above starts with the hash tag ``{presence}``:
all of them then share one slot, which each script needs.

A process counts its own sockets in memory (``acquire``/``release``, called
from the socket's binding) and writes the counts that changed in one script
(``flush``): binding a socket never waits for Redis. Times come from Redis's
clock, the one clock all processes share.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Iterable

import redis.asyncio as aioredis
import redis.exceptions

# What a Redis that is down or hanging raises through the client.
REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError, asyncio.TimeoutError)
FLUSH_BATCH = 500  # users per flush script
SWEEP_BATCH = 1000  # users taken offline per sweep script
SWEEP_MAX_BATCHES = 20  # per sweep; the next sweep goes on
OFFLINE_RECORD_TTL_S = 30 * 24 * 3600  # PostgreSQL keeps last_seen_at for longer

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function num(x) return string.format('%.0f', x) end
-- The user's latest change, "1:<version>:" (online) or "0:<version>:<left>".
local function record(u, online, left)
  local key = 'presence:last:' .. u
  local v = now
  local prev = redis.call('GET', key)
  if prev then
    local pv = tonumber(string.match(prev, '^%d:(%d+):'))
    if pv and pv >= v then v = pv + 1 end
  end
  local rec = online .. ':' .. num(v) .. ':' .. (left or '')
  if online == '1' then
    redis.call('SET', key, rec)
  else
    redis.call('SET', key, rec, 'EX', ARGV[#ARGV])
  end
  return rec
end
-- No socket of the user is left: offline at ``due`` unless one comes back.
local function leave(u, due, left)
  redis.call('ZADD', 'presence:leaving', 'LT', num(due), u)
  redis.call('HSETNX', 'presence:left', u, left)
end
-- A process's sockets are gone: its users without another socket leave.
local function drop_process(p, due, left)
  for _, u in ipairs(redis.call('HKEYS', 'presence:proc:' .. p)) do
    local conns = 'presence:conns:' .. u
    redis.call('HDEL', conns, p)
    if redis.call('EXISTS', conns) == 0 and redis.call('EXISTS', 'online:' .. u) == 1 then
      leave(u, due, left)
    end
  end
  redis.call('DEL', 'presence:proc:' .. p, 'presence:alive:' .. p)
  redis.call('HDEL', 'presence:procs', p)
end
"""

# ARGV: process, heartbeat TTL (ms), offline delay (us), then (user, sockets)
# pairs, then the offline record TTL. -> {1 if the process had been given up
# for dead or never beat, then (user, record) of each user gone online}.
_FLUSH = _PRELUDE + """
local p = ARGV[1]
local lost = 0
if redis.call('SET', 'presence:alive:' .. p, num(now), 'PX', ARGV[2], 'NX') then lost = 1 end
redis.call('HSET', 'presence:procs', p, num(now))
local out = {lost}
for i = 4, #ARGV - 1, 2 do
  local u, n = ARGV[i], tonumber(ARGV[i + 1])
  local conns = 'presence:conns:' .. u
  if n > 0 then
    redis.call('HSET', conns, p, n)
    redis.call('HSET', 'presence:proc:' .. p, u, n)
    redis.call('ZREM', 'presence:leaving', u)
    redis.call('HDEL', 'presence:left', u)
    if redis.call('SET', 'online:' .. u, '1', 'NX') then
      out[#out + 1] = u
      out[#out + 1] = record(u, '1', nil)
    end
  else
    redis.call('HDEL', conns, p)
    redis.call('HDEL', 'presence:proc:' .. p, u)
    if redis.call('EXISTS', conns) == 0 and redis.call('EXISTS', 'online:' .. u) == 1 then
      leave(u, now + tonumber(ARGV[3]), num(now))
    end
  end
end
return out
"""

# ARGV: process, heartbeat TTL (ms). -> 1 if the process had been given up
# for dead or never beat (its counts must be written again), else 0.
_BEAT = _PRELUDE + """
local before = redis.call('SET', 'presence:alive:' .. ARGV[1], num(now), 'PX', ARGV[2], 'GET')
redis.call('HSET', 'presence:procs', ARGV[1], num(now))
if before then return 0 end
return 1
"""

# ARGV: how many users at most, the offline record TTL. Dead processes'
# users leave at once, last seen at the process's last sign of life; then
# users whose delay has passed go offline. -> (user, record) of each.
_SWEEP = _PRELUDE + """
local procs = redis.call('HGETALL', 'presence:procs')
for i = 1, #procs, 2 do
  if redis.call('EXISTS', 'presence:alive:' .. procs[i]) == 0 then
    drop_process(procs[i], now, procs[i + 1])
  end
end
local out = {}
local due = redis.call('ZRANGEBYSCORE', 'presence:leaving', '-inf', num(now), 'LIMIT', 0, tonumber(ARGV[1]))
for _, u in ipairs(due) do
  redis.call('ZREM', 'presence:leaving', u)
  local left = redis.call('HGET', 'presence:left', u) or num(now)
  redis.call('HDEL', 'presence:left', u)
  if redis.call('EXISTS', 'presence:conns:' .. u) == 0 and redis.call('DEL', 'online:' .. u) == 1 then
    out[#out + 1] = u
    out[#out + 1] = record(u, '0', left)
  end
end
return out
"""

# ARGV: process, offline delay (us), the offline record TTL. A process that
# stops: its users leave with the usual delay (their apps reconnect to
# another process meanwhile, without flicker).
_DEPART = _PRELUDE + """
drop_process(ARGV[1], now + tonumber(ARGV[2]), num(now))
return 1
"""


# On a Redis Cluster every presence key carries this hash tag, so that all
# of them share one slot: the scripts change many users' keys atomically.
CLUSTER_TAG = "{presence}"


def online_key(user_id: uuid.UUID, tag: str = "") -> str:
    return f"{tag}online:{user_id}"


def _last_key(user_id: uuid.UUID, tag: str = "") -> str:
    return f"{tag}presence:last:{user_id}"


def _tagged(script: str, tag: str) -> str:
    """``script`` with ``tag`` before each of its key names."""
    return script.replace("'presence:", f"'{tag}presence:").replace("'online:", f"'{tag}online:")


def _time(micros: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=micros)


@dataclass(frozen=True)
class Change:
    """A user went online or offline. ``version`` (microseconds of Redis's
    clock) is higher for a later change of the same user."""

    user_id: uuid.UUID
    online: bool
    last_seen_at: dt.datetime | None  # None while online
    version: int

    @property
    def changed_at(self) -> dt.datetime:
        return _time(self.version)

    @classmethod
    def parse(cls, user_id: uuid.UUID, record: bytes | str) -> "Change":
        text = record.decode() if isinstance(record, bytes) else record
        online, version, left = text.split(":")
        return cls(user_id, online == "1", None if online == "1" else _time(int(left)), int(version))


def _changes(replies: list) -> list[Change]:
    return [Change.parse(uuid.UUID(replies[i].decode()), replies[i + 1]) for i in range(0, len(replies), 2)]


class Presence:
    def __init__(self, redis: aioredis.Redis, offline_after_s: float = 5.0, ttl_s: float = 30.0,
                 *, cluster: bool = False) -> None:
        self.redis = redis
        self.tag = CLUSTER_TAG if cluster else ""
        # A cluster client sends a script to the master of its first key:
        # the tag itself names the presence slot.
        self._keys = [CLUSTER_TAG] if cluster else []
        self.process = uuid.uuid4().hex
        self._offline_after_us = str(int(offline_after_s * 1_000_000))
        self._ttl_ms = str(int(ttl_s * 1000))
        self._sockets: dict[uuid.UUID, int] = {}  # this process's authenticated sockets per user
        self._dirty: set[uuid.UUID] = set()  # users whose count Redis does not have yet
        self._wake = asyncio.Event()
        self._flush = redis.register_script(_tagged(_FLUSH, self.tag))
        self._beat = redis.register_script(_tagged(_BEAT, self.tag))
        self._sweep = redis.register_script(_tagged(_SWEEP, self.tag))
        self._depart = redis.register_script(_tagged(_DEPART, self.tag))

    async def online_among(self, user_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """The users of ``user_ids`` who are online now. Raises the Redis
        client's error when Redis does not answer: the caller decides what
        an unknown state means."""
        users = list(dict.fromkeys(user_ids))
        if not users:
            return set()
        found = await self.redis.mget([online_key(u, self.tag) for u in users])
        return {u for u, v in zip(users, found) if v is not None}

    # ---- this process's sockets (from server/binding.py) -------------------

    def acquire(self, user_id: uuid.UUID) -> None:
        """A socket of the user is authenticated here."""
        self._sockets[user_id] = self._sockets.get(user_id, 0) + 1
        self._changed(user_id)

    def release(self, user_id: uuid.UUID) -> None:
        """A socket of the user is no longer authenticated here."""
        left = self._sockets.get(user_id, 0) - 1
        if left > 0:
            self._sockets[user_id] = left
        else:
            self._sockets.pop(user_id, None)
        self._changed(user_id)

    def _changed(self, user_id: uuid.UUID) -> None:
        self._dirty.add(user_id)
        self._wake.set()

    def sockets(self, user_id: uuid.UUID) -> int:
        return self._sockets.get(user_id, 0)

    # ---- writing the shared state (server/presence_worker.py) --------------

    async def wait_dirty(self) -> None:
        await self._wake.wait()
        self._wake.clear()

    async def flush(self) -> tuple[bool, list[Change]]:
        """Write the counts that changed. Returns whether this process had
        been given up for dead (then ``resync``), and the users who went
        online. On failure the counts stay to be written."""
        dirty, self._dirty = self._dirty, set()
        users = sorted(dirty, key=lambda u: u.bytes)
        lost, changes = False, []
        try:
            for i in range(0, max(len(users), 1), FLUSH_BATCH):
                counts = [str(x) for u in users[i:i + FLUSH_BATCH] for x in (u, self._sockets.get(u, 0))]
                reply = await self._flush(keys=self._keys, args=[self.process, self._ttl_ms, self._offline_after_us,
                                                                 *counts, OFFLINE_RECORD_TTL_S])
                lost = lost or reply[0] == 1
                changes += _changes(reply[1:])
                dirty.difference_update(users[i:i + FLUSH_BATCH])
        finally:
            if dirty:
                self._dirty |= dirty
                self._wake.set()
        return lost, changes

    async def beat(self) -> bool:
        """Renew this process's heartbeat; True if it had been given up for
        dead (or never beat): then ``resync``."""
        return await self._beat(keys=self._keys, args=[self.process, self._ttl_ms]) == 1

    async def resync(self) -> None:
        """Write every count of this process again: after it was given up
        for dead (paused past its TTL, or Redis lost its data), its sockets
        must count again."""
        listed = await self.redis.hkeys(f"{self.tag}presence:proc:{self.process}")
        self._dirty.update(uuid.UUID(u.decode()) for u in listed)
        self._dirty.update(self._sockets)
        self._wake.set()

    async def sweep(self) -> list[Change]:
        """Take offline the users whose delay has passed, and first the
        users of dead processes; each change is made by one process only."""
        changes: list[Change] = []
        for _ in range(SWEEP_MAX_BATCHES):
            got = _changes(await self._sweep(keys=self._keys, args=[SWEEP_BATCH, OFFLINE_RECORD_TTL_S]))
            changes += got
            if len(got) < SWEEP_BATCH:
                break
        return changes

    async def depart(self) -> None:
        """This process stops: its sockets no longer count."""
        await self._depart(keys=self._keys, args=[self.process, self._offline_after_us, OFFLINE_RECORD_TTL_S])

    # ---- reading ------------------------------------------------------------

    async def latest(self, user_ids: list[uuid.UUID]) -> dict[uuid.UUID, Change]:
        """Each user's latest change, where Redis has it."""
        found = await self.redis.mget([_last_key(u, self.tag) for u in user_ids])
        return {u: Change.parse(u, r) for u, r in zip(user_ids, found) if r is not None}

    async def state(self, user_id: uuid.UUID) -> tuple[bool, Change | None]:
        """Whether the user is online, and their latest change if Redis has it."""
        online, last = await self.redis.mget([online_key(user_id, self.tag), _last_key(user_id, self.tag)])
        return online is not None, (Change.parse(user_id, last) if last is not None else None)
