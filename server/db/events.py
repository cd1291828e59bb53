"""SQL of durable user events (sql/012): storing them in the transaction of
the change, reading them back for ``events.resume``, marking them published
(and queueing their pushes, sql/015), the relay's claim of what stays
unpublished, and retention."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any, Awaitable, Callable, Collection, Sequence

import asyncpg

from server.db import push as push_db

# An event to store: (user, event name, data as the JSON text of its model).
NewEvent = tuple[uuid.UUID, str, str]


async def add(conn: asyncpg.Connection, events: Sequence[NewEvent]) -> list[int]:
    """Store ``events`` in the caller's transaction, last before its commit
    (the counters are taken last, see sql/012); returns their seqs in order."""
    if not events:
        return []
    users, names, datas = zip(*events)
    return list(await conn.fetchval("SELECT user_events_add($1::uuid[], $2::text[], $3::jsonb[])",
                                    users, names, datas))


async def since_many(conn: asyncpg.Connection, keys: list[tuple[uuid.UUID, int, int]]) -> dict:
    """For each key ``(user_id, since_seq, limit)``: up to ``limit`` of the
    user's stored events after ``since_seq``, oldest first, and the user's
    latest seq, as ``{key: (events, last_seq)}``. One statement, so one
    snapshot and one round trip for the resumes of many sockets at once
    (``Database.read_one_primary``)."""
    rows = await conn.fetch(
        """SELECT k.k_i, coalesce(s.last_seq, 0) AS last_seq, e.seq, e.event, e.data
             FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS k(k_user, k_since, k_limit, k_i)
             LEFT JOIN user_event_seqs s ON s.user_id = k.k_user
             LEFT JOIN LATERAL (SELECT seq, event, data FROM user_events WHERE user_id = k.k_user AND seq > k.k_since
                                 ORDER BY seq LIMIT k.k_limit) e ON true
            ORDER BY k.k_i, e.seq""",
        *(list(column) for column in zip(*keys)),
    )
    found: dict = {}
    for r in rows:
        key = keys[r["k_i"] - 1]
        if key not in found:
            found[key] = ([], r["last_seq"])
        if r["seq"] is not None:
            found[key][0].append(r)
    return found


async def mark_published(
    conn: asyncpg.Connection, keys: Sequence[tuple[uuid.UUID, int]], push_unless_online: Collection[uuid.UUID] | None = None,
) -> int:
    """Some process published these: the relay leaves them alone. With
    ``push_unless_online`` (the push hook is on) the pushed events of users
    not in it are queued for a push by the same statement (server/db/push.py).
    Returns how many pushes were queued."""
    if not keys:
        return 0
    users, seqs = zip(*keys)
    if push_unless_online is not None:
        return await push_db.mark_published(conn, users, seqs, push_unless_online)
    await conn.execute(
        """UPDATE user_events e SET published = true FROM unnest($1::uuid[], $2::bigint[]) AS k(u, s)
           WHERE e.user_id = k.u AND e.seq = k.s AND NOT e.published""",
        users, seqs,
    )
    return 0


async def relay_unpublished(
    conn: asyncpg.Connection, older_than: dt.timedelta, limit: int,
    publish: Callable[[list[asyncpg.Record]], Awaitable[bool]],
    online: Callable[[list[uuid.UUID]], Awaitable[Collection[uuid.UUID] | None]],
) -> int:
    """Claim up to ``limit`` events committed longer ago than ``older_than``
    that nobody is known to have published, ``publish`` them and, if it
    succeeded, mark them published, queueing the pushes of those whose
    users are not ``online`` (None: the push hook is off). Rows another
    process has claimed are skipped, so any number of processes relay side
    by side. Returns how many were published."""
    async with conn.transaction():
        rows = await conn.fetch(
            """SELECT user_id, seq, event, data,
                      EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 AS age_s
               FROM user_events WHERE NOT published AND created_at < now() - $1::interval
               ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED""",
            older_than, limit,
        )
        if not rows or not await publish(rows):
            return 0
        users = [r["user_id"] for r in rows]
        await mark_published(conn, list(zip(users, (r["seq"] for r in rows))), await online(users))
        return len(rows)


async def delete_old(conn: asyncpg.Connection, older_than: dt.timedelta, batch: int) -> int:
    """Deletes up to ``batch`` events stored longer ago than ``older_than``
    (their counters stay); returns how many."""
    status = await conn.execute(
        """DELETE FROM user_events WHERE ctid = ANY (ARRAY(
             SELECT ctid FROM user_events WHERE created_at < now() - $1::interval
             LIMIT $2 FOR UPDATE SKIP LOCKED))""",
        older_than, batch,
    )
    return int(status.split()[-1])


def data_json(data: dict[str, Any]) -> str:
    """An event's data (a model dumped in JSON mode) as stored."""
    return json.dumps(data, separators=(",", ":"))


async def relay_chat(
    conn: asyncpg.Connection, older_than: dt.timedelta, limit: int,
    publish: Callable[[list[asyncpg.Record]], Awaitable[bool]],
) -> int:
    """Publish again the newest message of each conversation last written
    to since the previous pass, up to ``older_than`` ago: a room's members
    that lack it (its sender's process died before publishing) get it, and
    fetch any hole before it from PostgreSQL. One process at a time (the
    others skip the locked mark). Returns how many were published."""
    async with conn.transaction():
        upto = await conn.fetchval("SELECT upto FROM relay_marks WHERE name = 'chat' FOR UPDATE SKIP LOCKED")
        if upto is None:
            return 0
        rows = await conn.fetch(
            """SELECT m.id, m.conversation_id, m.seq, m.sender_id, m.content, m.created_at, m.client_msg_id,
                      c.last_activity_at
               FROM conversations c JOIN messages m ON m.conversation_id = c.id AND m.seq = c.last_seq
               WHERE c.last_activity_at > $1 AND c.last_activity_at <= now() - $2::interval
               ORDER BY c.last_activity_at LIMIT $3""",
            upto, older_than, limit,
        )
        if rows and not await publish(rows):
            return 0
        if len(rows) == limit:
            # Those sharing the last one's time may be on the next page:
            # they are published again next time, which is harmless.
            new_upto = rows[-1]["last_activity_at"] - dt.timedelta(microseconds=1)
            await conn.execute("UPDATE relay_marks SET upto = $1 WHERE name = 'chat'", new_upto)
        else:
            await conn.execute("UPDATE relay_marks SET upto = now() - $1::interval WHERE name = 'chat'", older_than)
        return len(rows)


async def created_since(
    conn: asyncpg.Connection, user_id: uuid.UUID, since: dt.datetime, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` of the user's newest events stored after ``since``,
    oldest first."""
    return await conn.fetch(
        """SELECT seq, event, data FROM (
             SELECT seq, event, data FROM user_events WHERE user_id = $1 AND created_at > $2
             ORDER BY seq DESC LIMIT $3) newest ORDER BY seq""",
        user_id, since, limit,
    )
