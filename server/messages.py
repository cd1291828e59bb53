"""``chat.message`` frames: for a message just sent, and for the messages a
room's live delivery lost, read back from PostgreSQL for the hub's repairs."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from protocol.models import chat as m
from server.db import chat as chat_db
from server.frames import event_frame

if TYPE_CHECKING:
    from server.db.database import Database


def message_frame(message: m.Message) -> bytes:
    return event_frame("chat.message", m.MessageEvent(message=message))


async def conversation_backfill(db: "Database", channel: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
    """A room's messages after ``after_seq`` as event frames, for the hub's
    repairs (``server/rooms/repair.py``). From the primary: the hole is
    already committed there, maybe not yet on a replica."""
    conversation_id = uuid.UUID(channel[2:])
    rows = await db.read_primary(chat_db.messages_after, conversation_id, after_seq, limit)
    return [(r["seq"], message_frame(m.Message.model_validate(dict(r)))) for r in rows]
