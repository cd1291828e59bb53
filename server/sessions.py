"""Ended sessions reach the sockets bound with them, on every process.

A session is a refresh-token family; every access token carries its family.
When one ends (``auth.logout``, or a reused refresh token, which is how a
stolen token shows), the database refuses the family's access tokens from
then on (``handlers.auth.session_user``). Sockets that were bound with one
before are unbound as well: the process that ended the session publishes
(user, family) on one channel that every process follows, and each process
unbinds its sockets of that user bound with that family. Their next call is
``unauthenticated``, and they stop getting the user's events.

Each process also remembers the families it heard of for as long as an
access token lives, and ``Connection.bind`` checks them once the user's
channel is subscribed. That closes the gap of a socket whose session check
passed just before the session ended, and whose binding came just after the
news: one of the two always sees the other, since both run on the loop.

With Redis away the news is lost, like any event: such sockets keep working
until they re-authenticate or their token expires (the database still
refuses new bindings).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.rooms import Hub

CHANNEL = "sessions:ended"


class Sessions:
    """Follows ``CHANNEL`` on the hub like a socket that belongs to nobody."""

    user_id = None  # never skipped by a publish that skips a user
    events_suspended = False  # a hub Follower; it has no token to expire

    def __init__(self, hub: "Hub", remember_s: float) -> None:
        self.hub = hub
        self.remember_s = remember_s
        self._ended: dict[uuid.UUID, float] = {}  # family -> when it may be forgotten, in order

    def start(self) -> None:
        self.hub.follow(self, CHANNEL)

    def stop(self) -> None:
        self.hub.unfollow(self, CHANNEL)

    def ended(self, family: uuid.UUID) -> bool:
        return family in self._ended

    async def end(self, user_id: uuid.UUID, family: uuid.UUID) -> None:
        """Call once the family's revocation has committed. Sockets of this
        process are unbound at once; the others' when the news arrives."""
        self._apply(user_id, family)
        await self.hub.publish(CHANNEL, user_id.bytes + family.bytes)

    def send_event(self, frame: bytes) -> None:
        """The news from any process (this one included)."""
        if len(frame) == 32:
            self._apply(uuid.UUID(bytes=frame[:16]), uuid.UUID(bytes=frame[16:]))

    def _apply(self, user_id: uuid.UUID, family: uuid.UUID) -> None:
        now = asyncio.get_running_loop().time()
        ended = self._ended
        while ended:
            oldest, until = next(iter(ended.items()))
            if until > now:
                break
            del ended[oldest]
        ended.pop(family, None)
        ended[family] = now + self.remember_s
        for follower in self.hub.followers(self.hub.user_channel(user_id)):
            session_ended = getattr(follower, "session_ended", None)
            if session_ended is not None:
                session_ended(family)
