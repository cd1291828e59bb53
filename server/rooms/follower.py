"""What the hub delivers to: a socket, or anything that follows a channel
like one (``server/sessions.py``)."""

from __future__ import annotations

import uuid
from typing import Protocol


class Follower(Protocol):
    user_id: uuid.UUID | None
    # The access token expired: the socket keeps its memberships, paused, and
    # gets nothing until it authenticates again (``Hub.resume``).
    events_suspended: bool

    def send_event(self, frame: bytes) -> None: ...

    # Followers of user channels also have ``send_numbered(seq, frame)``: a
    # durable user event, numbered in its user's sequence (server/events.py).

    # Optionally, ``resubscribed()``: called when the follower's channel is
    # subscribed again after the link to Redis was lost, so that a follower
    # that is not a room (``server/sessions.py``) can fetch what it missed.
