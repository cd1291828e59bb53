"""Counts in Redis over a fixed window, shared by all processes: the window
starts at the first count and lasts ``window_s``; nothing resets it early.

Two limits use it (server/handlers/auth.py):

- failed logins per email. An attempt is counted as a failure *before* its
  password is checked, in the same atomic step as the limit check, and
  un-counted if it turns out not to be one. Checking first and counting
  after the (slow) password hash would let any number of concurrent guesses
  pass the check before the first is counted.
- password checks (``auth.register`` and ``auth.login``) per client address.
  Every call counts, before anything else is done for it.

While Redis does not answer, both refuse (``unavailable``) rather than let
passwords be checked with no limit at all.
"""

from __future__ import annotations

import math
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


class WindowLimit:
    """At most ``limit`` counts per key within a fixed window of ``window_s``.
    Keys are ``<prefix>:<key>``."""

    def __init__(self, redis: aioredis.Redis, prefix: str, limit: int, window_s: int,
                 redis_answering: Callable[[], bool] = lambda: True) -> None:
        self.redis = redis
        self.prefix = prefix
        self.limit = limit
        self.window_s = window_s
        self.redis_answering = redis_answering

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def reserve(self, key: str) -> None:
        """Count one; ``rate_limited`` (with the seconds left in the window,
        rounded up) once the window is exhausted. ``unavailable`` at once
        while the process has stopped sending to a Redis that did not answer
        (server/outbox.py): no limit, no password check."""
        if not self.redis_answering():
            raise RpcError(ErrorCode.UNAVAILABLE, "try again shortly")
        allowed, left_ms = await self.redis.eval(
            _RESERVE, 1, self._key(key), self.limit, self.window_s * 1000
        )
        if not allowed:
            left_ms = int(left_ms)
            retry_after = math.ceil(left_ms / 1000) if left_ms > 0 else self.window_s
            raise RpcError(ErrorCode.RATE_LIMITED, data={"retry_after": max(1, retry_after)})

    async def release(self, key: str) -> None:
        """Un-count one reserved count (for failed logins: the right
        password, or the password was never checked)."""
        await self.redis.eval(_RELEASE, 1, self._key(key))
