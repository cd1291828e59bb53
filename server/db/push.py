"""SQL of the push hook's outbox (sql/015): writing a push with the change
it reports, claiming due rows for delivery, recording each POST's outcome,
and deleting what is done with.

Claiming is an UPDATE of a ``FOR UPDATE SKIP LOCKED`` selection that moves
``next_at`` a lease ahead: any number of processes deliver side by side, no
two POST one row at once, and no connection is held while a POST waits for
the receiver. The row is deleted once a POST succeeded; a process that dies
before that leaves it to be claimed again when the lease ends.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Collection, Sequence

import asyncpg

from server.db import chat as chat_db

# The user events that are pushed; wallet.updated and user.updated are not
# worth a notification of their own.
PUSHED_USER_EVENTS = ("booking.created", "booking.cancelled", "booking.completed")


async def send_message(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, sender_id: uuid.UUID, content: str,
    client_msg_id: uuid.UUID | None, recipient: uuid.UUID,
) -> tuple[asyncpg.Record, bool] | None:
    """``chat_db.send_message`` for a recipient without a socket: the
    message and its push to ``recipient`` commit together (a replay of a
    stored client_msg_id writes no second push)."""
    async with conn.transaction():
        # The conversation's row lock first, at the strength the send's own
        # UPDATE takes: every other send to this conversation has then
        # committed or waits, so the send below sees any message with this
        # client_msg_id and never meets the unique index, whose violation
        # would abort this transaction.
        await conn.execute("SELECT 1 FROM conversations WHERE id = $1 FOR NO KEY UPDATE", conversation_id)
        stored = await chat_db.send_message(conn, conversation_id, sender_id, content, client_msg_id)
        if stored is not None and stored[1]:
            await conn.execute(
                """INSERT INTO push_outbox (user_id, event, data, created_at)
                   SELECT $1, 'chat.message', jsonb_build_object('message', jsonb_build_object(
                            'id', m.id, 'conversation_id', m.conversation_id, 'seq', m.seq,
                            'sender_id', m.sender_id, 'content', m.content, 'created_at', m.created_at,
                            'client_msg_id', m.client_msg_id)), m.created_at
                   FROM messages m WHERE m.id = $2""",
                recipient, stored[0]["id"],
            )
        return stored


async def mark_published(
    conn: asyncpg.Connection, users: Sequence[uuid.UUID], seqs: Sequence[int], online: Collection[uuid.UUID]
) -> int:
    """Mark user events published and, in the same statement, queue a push
    of each pushed event whose user is not in ``online``. Only events this
    statement marks are pushed, so an event published twice is pushed once.
    Returns how many pushes were queued."""
    status = await conn.execute(
        """WITH marked AS (
             UPDATE user_events e SET published = true FROM unnest($1::uuid[], $2::bigint[]) AS k(u, s)
             WHERE e.user_id = k.u AND e.seq = k.s AND NOT e.published
             RETURNING e.user_id, e.event, e.data, e.created_at)
           INSERT INTO push_outbox (user_id, event, data, created_at)
           SELECT user_id, event, data, created_at FROM marked
           WHERE event = ANY($3::text[]) AND user_id <> ALL($4::uuid[])""",
        users, seqs, list(PUSHED_USER_EVENTS), list(online),
    )
    return int(status.split()[-1])


async def claim_due(conn: asyncpg.Connection, limit: int, lease: dt.timedelta) -> list[asyncpg.Record]:
    """Up to ``limit`` rows due now, oldest due first, each leased to the
    caller for ``lease`` and counted as one more attempt."""
    return await conn.fetch(
        """UPDATE push_outbox p SET attempts = p.attempts + 1, next_at = now() + $2::interval
            FROM (SELECT id FROM push_outbox WHERE failed_at IS NULL AND next_at <= now()
                  ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
            WHERE p.id = due.id
            RETURNING p.id, p.user_id, p.event, p.data, p.created_at, p.attempts""",
        limit, lease,
    )


async def release(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> None:
    """Claimed rows are due again now."""
    await conn.execute("UPDATE push_outbox SET next_at = now() WHERE id = ANY($1::uuid[])", list(ids))


async def settle(
    conn: asyncpg.Connection, delivered: Sequence[uuid.UUID],
    failed: Sequence[tuple[uuid.UUID, float, str]], give_up_after: dt.timedelta,
) -> list[asyncpg.Record]:
    """Delete the delivered rows; reschedule each failed one ``(id, delay
    in seconds, why)``, or mark it failed once it was queued longer ago than
    ``give_up_after``. Returns the failed rows, ``gave_up`` telling which
    of them were given up now."""
    async with conn.transaction():
        if delivered:
            await conn.execute("DELETE FROM push_outbox WHERE id = ANY($1::uuid[])", list(delivered))
        if not failed:
            return []
        ids, delays, errors = zip(*failed)
        return await conn.fetch(
            """UPDATE push_outbox p
               SET next_at = now() + f.delay * interval '1 second', last_error = f.error,
                   failed_at = CASE WHEN now() - p.queued_at >= $4::interval THEN now() END
               FROM unnest($1::uuid[], $2::float8[], $3::text[]) AS f(id, delay, error)
               WHERE p.id = f.id
               RETURNING p.id, p.user_id, p.event, p.attempts, p.last_error, p.failed_at IS NOT NULL AS gave_up""",
            ids, delays, errors, give_up_after,
        )


async def delete_failed(conn: asyncpg.Connection, older_than: dt.timedelta, batch: int) -> int:
    """Deletes up to ``batch`` rows given up longer ago than ``older_than``;
    returns how many."""
    status = await conn.execute(
        """DELETE FROM push_outbox WHERE id = ANY (ARRAY(
             SELECT id FROM push_outbox WHERE failed_at < now() - $1::interval
             LIMIT $2 FOR UPDATE SKIP LOCKED))""",
        older_than, batch,
    )
    return int(status.split()[-1])
