"""A socket's auth binding: who it is signed in as, with which session, until when.

``AuthBinding`` is also the socket as the hub and the handlers see it
(``server.rpc.Socket``): it follows the bound user's channel and the rooms
the socket joined, and takes their events. It owns the socket's timers: the
token's expiry while bound, the sign-in deadline (``AUTH_DEADLINE_S``) while
not; ``end`` cancels both. It also counts the socket for its user's
presence (server/presence.py) while it is bound and its token has not
expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Callable

from protocol.errors import ErrorCode, RpcError
from server import events
from server.db import events as events_db
from server.deadlines import Deadline
from server.frames import event_frame
from server.rooms.delivered import Delivered

# What a socket fetches after its user's channel is subscribed again: the
# events stored since it was bound (with a margin for clocks), at most the
# newest ``CATCH_UP_MAX`` of the last ``CATCH_UP_WINDOW``.
CATCH_UP_MARGIN = dt.timedelta(seconds=2)
CATCH_UP_WINDOW = dt.timedelta(minutes=10)
CATCH_UP_MAX = 500
from server.services import Services


class _Placeholder:
    """Holds a user's channel subscribed while ``AuthBinding.bind`` waits for
    Redis, so that the socket itself changes only once the wait is over."""

    user_id = None
    events_suspended = False

    def send_event(self, frame: bytes) -> None:
        pass

    def send_numbered(self, seq: int, frame: bytes) -> None:
        pass


class AuthBinding:
    # Slots: a process holds one per socket, tens of thousands of them idle.
    __slots__ = (
        "address", "_services", "_queue_event", "user_id", "token_family", "token_expires_at",
        "events_suspended", "_delivered", "_bound_at", "_expiry_timer", "_deadline_timer", "_on_deadline",
        "_counted_for", "_ended",
    )

    def __init__(self, services: Services, queue_event: Callable[[bytes], None], address: str) -> None:
        self.address = address  # the client's address (server.edge), for per-address limits
        self._services = services
        self._queue_event = queue_event  # the socket's outgoing queue
        self.user_id: uuid.UUID | None = None
        self.token_family: uuid.UUID | None = None
        self.token_expires_at: dt.datetime | None = None
        self.events_suspended = False  # the token expired (``_suspend_events``)
        # The bound user's numbered events given; made with the first one.
        self._delivered: Delivered | None = None
        self._bound_at = dt.datetime.now(dt.timezone.utc)
        # On the process's deadlines: ``auth.expiring``, then the expiry
        # itself, while bound; the sign-in deadline while not.
        self._expiry_timer: Deadline | None = None
        self._deadline_timer: Deadline | None = None
        self._on_deadline: Callable[[], None] | None = None  # set while the socket is served
        self._counted_for: uuid.UUID | None = None  # the user presence counts this socket for
        self._ended = False

    def send_event(self, frame: bytes) -> None:
        """An event for the socket; dropped while the token has expired."""
        if not self.events_suspended:
            self._queue_event(frame)

    def send_numbered(self, seq: int, frame: bytes) -> None:
        """A durable user event: given once per seq, however often published."""
        if self.events_suspended:
            return
        if self._delivered is None:
            self._delivered = Delivered()
        if self._delivered.take(seq):
            self._queue_event(frame)

    def resubscribed(self) -> None:
        """The user's channel is subscribed again after the link to Redis
        was lost: what was published meanwhile is read from PostgreSQL."""
        if self.user_id is not None:
            self._services.spawn(self._catch_up(self.user_id))

    async def _catch_up(self, user_id: uuid.UUID) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        since = max(self._bound_at, now - CATCH_UP_WINDOW) - CATCH_UP_MARGIN
        rows = await self._services.db.read_primary(events_db.created_since, user_id, since, CATCH_UP_MAX)
        for r in rows:
            if self.user_id != user_id:
                return  # re-bound meanwhile
            seq = r["seq"]
            self.send_numbered(seq, event_frame(r["event"], events.stored_payload(r["event"], r["data"], seq), seq))

    def require_auth(self) -> uuid.UUID:
        if self.user_id is None:
            raise RpcError(ErrorCode.UNAUTHENTICATED)
        if self.token_expires_at is not None and dt.datetime.now(dt.timezone.utc) >= self.token_expires_at:
            self._suspend_events()  # if the timer has not fired yet
            raise RpcError(ErrorCode.TOKEN_EXPIRED)
        return self.user_id

    async def bind(self, user_id: uuid.UUID, family: uuid.UUID | None, expires_at: dt.datetime) -> None:
        """Bind (or re-bind) the socket to a user and schedule ``auth.expiring``.

        Returns once the user's channel is subscribed, so that no event about
        the user published after the reply can be missed (unless Redis is
        down, in which case the subscription is made when it is back)."""
        services = self._services
        sessions, hub = services.sessions, services.hub
        if family is not None and sessions.ended(family):
            # The session ended after it was checked, before this: the call
            # fails, and the earlier binding stays as it was.
            raise RpcError(ErrorCode.UNAUTHENTICATED, "session ended")
        if self.user_id != user_id:
            # The new user's channel is subscribed before the socket changes
            # at all, on behalf of a placeholder: if the session ends while
            # Redis confirms, the call fails with the earlier binding (its
            # user, its rooms) as it was. Past the wait nothing awaits, so
            # no news can fall between the last check and the switch.
            channel = hub.user_channel(user_id)
            placeholder = _Placeholder()
            subscribed = hub.follow(placeholder, channel)
            try:
                if subscribed is not None:
                    await asyncio.wait({subscribed}, timeout=services.config.subscribe_wait_s)
                if family is not None and sessions.ended(family):
                    raise RpcError(ErrorCode.UNAUTHENTICATED, "session ended")
                # Another user's events and rooms must never reach this socket.
                hub.unfollow_all(self)
                self._delivered = None
                self._bound_at = dt.datetime.now(dt.timezone.utc)
                hub.follow(self, channel)  # subscribed already (or made when Redis is back)
            finally:
                hub.unfollow(placeholder, channel)
        resumed = self.events_suspended and self.user_id == user_id
        self.events_suspended = False
        if resumed:
            hub.resume(self)
        self.user_id = user_id
        self.token_family = family
        self.token_expires_at = expires_at
        self._count_for(user_id)
        self._cancel_deadline()
        self._cancel_expiry()
        lead_s = services.config.auth_expiring_lead_s
        delay = max(0.0, (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds() - lead_s)
        self._expiry_timer = services.deadlines.call_later(delay, self._warn_expiring)

    def session_ended(self, family: uuid.UUID) -> None:
        """Another socket or process ended this socket's session
        (server/sessions.py): unbound, it has a new sign-in deadline, as
        after ``auth.logout``."""
        if self.token_family == family:
            self.unbind()

    def unbind(self) -> None:
        if self.user_id is not None:
            self._services.hub.unfollow_all(self)
        self.user_id = None
        self.token_family = None
        self.token_expires_at = None
        self.events_suspended = False
        self._count_for(None)
        self._cancel_expiry()
        self._start_deadline()

    def watch_sign_in(self, on_deadline: Callable[[], None]) -> None:
        """From the upgrade on, a socket that is not bound ``AUTH_DEADLINE_S``
        after it (or after it becomes unbound again) gets ``on_deadline``
        (closed with 1008): an anonymous socket may not hold a slot for longer."""
        self._on_deadline = on_deadline
        if self.user_id is None:
            self._start_deadline()

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        if self._on_deadline is not None:
            services = self._services
            self._deadline_timer = services.deadlines.call_later(services.config.auth_deadline_s, self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._deadline_timer is not None:
            self._services.deadlines.cancel(self._deadline_timer)
            self._deadline_timer = None

    def _cancel_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._services.deadlines.cancel(self._expiry_timer)
            self._expiry_timer = None

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if self.user_id is None and self._on_deadline is not None:
            self._on_deadline()

    def end(self) -> None:
        """The socket is going: its timers with it, and its presence."""
        self._count_for(None)
        self._ended = True
        self._on_deadline = None
        self._cancel_deadline()
        self._cancel_expiry()

    # The expiry timer is cancelled whenever the token changes (``bind``,
    # ``unbind``, ``end``): when it runs, it is about the token bound now.

    def _warn_expiring(self) -> None:
        expires_at = self.token_expires_at
        if expires_at is None:
            return
        self.send_event(event_frame("auth.expiring", {"expires_at": expires_at}))
        left = (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        self._expiry_timer = self._services.deadlines.call_later(max(0.0, left), self._expired)

    def _expired(self) -> None:
        if self.token_expires_at is not None:
            self._suspend_events()

    def _suspend_events(self) -> None:
        """The access token has expired. The socket stays bound (its calls
        answer ``token_expired``), but it gets none of the user's events or
        room messages until it authenticates again: a token that leaked must
        not keep a socket listening for longer than the token lives. It keeps
        its subscriptions, so that an ended session still reaches it
        (server/sessions.py) and its rooms resume, missing nothing, once it
        authenticates again as the same user (``Hub.resume``)."""
        if self.user_id is not None:
            self.events_suspended = True
            # A socket that gets none of its user's events does not keep
            # them online: the push hook must reach their phone instead.
            self._count_for(None)

    def _count_for(self, user_id: uuid.UUID | None) -> None:
        """Presence counts this socket for ``user_id`` (None: for no one).
        A socket that has ended counts for no one, whatever a call that was
        still finishing does."""
        if self._ended or self._counted_for == user_id:
            return
        if self._counted_for is not None:
            self._services.presence.release(self._counted_for)
        if user_id is not None:
            self._services.presence.acquire(user_id)
        self._counted_for = user_id
