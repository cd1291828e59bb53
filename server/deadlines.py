"""Many one-shot timers on one loop timer.

Each socket keeps a ping check and, while it is bound, a token expiry (or,
while it is not, a sign-in deadline). A loop timer with its callback costs
some 600 bytes on uvloop, which tens of thousands of idle sockets would
each hold twice; a ``Deadline`` here is a small entry in one heap, and only
the earliest has a loop timer. Times are the loop's clock, as with
``loop.call_at``.

A cancelled deadline drops its callback at once (and with it whatever the
callback holds: a closed socket is not kept), and its entry leaves the heap
when its time comes, or sooner when cancelled entries outnumber the rest.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import Callable

log = logging.getLogger("hangout")

# Entries due within this much of the loop's clock run now: uvloop arms its
# timers in whole milliseconds, so one may wake a little before its time.
CLOCK_SLACK_S = 0.001
COMPACT_MIN = 1024  # cancelled entries kept at least, before the heap is rebuilt without them


class Deadline:
    __slots__ = ("when", "_callback")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self._callback: Callable[[], None] | None = callback

    def __lt__(self, other: "Deadline") -> bool:
        return self.when < other.when


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf  # when ``_timer`` fires
        self._cancelled = 0  # cancelled entries still in the heap

    def call_later(self, delay: float, callback: Callable[[], None]) -> Deadline:
        return self.call_at(asyncio.get_running_loop().time() + delay, callback)

    def call_at(self, when: float, callback: Callable[[], None]) -> Deadline:
        deadline = Deadline(when, callback)
        heapq.heappush(self._heap, deadline)
        if when < self._armed_at:
            self._arm(when)
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        """``deadline``'s callback will not run (if it has not already)."""
        if deadline._callback is None:
            return
        deadline._callback = None
        self._cancelled += 1
        if self._cancelled > COMPACT_MIN and 2 * self._cancelled > len(self._heap):
            self._heap = [d for d in self._heap if d._callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def __len__(self) -> int:
        """Deadlines not run or cancelled yet."""
        return len(self._heap) - self._cancelled

    def close(self) -> None:
        """No deadline runs any more (the process is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed_at = None, math.inf
        self._heap, self._cancelled = [], 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._run)
        self._armed_at = when

    def _run(self) -> None:
        self._timer, self._armed_at = None, math.inf
        now = asyncio.get_running_loop().time() + CLOCK_SLACK_S
        # ``self._heap`` each time: a callback may add deadlines, or cancel
        # enough of them that the heap is rebuilt.
        while self._heap and self._heap[0].when <= now:
            deadline = heapq.heappop(self._heap)
            callback, deadline._callback = deadline._callback, None
            if callback is None:
                self._cancelled -= 1
                continue
            try:
                callback()
            except Exception:
                log.exception("a deadline's callback failed")
        if self._heap and self._heap[0].when < self._armed_at:
            self._arm(self._heap[0].when)
