"""A check run once at start, then every interval in a task its owner stops:
the health loops of the database and of Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger("hangout")


class Poller:
    def __init__(self, name: str, check: Callable[[], Awaitable[None]], interval_s: float) -> None:
        self.name = name
        self.check = check
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._check_forever(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # never let the loop die
                log.exception("%s failed", self.name)
