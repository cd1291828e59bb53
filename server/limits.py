"""Counts in Redis over a fixed window, shared by all processes: the window
starts at the first count and lasts ``window_s``; nothing resets it early.

Two limits use it (server/handlers/auth.py):

- failed logins per email. An attempt is counted as a failure *before* its
  password is checked, in the same atomic step as the limit check, and
  un-counted if it turns out not to be one. Checking first and counting
  after the (slow) password hash would let any number of concurrent guesses
  pass the check before the first is counted.
- password checks (``auth.register`` and ``auth.login``) per client address.
  Every call counts, before anything else is done for it, and is never
  un-counted: an address past its limit stays past it until the window
  ends, so each process remembers that and refuses its calls without asking
  Redis (a flood past the limit costs no Redis round trips).

While Redis does not answer, both refuse (``unavailable``) rather than let
passwords be checked with no limit at all.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import redis.asyncio as aioredis

from protocol.errors import ErrorCode, RpcError

# -> {1, 0} when the attempt may go ahead (and is now counted), or
#    {0, milliseconds left in the window} when the limit is reached.
_RESERVE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then
  return {0, redis.call('PTTL', KEYS[1])}
end
if redis.call('INCR', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {1, 0}
"""

# Un-count an attempt. When it was the only one counted, the key goes, so
# that the window starts again at the next real count.
_RELEASE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n <= 1 then
  redis.call('DEL', KEYS[1])
else
  redis.call('DECR', KEYS[1])
end
return 1
"""


# How many keys past their limit a process remembers at most.
_REMEMBERED_MAX = 65536


class WindowLimit:
    """At most ``limit`` counts per key within a fixed window of ``window_s``.
    Keys are ``<prefix>:<key>``. With ``remember_refusals`` (only for counts
    that are never released) a refused key is refused from memory until its
    window ends."""

    def __init__(self, redis: aioredis.Redis, prefix: str, limit: int, window_s: int,
                 redis_answering: Callable[[], bool] = lambda: True, *, remember_refusals: bool = False) -> None:
        self.redis = redis
        self.prefix = prefix
        self.limit = limit
        self.window_s = window_s
        self.redis_answering = redis_answering
        # key -> time.monotonic() at which its window ends
        self._refused: dict[str, float] | None = {} if remember_refusals else None

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def reserve(self, key: str) -> None:
        """Count one; ``rate_limited`` (with the seconds left in the window,
        rounded up) once the window is exhausted. ``unavailable`` at once
        while the process has stopped sending to a Redis that did not answer
        (server/outbox.py): no limit, no password check."""
        if self._refused is not None and key in self._refused:
            left_s = self._refused[key] - time.monotonic()
            if left_s > 0:
                raise _rate_limited(left_s)
            del self._refused[key]
        if not self.redis_answering():
            raise RpcError(ErrorCode.UNAVAILABLE, "try again shortly")
        allowed, left_ms = await self.redis.eval(
            _RESERVE, 1, self._key(key), self.limit, self.window_s * 1000
        )
        if not allowed:
            left_s = int(left_ms) / 1000 if int(left_ms) > 0 else self.window_s
            self._remember(key, left_s)
            raise _rate_limited(left_s)

    def _remember(self, key: str, left_s: float) -> None:
        if self._refused is None:
            return
        now = time.monotonic()
        if len(self._refused) >= _REMEMBERED_MAX:
            self._refused = {k: t for k, t in self._refused.items() if t > now}
            if len(self._refused) >= _REMEMBERED_MAX:
                return  # asking Redis is still right, only slower
        self._refused[key] = now + left_s

    async def release(self, key: str) -> None:
        """Un-count one reserved count (for failed logins: the right
        password, or the password was never checked)."""
        await self.redis.eval(_RELEASE, 1, self._key(key))


def _rate_limited(left_s: float) -> RpcError:
    """``retry_after``: the seconds left in the window, rounded up."""
    return RpcError(ErrorCode.RATE_LIMITED, data={"retry_after": max(1, math.ceil(left_s))})
