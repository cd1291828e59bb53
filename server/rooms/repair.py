"""Filling a room's holes from PostgreSQL.

Live delivery can lose messages: Redis away, or a publish that failed after
its commit. A room is repaired through ``backfill`` when its subscription
is made again (``Hub.mark_stale`` and reconnects), when a paused socket
resumes, and when a seq hole of one of its members stays open for
``GAP_GRACE_S`` (both parties writing at once publish out of seq order, so
short-lived holes are normal).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from server.rooms.membership import Membership

log = logging.getLogger("hangout.rooms")

GAP_GRACE_S = 1.0  # a seq hole open this long is filled from PostgreSQL
REPAIR_PAGE = 200
REPAIR_RETRY_S = 1.0
REPAIR_ATTEMPTS = 11

# (channel, after_seq, limit) -> [(seq, encoded chat.message frame)] in seq order
Backfill = Callable[[str, int, int], Awaitable[list[tuple[int, bytes]]]]


class Repairs:
    """At most one repair per room at a time, due (a timer) or running (a task)."""

    def __init__(self, backfill: Backfill, members: Callable[[str], list[Membership]]) -> None:
        self.backfill = backfill
        self._members = members  # a room's members that can be given messages now
        self._due: dict[str, asyncio.TimerHandle | asyncio.Task] = {}
        self._again: set[str] = set()

    def watch_gap(self, member: Membership) -> None:
        """A hole below ``member.ahead``: give the missing publish a moment,
        then fetch whatever is still missing."""
        if member.ahead and member.waiting_for is None and member.done is not None:
            member.waiting_for = member.done + 1
            if member.channel not in self._due:
                self.schedule(member.channel, GAP_GRACE_S)

    def schedule(self, channel: str, delay: float) -> None:
        pending = self._due.get(channel)
        if pending is not None:
            if delay > 0:
                return  # a repair is due anyway
            if isinstance(pending, asyncio.Task):
                # It may have read before the subscription was confirmed:
                # read once more after it.
                self._again.add(channel)
                return
            pending.cancel()  # a later repair (or retry) becomes an immediate one
            del self._due[channel]
        loop = asyncio.get_running_loop()
        if delay > 0:
            self._due[channel] = loop.call_later(delay, self._gap_due, channel)
        else:
            self._due[channel] = loop.create_task(self._repair(channel), name=f"rooms-repair-{channel}")

    def cancel(self, channel: str) -> None:
        self._again.discard(channel)
        pending = self._due.pop(channel, None)
        if pending is not None:
            pending.cancel()

    async def stop(self) -> None:
        running = [p for p in self._due.values() if isinstance(p, asyncio.Task)]
        for channel in list(self._due):
            self.cancel(channel)
        await asyncio.gather(*running, return_exceptions=True)

    def _gap_due(self, channel: str) -> None:
        self._due.pop(channel, None)
        members = self._members(channel)
        missing = False
        for m in members:
            if m.waiting_for is not None and m.done is not None and m.done < m.waiting_for:
                missing = True
            m.waiting_for = None
        if missing:
            self.schedule(channel, 0)
        else:
            for m in members:  # holes that opened after the first one
                self.watch_gap(m)

    async def _repair(self, channel: str, attempt: int = 0) -> None:
        try:
            last_low = None
            while True:
                members = self._members(channel)
                if not members:
                    return
                low = min(m.done for m in members)  # type: ignore[type-var]
                if low == last_low:
                    return
                last_low = low
                batch = await self.backfill(channel, low, REPAIR_PAGE)  # type: ignore[arg-type]
                given = 0
                for seq, frame in batch:
                    for m in self._members(channel):
                        before = (m.done, len(m.ahead))
                        m.offer(seq, frame)
                        if (m.done, len(m.ahead)) != before:
                            given += 1
                if given:
                    log.info("repaired %s: %d messages given from PostgreSQL", channel, given)
                if len(batch) < REPAIR_PAGE:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("repair of %s failed (attempt %d): %r", channel, attempt + 1, exc)
            if attempt + 1 < REPAIR_ATTEMPTS:
                self._due.pop(channel, None)
                self._due[channel] = asyncio.get_running_loop().call_later(
                    REPAIR_RETRY_S, self._retry, channel, attempt + 1
                )
                return
        finally:
            if self._due.get(channel) is asyncio.current_task():
                del self._due[channel]
                if channel in self._again:
                    self._again.discard(channel)
                    self.schedule(channel, 0)
                else:
                    # Holes that opened while we were reading are watched afresh.
                    for m in self._members(channel):
                        m.waiting_for = None
                        self.watch_gap(m)

    def _retry(self, channel: str, attempt: int) -> None:
        # Still followed: ``cancel`` (on the room's last unfollow) cancels the timer.
        self._due[channel] = asyncio.get_running_loop().create_task(
            self._repair(channel, attempt), name=f"rooms-repair-{channel}"
        )
