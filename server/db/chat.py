"""SQL of chat: conversations, messages, the inbox.

Every query that serves a caller checks in SQL that the caller is one of the
conversation's two parties; None means "not found" to the handler, whether
the conversation does not exist or belongs to others.

A message's ``seq`` comes from ``conversations.last_seq``, bumped in the
statement that inserts the message: the row lock serialises senders of one
conversation, and the statement commits or fails whole, so seqs have no gaps.
Because they have none, "the latest 50" or "the 500 after since_seq" are seq
ranges read straight from the (conversation_id, seq) index.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from server.db.batching import MergedWrite
from server.db.positions import Committed

MESSAGE_COLUMNS = "id, conversation_id, seq, sender_id, content, created_at, client_msg_id"
_MESSAGE_NAMES = MESSAGE_COLUMNS.split(", ")
_PARTY = "(user_id = $2 OR host_id = $2)"


def read_columns(user: str, alias: str = "") -> str:
    """The read figures of a conversation row (``alias``: the row's alias
    and a dot, if any) as the party ``user`` (an SQL parameter) sees them:
    its own position, the other's, and how many of the other's messages lie
    beyond its own (sql/013_read_positions.sql)."""
    c = alias
    booker = f"{c}user_id = {user}"
    return (f"CASE WHEN {booker} THEN {c}booker_read_seq ELSE {c}host_read_seq END AS read_seq, "
            f"CASE WHEN {booker} THEN {c}host_read_seq ELSE {c}booker_read_seq END AS other_read_seq, "
            f"CASE WHEN {booker} THEN {c}host_sent - {c}booker_read_count "
            f"ELSE {c}booker_sent - {c}host_read_count END AS unread")


CONVERSATION_COLUMNS = f"id, booking_id, user_id, host_id, created_at, last_seq, {read_columns('$2')}"


async def get_conversation(conn: asyncpg.Connection, conversation_id: uuid.UUID, user_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND {_PARTY}",
        conversation_id, user_id,
    )


async def read_up_to(conn: asyncpg.Connection, conversation_id: uuid.UUID, reader: uuid.UUID, seq: int) -> asyncpg.Record | None:
    """Raise the reader's position to ``seq`` (never lower it): a record of
    ``read_seq`` (as it now is), ``moved`` and the conversation's
    ``last_seq``, which a ``seq`` past it leaves unchanged. None for a
    non-party. One round trip; see sql/013_read_positions.sql."""
    return await conn.fetchrow("SELECT read_seq, moved, last_seq FROM chat_read($1, $2, $3)", conversation_id, reader, seq)


# One statement, so one round trip and an atomic bump + insert. With a
# client_msg_id already stored by this sender nothing is bumped or inserted.
# The sender's count of sent messages rises with the seq (unread counts).
_SEND = f"""
WITH bumped AS (
  UPDATE conversations
     SET last_seq = last_seq + 1, last_activity_at = greatest(last_activity_at, now()),
         booker_sent = booker_sent + (user_id = $2)::int, host_sent = host_sent + (host_id = $2)::int
   WHERE id = $1 AND {_PARTY}
     AND ($4::uuid IS NULL OR NOT EXISTS (
           SELECT 1 FROM messages WHERE conversation_id = $1 AND sender_id = $2 AND client_msg_id = $4))
  RETURNING id, last_seq
)
INSERT INTO messages (conversation_id, sender_id, content, seq, client_msg_id)
SELECT id, $2, $3, last_seq, $4 FROM bumped
RETURNING {MESSAGE_COLUMNS}
"""


async def send_message(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, sender_id: uuid.UUID, content: str, client_msg_id: uuid.UUID | None
) -> tuple[asyncpg.Record, bool] | None:
    """Store a message. Returns (message, stored_now): stored_now is False
    when ``client_msg_id`` names a message this sender already stored here.
    None when the sender is not a party (or there is no such conversation)."""
    try:
        row = await conn.fetchrow(_SEND, conversation_id, sender_id, content, client_msg_id)
    except asyncpg.UniqueViolationError:
        # Two sends with one client_msg_id at once: both saw no such message,
        # the second waited on the first's row lock and then hit the unique
        # index. Its statement rolled back whole (no seq spent); the first won.
        row = None
    if row is not None:
        return row, True
    if client_msg_id is not None:
        stored = await conn.fetchrow(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND sender_id = $2 AND client_msg_id = $3",
            conversation_id, sender_id, client_msg_id,
        )
        if stored is not None:
            return stored, False
    return None


_BATCH_COLUMNS = ("m_id", "m_seq", "m_content", "m_created_at", "m_client_msg_id", "stored_now")


def send_locks(conversation_id: uuid.UUID) -> frozenset:
    """What a send locks: its conversation's row. Batches of sends that
    share none run side by side (``Database.write_merged``)."""
    return frozenset([conversation_id])


async def send_many(conn: asyncpg.Connection, calls: list[tuple]) -> Committed:
    """``send_message`` for several calls (each the arguments after ``conn``),
    committed together in one round trip (sql/016): ``Committed`` with each
    call's result in the order of the calls and the WAL position after the
    commit."""
    row = await conn.fetchrow("CALL chat_send_batch($1, $2, $3, $4)", *(list(column) for column in zip(*calls)))
    results: list[tuple[dict, bool] | None] = []
    for (conversation_id, sender_id, _, _), (mid, seq, content, created_at, client_msg_id, stored_now) in zip(
        calls, zip(*(row[name] for name in _BATCH_COLUMNS))
    ):
        if mid is None:
            results.append(None)
            continue
        message = {"id": mid, "conversation_id": conversation_id, "seq": seq, "sender_id": sender_id,
                   "content": content, "created_at": created_at, "client_msg_id": client_msg_id}
        results.append((message, stored_now))
    return Committed(results, row["wal_lsn"])


async def send_committed(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, sender_id: uuid.UUID, content: str, client_msg_id: uuid.UUID | None
) -> Committed:
    """``send_message`` committed by itself, with the WAL position after the
    commit, in one round trip (a batch of one of ``send_many``)."""
    committed = await send_many(conn, [(conversation_id, sender_id, content, client_msg_id)])
    return Committed(committed.value[0], committed.wal_lsn)


# chat.send, merged (``Database.write_merged``). One batch in the database at
# a time: sends that come while it is there go together in the next, so a
# commit and a round trip serve more of them (bookings keep two, since
# theirs wait on locks; docs/benchmarks.md has both measured).
SEND = MergedWrite(send_committed, send_many, running=1)


_SNAPSHOT_MESSAGE = ", ".join(f"m.{c} AS m_{c}" for c in _MESSAGE_NAMES)

# For each join (k_i: its place among the keys) the conversation, and the
# messages in (low, last_seq] as the same snapshot has them: one row a
# message (the conversation's columns repeated), or one row with NULL
# messages columns when there are none; no row for a non-party.
_JOIN_SNAPSHOTS = f"""
WITH k AS (
  SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[], $5::bigint[])
           WITH ORDINALITY AS k(k_conversation, k_user, k_since, k_latest, k_max_missed, k_i)
), c AS (
  SELECT k.k_i, k.k_since, k.k_latest, k.k_max_missed,
         id, booking_id, user_id, host_id, created_at, last_seq, {read_columns('k.k_user')}
    FROM k JOIN conversations ON id = k.k_conversation AND (user_id = k.k_user OR host_id = k.k_user)
)
SELECT c.*, {_SNAPSHOT_MESSAGE}
FROM c LEFT JOIN LATERAL (
  SELECT {MESSAGE_COLUMNS} FROM messages
   WHERE conversation_id = c.id AND seq <= c.last_seq
     AND seq > CASE WHEN c.k_since IS NULL THEN greatest(0, c.last_seq - c.k_latest)
                    ELSE greatest(c.k_since, c.last_seq - c.k_max_missed) END
   ORDER BY seq
) m ON true
ORDER BY c.k_i, m.seq
"""


async def join_snapshots(conn: asyncpg.Connection, keys: list[tuple]) -> dict:
    """What ``chat.join`` reads, for several joins in one statement, so in one
    snapshot. Each key is ``(conversation_id, user_id, since_seq, latest,
    max_missed)``; its value is (conversation, messages oldest first,
    truncated): without ``since_seq`` the ``latest`` messages, else those
    after it, at most ``max_missed`` (the newest; ``truncated`` then). A key
    whose user is not a party has none.

    Every message up to the ``last_seq`` read here is committed (each seq's
    transaction held the row lock until it committed), so the snapshot sees
    all of them; the upper bound keeps out anything newer, which the
    caller's live subscription carries instead."""
    rows = await conn.fetch(_JOIN_SNAPSHOTS, *(list(column) for column in zip(*keys)))
    found: dict = {}
    for r in rows:
        key = keys[r["k_i"] - 1]
        if key not in found:
            since_seq, max_missed = key[2], key[4]
            truncated = since_seq is not None and r["last_seq"] - since_seq > max_missed
            found[key] = (r, [], truncated)
        if r["m_id"] is not None:
            found[key][1].append({c: r[f"m_{c}"] for c in _MESSAGE_NAMES})
    return found


