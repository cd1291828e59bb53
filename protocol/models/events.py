"""events.resume: a user's durable events after a seq.

User events (``user.updated``, ``wallet.updated``, ``booking.created``,
``booking.cancelled``, ``booking.completed``) are numbered per user, 1, 2, 3
… without gaps, and reach the user's sockets as ``{"event", "data", "seq"}``
(their payload models are in the service modules).

Decisions where the contract is silent:
- Live user events flow from authentication on, each seq at most once per
  socket. Subscribe by authenticating, then call ``events.resume`` with the
  last seq the app holds; de-duplicate by ``seq`` the events that come both
  in the result and live.
- ``since_seq`` above the user's ``last_seq`` (the app holds numbers the
  server never gave, e.g. from another server's data) answers no events and
  ``truncated: true``: the app re-reads its state.
- A ``user.updated``'s user has ``event_seq`` equal to that event's seq.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from protocol.methods import MethodSpec
from protocol.models.common import Params, Result

RESUME_MAX = 500  # events per events.resume

# The events numbered per user (they carry ``seq`` and events.resume returns
# them); every other event is live only.
USER_EVENTS = frozenset({"user.updated", "wallet.updated", "booking.created", "booking.cancelled", "booking.completed"})

Seq = Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]


class ResumeParams(Params):
    since_seq: Seq


class StoredEvent(Result):
    event: str
    data: dict[str, Any]  # the event's payload, as live
    seq: int


class ResumeResult(Result):
    events: list[StoredEvent]  # oldest first
    last_seq: int
    has_more: bool
    truncated: bool


METHODS = (MethodSpec("events.resume", ResumeParams, ResumeResult),)
EVENTS: dict[str, type] = {}
