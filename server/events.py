"""Publishing events: encode once, publish after commit, never fail a call."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from pydantic import BaseModel

from server.frames import event_frame

if TYPE_CHECKING:
    from server.services import Services


async def to_users(services: "Services", users: "list[uuid.UUID] | tuple[uuid.UUID, ...]", name: str, payload: BaseModel | dict) -> None:
    """Push an event to every socket of each user, on every process."""
    await to_users_many(services, [(users, name, payload)])


async def to_users_many(
    services: "Services", events: "list[tuple[list[uuid.UUID] | tuple[uuid.UUID, ...], str, BaseModel | dict]]"
) -> None:
    """Push several ``(users, name, payload)`` events, in order, in one
    round trip to Redis (e.g. booking.created to both parties and
    wallet.updated to the booker)."""
    items = []
    for users, name, payload in events:
        frame = event_frame(name, payload)
        items.extend((services.hub.user_channel(user), frame) for user in dict.fromkeys(users))
    if items:
        await services.hub.publish_many(items)


async def to_conversation(
    services: "Services", conversation_id: uuid.UUID, name: str, payload: BaseModel | dict, skip_user: uuid.UUID | None = None
) -> None:
    """Push an event to every socket joined to a conversation, optionally
    skipping the sockets of one user (typing is not echoed to its sender)."""
    await services.hub.publish(services.hub.conversation_channel(conversation_id), event_frame(name, payload), skip_user)