async def conversation_parties(conn: asyncpg.Connection, conversation_ids: list[uuid.UUID]) -> dict:
    """``{id: (id, user_id, host_id)}`` of the conversations among
    ``conversation_ids`` (whoever asks: the caller checks the parties)."""
    rows = await conn.fetch("SELECT id, user_id, host_id FROM conversations WHERE id = ANY($1::uuid[])", conversation_ids)
    return {r["id"]: r for r in rows}


async def history(
    conn: asyncpg.Connection, conversation_id: uuid.UUID, user_id: uuid.UUID, before_seq: int | None, limit: int
) -> list[asyncpg.Record] | None:
    """Up to ``limit`` messages before ``before_seq``, newest first; None
    for a non-party."""
    rows = await conn.fetch(
        f"""SELECT {MESSAGE_COLUMNS} FROM messages
            WHERE conversation_id = $1 AND ($3::bigint IS NULL OR seq < $3)
              AND EXISTS (SELECT 1 FROM conversations WHERE id = $1 AND {_PARTY})
            ORDER BY seq DESC LIMIT $4""",
        conversation_id, user_id, before_seq, limit,
    )
    if not rows and await get_conversation(conn, conversation_id, user_id) is None:
        return None
    return rows


async def messages_after(conn: asyncpg.Connection, conversation_id: uuid.UUID, after_seq: int, limit: int) -> list[asyncpg.Record]:
    """For repairing live delivery; the caller has checked access."""
    return await conn.fetch(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        conversation_id, after_seq, limit,
    )


