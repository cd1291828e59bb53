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
access token lives, and ``AuthBinding.bind`` checks them once the user's
channel is subscribed. That closes the gap of a socket whose session check
passed just before the session ended, and whose binding came just after the
news: one of the two always sees the other, since both run on the loop.

News published while a process is away from Redis (Redis restarting, or
this process's link to it lost) does not reach that process. So when its
subscription to the channel is made again, the process asks the database
which of its sockets' sessions have ended meanwhile, and unbinds those
(``resubscribed``); sockets whose session check or bind is in progress
then are asked about too (``checking``), and until that answer is in,
session checks read the primary (``caught_up``), not a replica that may lag
behind the end. A session that ends after that question is answered is
heard on the channel, which is subscribed again by then. The process that
ends a session, if its publish of the news fails, publishes it again once
Redis takes publishes again (``Hub.publish_kept``); news not yet sent when
the process stops is lost.
With Redis down for good, no process hears anything: such sockets keep
working until they re-authenticate or their token expires (the database
still refuses new bindings). A process that cannot reach PostgreSQL for
its catch-up keeps trying, with a growing pause.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from server.rooms import Hub

CHANNEL = "sessions:ended"
CATCH_UP_RETRY_S = 1.0  # then doubling, up to CATCH_UP_RETRY_MAX_S
CATCH_UP_RETRY_MAX_S = 30.0

log = logging.getLogger("hangout.sessions")

# The (user, family) of this process's bound sockets, and of those families
# the ones that have ended (``server/db/auth.py: revoked_among``).
Bound = Callable[[], Iterable[tuple[uuid.UUID, uuid.UUID]]]
Revoked = Callable[[list[uuid.UUID]], Awaitable[Sequence[Sequence[uuid.UUID]]]]


class Sessions:
    """Follows ``CHANNEL`` on the hub like a socket that belongs to nobody."""

    user_id = None  # never skipped by a publish that skips a user
    events_suspended = False  # a hub Follower; it has no token to expire

    def __init__(self, hub: "Hub", remember_s: float) -> None:
        self.hub = hub
        self.remember_s = remember_s
        self._ended: dict[uuid.UUID, float] = {}  # family -> when it may be forgotten, in order
        self._bound: Bound | None = None
        self._revoked: Revoked | None = None
        # (user, family) of session checks in progress, with the bind after them
        self._checking: collections.Counter[tuple[uuid.UUID, uuid.UUID]] = collections.Counter()
        self._catch_up: asyncio.Task | None = None
        self._again = False
        self.caught_up = asyncio.Event()  # set when no catch-up is running or due (tests)
        self.caught_up.set()

    def check_with(self, bound: Bound, revoked: Revoked) -> None:
        """Where ``resubscribed`` finds the sockets' sessions and asks which ended."""
        self._bound, self._revoked = bound, revoked

    def start(self) -> None:
        self.hub.follow(self, CHANNEL)

    async def stop(self) -> None:
        self.hub.unfollow(self, CHANNEL)
        task, self._catch_up = self._catch_up, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.caught_up.set()

    @contextlib.contextmanager
    def checking(self, user_id: uuid.UUID, family: uuid.UUID | None) -> Iterator[None]:
        """Around a session check and the bind that follows it: a catch-up
        that runs meanwhile checks this session too, since the socket is not
        among the bound ones yet and the check may have come before the end."""
        if family is None:
            yield
            return
        key = (user_id, family)
        self._checking[key] += 1
        try:
            yield
        finally:
            self._checking[key] -= 1
            if not self._checking[key]:
                del self._checking[key]

    def resubscribed(self) -> None:
        """The channel is subscribed again after the link to Redis was lost:
        news sent meanwhile was missed, so ask the database instead."""
        if self._revoked is None:
            return
        self.caught_up.clear()
        if self._catch_up is not None and not self._catch_up.done():
            self._again = True  # it may have asked before this loss
            return
        self._catch_up = asyncio.get_running_loop().create_task(self._run_catch_up(), name="sessions-catch-up")

    async def _run_catch_up(self) -> None:
        assert self._bound is not None and self._revoked is not None
        failures, pause = 0, CATCH_UP_RETRY_S
        try:
            while True:
                self._again = False
                try:
                    sessions = dict((family, user) for user, family in (*self._bound(), *self._checking))
                    ended = await self._revoked(list(sessions)) if sessions else []
                    for user_id, family in ended:
                        self._apply(user_id, family)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Until it works: an ended session must not keep its sockets.
                    failures += 1
                    if failures == 1 or failures % 10 == 0:
                        log.warning("checking the sessions of this process's sockets after Redis was away failed "
                                    "(%d times; last: %r): retrying", failures, exc, exc_info=failures == 1)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, CATCH_UP_RETRY_MAX_S)
                    self._again = True
                else:
                    if ended:
                        log.info("%d sessions ended while Redis was away: their sockets are unbound", len(ended))
                if not self._again:
                    return
        finally:
            if self._catch_up is asyncio.current_task():
                self._catch_up = None
                self.caught_up.set()

    def ended(self, family: uuid.UUID) -> bool:
        return family in self._ended

    async def end(self, user_id: uuid.UUID, family: uuid.UUID) -> None:
        """Call once the family's revocation has committed. Sockets of this
        process are unbound at once; the others' when the news arrives."""
        self._apply(user_id, family)
        # The other processes may still be listening, and would never know
        # if this publish failed: it is sent again (``Hub.publish_kept``).
        await self.hub.publish_kept(CHANNEL, user_id.bytes + family.bytes)

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
