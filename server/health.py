"""Whether Redis answers, polled in the background, so that /readyz answers
from what was last seen and never waits on a dependency itself. The primary
and the replicas are polled by the replica health loop (server/db/replicas.py)."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from server.outbox import UNREACHABLE, Outbox
from server.periodic import Periodic

log = logging.getLogger("hangout")


class RedisHealth:
    """Pings Redis every ``interval_s``. A ping that gets no answer also
    closes the outbox until Redis answers its probe (server/outbox.py), as
    a failed call would: a quiet process learns of the outage too."""

    def __init__(self, redis: aioredis.Redis, outbox: Outbox, interval_s: float, timeout_s: float) -> None:
        self.redis = redis
        self.outbox = outbox
        self.timeout_s = timeout_s
        self.answers = False
        self.error: str | None = None
        self._poller = Periodic("redis-health", self.check, interval_s)

    @property
    def ok(self) -> bool:
        return self.answers and self.outbox.available

    async def start(self) -> None:
        await self._poller.start(first_pass_now=True)

    async def stop(self) -> None:
        await self._poller.stop()

    async def check(self) -> None:
        try:
            await asyncio.wait_for(self.redis.ping(), self.timeout_s)
        except Exception as exc:
            if self.answers:
                log.warning("redis does not answer a ping: %r", exc)
            self.answers, self.error = False, repr(exc)
            if isinstance(exc, UNREACHABLE):
                self.outbox.unreachable(exc)
            return
        self.answers, self.error = True, None