async def inbox(
    conn: asyncpg.Connection, user_id: uuid.UUID, after: tuple[dt.datetime, uuid.UUID] | None, limit: int
) -> list[asyncpg.Record]:
    """The user's conversations (as booker or host), most recent activity
    first, after the keyset cursor, each with its last message's columns
    prefixed ``m_`` (NULL when there is none), and the user's read figures.
    Each role's index is walked separately and the two short lists merged."""
    where = "AND (last_activity_at, id) < ($2::timestamptz, $3::uuid)" if after else "AND $2::timestamptz IS NULL AND $3::uuid IS NULL"
    return await conn.fetch(
        f"""SELECT c.id, c.booking_id, c.user_id, c.host_id, c.created_at, c.last_seq, c.last_activity_at,
                   {read_columns('$1', 'c.')},
                   m.id AS m_id, m.seq AS m_seq, m.sender_id AS m_sender_id, m.content AS m_content,
                   m.created_at AS m_created_at, m.client_msg_id AS m_client_msg_id
            FROM (
              (SELECT * FROM conversations WHERE user_id = $1 {where}
                ORDER BY last_activity_at DESC, id DESC LIMIT $4)
              UNION ALL
              (SELECT * FROM conversations WHERE host_id = $1 {where}
                ORDER BY last_activity_at DESC, id DESC LIMIT $4)
            ) c
            LEFT JOIN messages m ON m.conversation_id = c.id AND m.seq = c.last_seq
            ORDER BY c.last_activity_at DESC, c.id DESC
            LIMIT $4""",
        user_id, after[0] if after else None, after[1] if after else None, limit,
    )
