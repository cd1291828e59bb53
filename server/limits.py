"""Failed-login counting in Redis: a fixed window per email, shared by all
processes. The window starts at the first failure and lasts LOGIN_WINDOW_S;
a success does not reset it.

An attempt is counted as a failure *before* its password is checked, in the
same atomic step as the limit check, and un-counted if it turns out not to
be one. Checking first and counting after the (slow) password hash would let
any number of concurrent guesses pass the check before the first is counted.
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
# that the window starts again at the next real failure.
_RELEASE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n <= 1 then
  redis.call('DEL', KEYS[1])
else
  redis.call('DECR', KEYS[1])
end
return 1
"""


class LoginLimiter:
    def __init__(self, redis: aioredis.Redis, max_failures: int, window_s: int,
                 redis_answering: Callable[[], bool] = lambda: True) -> None:
        self.redis = redis
        self.max_failures = max_failures
        self.window_s = window_s
        self.redis_answering = redis_answering

    @staticmethod
    def _key(email: str) -> str:
        return f"login-failures:{email}"

    async def reserve(self, email: str) -> None:
        """Count an attempt as a failure up front; ``rate_limited`` (with the
        seconds left in the window, rounded up) once the window is exhausted.
        ``unavailable`` at once while the process has stopped sending to a
        Redis that did not answer (server/outbox.py): no limit, no login."""
        if not self.redis_answering():
            raise RpcError(ErrorCode.UNAVAILABLE, "try again shortly")
        allowed, left_ms = await self.redis.eval(
            _RESERVE, 1, self._key(email), self.max_failures, self.window_s * 1000
        )
        if not allowed:
            left_ms = int(left_ms)
            retry_after = math.ceil(left_ms / 1000) if left_ms > 0 else self.window_s
            raise RpcError(ErrorCode.RATE_LIMITED, data={"retry_after": max(1, retry_after)})

    async def release(self, email: str) -> None:
        """The reserved attempt was not a failed guess (right password, or the
        password was never checked)."""
        await self.redis.eval(_RELEASE, 1, self._key(email))
