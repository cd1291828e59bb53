"""Work done every interval for as long as the process runs: the settlement,
the cleanup and the health loops. A failed pass is logged and the next one
tries again; the task is owned here, and ``stop`` cancels and awaits it."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Awaitable, Callable, Iterator

from server.db.errors import DatabaseUnavailable

# The loops started and not stopped, for the metrics (how long since each
# last finished a pass is how far settlement or the relay lags).
_RUNNING: "weakref.WeakSet[Periodic]" = weakref.WeakSet()


def running() -> Iterator["Periodic"]:
    return iter(list(_RUNNING))


def raise_if_cancelled() -> None:
    """Raise the cancel that the awaited work swallowed: redis-py's script
    calls can return normally from a cancelled task, and a loop that went on
    would leave whoever cancelled it waiting forever (at shutdown)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Periodic:
    def __init__(self, name: str, work: Callable[[], Awaitable[None]], interval_s: float,
                 log: logging.Logger | None = None) -> None:
        self.name = name
        self.work = work
        self.interval_s = interval_s
        self.log = log or logging.getLogger("hangout")
        self._task: asyncio.Task | None = None
        self.passes = 0  # finished without error
        self.last_pass: float | None = None  # time.monotonic() when the last of them ended
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Make the next pass now rather than at the end of the interval
        (work known to be waiting); a pass under way is followed by another."""
        self._woken.set()

    async def start(self, *, first_pass_now: bool = False) -> None:
        """Start the loop. With ``first_pass_now`` one pass is made before
        this returns (a failure of it is the caller's); else the first pass
        is the loop's own, at once."""
        _RUNNING.add(self)
        if first_pass_now:
            await self._pass()
        self._task = asyncio.create_task(self._run(wait_first=first_pass_now), name=self.name)

    async def stop(self) -> None:
        _RUNNING.discard(self)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self, wait_first: bool) -> None:
        if wait_first:
            await self._pause()
        while True:
            self._woken.clear()
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as err:  # the database is away: the next pass retries
                self.log.warning("%s pass skipped: %s", self.name, err)
            except Exception:  # a bad pass must not end the loop for good
                self.log.exception("%s pass failed; retrying in %.1fs", self.name, self.interval_s)
            raise_if_cancelled()
            await self._pause()

    async def _pause(self) -> None:
        try:
            await asyncio.wait_for(self._woken.wait(), self.interval_s)
        except TimeoutError:
            pass

    async def _pass(self) -> None:
        await self.work()
        self.passes += 1
        self.last_pass = time.monotonic()


class PeriodicWorker:
    """A worker owned by ``Services`` whose work is one ``Periodic``
    (``self._loop``, set by the subclass)."""

    _loop: Periodic

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
