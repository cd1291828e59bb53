"""SQL of users' KYC status: the webhook's events, applied once each, and the
operator's direct change."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from server.db.users import USER_COLUMNS, add_user_updated

# What apply_event did.
UNKNOWN_USER, ALREADY_APPLIED, UNCHANGED, CHANGED = "unknown_user", "already_applied", "unchanged", "changed"


async def _set(conn: asyncpg.Connection, user_id: uuid.UUID, status: str) -> dict | None:
    """The user after the change, with its ``user.updated`` stored, or None
    when they already had ``status``. In the caller's transaction."""
    row = await conn.fetchrow(
        f"""UPDATE users SET kyc_status = $2, updated_at = now()
            WHERE id = $1 AND kyc_status <> $2 RETURNING {USER_COLUMNS}""",
        user_id, status,
    )
    return await add_user_updated(conn, row) if row is not None else None


async def apply_event(conn: asyncpg.Connection, event_id: str, user_id: uuid.UUID, status: str) -> tuple[str, asyncpg.Record | None]:
    """Apply the provider's event ``event_id`` unless it was applied before.
    Returns (outcome, the user as they are now; None for an unknown user).

    The event id is recorded in the transaction that changes the status, so
    the two commit together. Of two deliveries of one event at once, the
    second one's insert waits for the first to commit and then finds its id."""
    async with conn.transaction():
        user = await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE", user_id)
        if user is None:
            return UNKNOWN_USER, None
        new = await conn.fetchval(
            """INSERT INTO kyc_events (event_id, user_id, status) VALUES ($1, $2, $3)
               ON CONFLICT (event_id) DO NOTHING RETURNING true""",
            event_id, user_id, status,
        )
        if not new:
            return ALREADY_APPLIED, user
        changed = await _set(conn, user_id, status)
        return (CHANGED, changed) if changed is not None else (UNCHANGED, user)


async def set_status(conn: asyncpg.Connection, user_id: uuid.UUID, status: str) -> tuple[asyncpg.Record | None, bool]:
    """The operator's change, with no event id. Returns (user, changed);
    (None, False) for an unknown user."""
    async with conn.transaction():
        changed = await _set(conn, user_id, status)
        if changed is not None:
            return changed, True
        return await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id), False


async def delete_old_events(conn: asyncpg.Connection, older_than: dt.timedelta, batch: int) -> int:
    """Deletes up to ``batch`` event ids applied longer ago than ``older_than``;
    returns how many. Rows another process is deleting are skipped."""
    status = await conn.execute(
        """DELETE FROM kyc_events WHERE event_id IN (
             SELECT event_id FROM kyc_events WHERE applied_at < now() - $1::interval
             LIMIT $2 FOR UPDATE SKIP LOCKED)""",
        older_than, batch,
    )
    return int(status.split()[-1])
