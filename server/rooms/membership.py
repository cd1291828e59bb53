"""A socket's place in one conversation room.

Live delivery alone cannot promise "no gap, no duplicate" after ``chat.join``:
a message committed just before the join's read can still be in flight from
Redis (duplicate), and one whose publish was lost while Redis was away never
comes at all (gap). So each membership remembers what its socket has been
given, by ``seq``:

- ``done``: every message up to this seq was given (in a join reply, as an
  event, or by a repair from PostgreSQL);
- ``ahead``: seqs above ``done`` given as events (both parties writing at once
  publish out of seq order, so small holes are normal and short-lived).

An event at or below ``done`` or already in ``ahead`` is dropped. A hole that
stays open is filled from PostgreSQL (``server/rooms/repair.py``).

While a ``chat.join`` is reading, events are held back and released after its
reply is queued, through the same filter, so the reply always comes first.
"""

from __future__ import annotations

import uuid

from server.rooms.follower import Follower


class Membership:
    __slots__ = ("follower", "channel", "user_id", "done", "ahead", "held", "holds", "waiting_for")

    def __init__(self, follower: Follower, channel: str, user_id: uuid.UUID) -> None:
        self.follower = follower
        self.channel = channel
        self.user_id = user_id  # who joined; a socket re-bound to someone else gets nothing
        self.done: int | None = None  # None until the first join has read
        self.ahead: set[int] = set()
        self.held: list[tuple[int, bytes]] = []
        self.holds = 0  # joins in progress on this socket for this room
        self.waiting_for: int | None = None  # the seq a scheduled repair waits for

    @property
    def current(self) -> bool:
        """Still bound to the user who joined."""
        return self.follower.user_id == self.user_id

    @property
    def paused(self) -> bool:
        """The socket's token expired: it keeps its position (``done``) and
        is given nothing until it authenticates again."""
        return self.follower.events_suspended

    @property
    def live(self) -> bool:
        """Has a position and is not in the middle of a join."""
        return self.done is not None and self.holds == 0

    def offer(self, seq: int, frame: bytes) -> None:
        """Give the socket an event unless it already has it (``seq`` 0: an
        event outside the message sequence, such as typing)."""
        if self.holds:
            # A join is reading: hold, paused or not (released after its reply).
            self.held.append((seq, frame))
            return
        if self.paused:
            return  # not taken: fetched from PostgreSQL on resume (``Hub.resume``)
        if seq:
            if self.done is None or not self._take(seq):
                return
        self.follower.send_event(frame)

    def _take(self, seq: int) -> bool:
        done = self.done
        assert done is not None
        if seq <= done or seq in self.ahead:
            return False
        if seq == done + 1:
            done = seq
            ahead = self.ahead
            while ahead and done + 1 in ahead:
                done += 1
                ahead.discard(done)
            self.done = done
        else:
            self.ahead.add(seq)
        return True

    # ---- chat.join ---------------------------------------------------------

    def begin_join(self) -> None:
        self.holds += 1

    def end_join(self, last_seq: int | None) -> list[tuple[int, bytes]]:
        """A join finished (``last_seq`` is what its reply covers, None if it
        failed). Returns the held events to release once no join is left."""
        if last_seq is not None:
            done = last_seq if self.done is None else max(self.done, last_seq)
            self.ahead = {s for s in self.ahead if s > done}
            while self.ahead and done + 1 in self.ahead:
                done += 1
                self.ahead.discard(done)
            self.done = done
        self.holds -= 1
        if self.holds:
            return []
        held, self.held = self.held, []
        return held
