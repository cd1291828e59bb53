"""SQL of presence: users' ``last_seen_at`` and the conversations a change
of presence is announced to."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

# A change is written only over an older one (``presence_changed_at``): two
# processes may write changes of one user in either order. Rows are locked
# in id order, as other writers of several users rows lock them.
_RECORD = """
WITH c AS (
  SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS c(id, last_seen_at, changed_at)
), locked AS (
  SELECT u.id FROM users u JOIN c ON c.id = u.id
   WHERE u.presence_changed_at IS NULL OR u.presence_changed_at < c.changed_at
   ORDER BY u.id FOR NO KEY UPDATE OF u
)
UPDATE users u SET last_seen_at = c.last_seen_at, presence_changed_at = c.changed_at
  FROM c
 WHERE u.id = c.id AND u.id IN (SELECT id FROM locked)
   AND (u.presence_changed_at IS NULL OR u.presence_changed_at < c.changed_at)
"""


async def record_changes(conn: asyncpg.Connection,
                         changes: list[tuple[uuid.UUID, dt.datetime | None, dt.datetime]]) -> None:
    """Store ``(user, last_seen_at, changed_at)`` of each change (one per user)."""
    if changes:
        ids, seen, changed = zip(*changes)
        await conn.execute(_RECORD, list(ids), list(seen), list(changed))


async def conversations_of(conn: asyncpg.Connection, user_ids: list[uuid.UUID]) -> list[asyncpg.Record]:
    """``(id, user_id, host_id)`` of every conversation of these users."""
    return await conn.fetch(
        """SELECT id, user_id, host_id FROM conversations WHERE user_id = ANY($1::uuid[])
           UNION
           SELECT id, user_id, host_id FROM conversations WHERE host_id = ANY($1::uuid[])""",
        user_ids,
    )


async def last_seen(conn: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    """``(last_seen_at, presence_changed_at)`` of a user."""
    return await conn.fetchrow("SELECT last_seen_at, presence_changed_at FROM users WHERE id = $1", user_id)
