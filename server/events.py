"""Publishing events: encode once, publish after commit, never fail a call.

User events (``user.updated``, ``wallet.updated``, ``booking.*``) are
durable: the change's transaction stores each with the next seq of its
user (server/db/events.py), and they reach the user's sockets as
``{"event", "data", "seq"}``. Publishing right after the commit is the fast
path; what it does not publish (Redis down, the process gone) the relay
publishes (server/relay.py). A socket gives each seq once
(server/rooms/delivered.py), so publishing twice is harmless.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel

from protocol.models import EVENTS
from server.frames import event_frame

if TYPE_CHECKING:
    from server.services import Services

# A durable user event: (user, seq, event name, payload).
UserEvent = tuple[uuid.UUID, int, str, BaseModel]


async def to_users_numbered(services: "Services", events: Sequence[UserEvent]) -> None:
    """Publish committed user events, in order, in one round trip to Redis;
    once Redis took them, the relay is told it need not."""
    items = [(services.hub.user_channel(user), seq, event_frame(name, payload, seq))
             for user, seq, name, payload in events]
    if items and await services.hub.publish_numbered(items):
        services.published_events.extend((user, seq) for user, seq, _, _ in events)


def stored_payload(name: str, data: "str | dict[str, Any]", seq: int) -> BaseModel:
    """The payload of a stored event (data as JSON text or already parsed).
    ``user.updated`` carries the user as of the event, whose ``event_seq`` is
    the event's own seq."""
    if isinstance(data, str):
        data = json.loads(data, parse_float=Decimal)
    if name == "user.updated":
        data["user"]["event_seq"] = seq
    return EVENTS[name].model_validate(data)


async def to_stored(services: "Services", stored: Sequence[tuple[uuid.UUID, int, str, Any]]) -> None:
    """Publish stored events ``(user, seq, name, data)`` as read back from
    the database."""
    await to_users_numbered(services, [(user, seq, name, stored_payload(name, data, seq))
                                       for user, seq, name, data in stored])


async def to_conversation(
    services: "Services", conversation_id: uuid.UUID, name: str, payload: BaseModel | dict, skip_user: uuid.UUID | None = None
) -> None:
    """Push an event to every socket joined to a conversation, optionally
    skipping the sockets of one user (typing is not echoed to its sender)."""
    await services.hub.publish(services.hub.conversation_channel(conversation_id), event_frame(name, payload), skip_user)
