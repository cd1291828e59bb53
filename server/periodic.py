"""A background worker that makes one pass every interval, for as long as
its process runs: a failed pass is logged and the next one tries again."""

from __future__ import annotations

import asyncio
import logging

from server.db.errors import DatabaseUnavailable


class Periodic:
    """Owned by ``Services`` (``start``/``stop``); subclasses define ``run_pass``."""

    name = "periodic"

    def __init__(self, interval_s: float, log: logging.Logger) -> None:
        self.interval_s = interval_s
        self.log = log
        self._task: asyncio.Task | None = None

    async def run_pass(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as err:  # the database is away: the next pass retries
                self.log.warning("%s pass skipped: %s", self.name, err)
            except Exception:  # a bad pass must not end the worker for good
                self.log.exception("%s pass failed; retrying in %.1fs", self.name, self.interval_s)
            await asyncio.sleep(self.interval_s)
