"""Failed-login counting in Redis: a fixed window per email, shared by all
processes. The window starts at the first failure and lasts LOGIN_WINDOW_S;
a success does not reset it."""

from __future__ import annotations

import redis.asyncio as aioredis

from protocol.errors import ErrorCode, RpcError

_COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class LoginLimiter:
    def __init__(self, redis: aioredis.Redis, max_failures: int, window_s: int) -> None:
        self.redis = redis
        self.max_failures = max_failures
        self.window_s = window_s

    @staticmethod
    def _key(email: str) -> str:
        return f"login-failures:{email}"

    async def check(self, email: str) -> None:
        """Raise ``rate_limited`` while the email's window is exhausted."""
        key = self._key(email)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.ttl(key)
            count, ttl = await pipe.execute()
        if count is not None and int(count) >= self.max_failures:
            retry_after = max(1, int(ttl)) if ttl and ttl > 0 else 1
            raise RpcError(ErrorCode.RATE_LIMITED, data={"retry_after": retry_after})

    async def record_failure(self, email: str) -> None:
        await self.redis.eval(_COUNT_FAILURE, 1, self._key(email), self.window_s)
