"""SQL of bookings: create (one call of booking_create, sql/006), cancel,
reads, and settlement.

Lock order, the same everywhere a booking's money moves, so that none of
these transactions can deadlock with another: the booking row, then wallet
rows (users) in id order, then booking_busy rows (written by the database
itself, from the write to the booking: sql/008). bookings.create has no
booking row yet: it starts at the booker's wallet, then takes a lock per
person and hour of the booking for both parties, which keeps two bookings
that could overlap from running side by side (sql/009).
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from server.db import events as events_db
from server.db.batching import MergedWrite
from server.db.positions import Committed
from server.db.wallet import BALANCE_MAX

BOOKING_COLUMNS = (
    "b.id, b.user_id, b.host_id, b.start_at, b.end_at, b.status, b.amount, b.created_at, b.updated_at"
)
# A failed booking has no conversation; the join keeps it.
BOOKING_SELECT = f"""SELECT {BOOKING_COLUMNS}, c.id AS conversation_id
    FROM bookings b LEFT JOIN conversations c ON c.booking_id = b.id"""

# The index behind "no two active bookings of a host start together"; the
# exclusion constraint on booking_busy catches every other overlap.
_ACTIVE_START_INDEX = "uq_bookings_host_start_active"


async def create(
    conn: asyncpg.Connection,
    booker: uuid.UUID,
    host: uuid.UUID,
    start_at: dt.datetime,
    end_at: dt.datetime,
    key: str,
    request_hash: bytes,
) -> Committed | dict[str, Any]:
    """Returns the booking columns plus ``outcome``, the booker's
    ``balance`` (see sql/006 for the outcomes) and, for a booking made now,
    the seqs of the ``booking.created`` stored for the booker
    (``booker_seq``; its ``wallet.updated`` is the next) and the host
    (``host_seq``, sql/012), or ``{"outcome":
    "slot_unavailable"}`` when the host or the booker is busy then. Commits
    by itself (sql/007), so ``conn`` must not be in a transaction; a result
    that wrote comes as ``Committed`` with the WAL position after it.

    A start that has passed can only be a retry (the params model leaves
    "start in the future" to here, so that a retry sent after the start
    still gets its original outcome): it answers from the key alone, or
    ``{"outcome": "start_passed"}``. A start in the future goes straight on."""
    if start_at <= dt.datetime.now(dt.timezone.utc):
        row = await conn.fetchrow("SELECT * FROM booking_replay($1, $2, $3)", key, booker, request_hash)
        return dict(row) if row is not None else {"outcome": "start_passed"}
    try:
        row = await conn.fetchrow(
            "CALL booking_create_committed($1, $2, $3, $4, $5, $6)",
            booker, host, start_at, end_at, key, request_hash,
        )
    except asyncpg.exceptions.ExclusionViolationError:
        return {"outcome": "slot_unavailable"}
    except asyncpg.exceptions.UniqueViolationError as exc:
        if exc.constraint_name != _ACTIVE_START_INDEX:
            raise
        return {"outcome": "slot_unavailable"}
    result = dict(row)
    return Committed(result, result.pop("wal_lsn"))


def create_locks(booker: uuid.UUID, host: uuid.UUID, start_at: dt.datetime, end_at: dt.datetime) -> frozenset:
    """What ``create`` locks (sql/009): the booker's wallet, and each hour
    of the booking for both parties. Calls that share none of these can run
    in batches side by side (``Database.write_merged``)."""
    first, last = int(start_at.timestamp()) // 3600, -(-int(end_at.timestamp()) // 3600)
    return frozenset([booker, *((who, hour) for who in (booker, host) for hour in range(first, last))])


_BATCH_COLUMNS = ("outcome", "id", "user_id", "host_id", "start_at", "end_at", "status", "amount",
                  "created_at", "updated_at", "conversation_id", "balance", "booker_seq", "host_seq")


async def create_many(conn: asyncpg.Connection, calls: list[tuple]) -> Committed:
    """``create`` for several calls (each the arguments of ``create`` after
    ``conn``) in one transaction (sql/009): ``Committed`` with the results in
    the order of the calls and the WAL position after the commit. A call
    whose start has passed is answered by ``create`` on the same connection,
    before the others are made."""
    now = dt.datetime.now(dt.timezone.utc)
    results: list[Any] = [None] * len(calls)
    made = []
    for i, c in enumerate(calls):
        if c[2] > now:
            made.append(i)
        else:
            results[i] = await create(conn, *c)  # a replay at most: it writes nothing
    if not made:
        return Committed(results, None)
    row = await conn.fetchrow(
        "CALL booking_create_batch($1, $2, $3, $4, $5, $6)",
        *([calls[i][k] for i in made] for k in range(6)),
    )
    # One array per column, one element per call made, in their order.
    for i, values in zip(made, zip(*(row[name] for name in _BATCH_COLUMNS))):
        results[i] = dict(zip(_BATCH_COLUMNS, values))
    return Committed(results, row["wal_lsn"])


# bookings.create, merged (``Database.write_merged``); two batches at once,
# since a batch waits on its bookers' and hosts' locks.
CREATE = MergedWrite(create, create_many)


async def get_for(conn: asyncpg.Connection, booking_id: uuid.UUID, party: uuid.UUID) -> asyncpg.Record | None:
    """The booking if ``party`` is its booker or host; None otherwise."""
    return await conn.fetchrow(
        f"{BOOKING_SELECT} WHERE b.id = $1 AND (b.user_id = $2 OR b.host_id = $2)", booking_id, party
    )


def booking_data(row: Any) -> dict[str, Any]:
    """A booking as its events store it (protocol/models/bookings.py Booking)."""
    return {"booking": {
        "id": str(row["id"]), "user_id": str(row["user_id"]), "host_id": str(row["host_id"]),
        "start_at": row["start_at"].isoformat(), "end_at": row["end_at"].isoformat(), "status": row["status"],
        "amount": f"{row['amount']:.2f}", "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
        "conversation_id": None if row["conversation_id"] is None else str(row["conversation_id"]),
    }}


async def _store_events(conn: asyncpg.Connection, events: list[tuple[uuid.UUID, str, dict[str, Any]]]) -> list[tuple]:
    """Store ``(user, name, data)`` events; returns them as stored:
    ``(user, seq, name, data)``."""
    seqs = await events_db.add(conn, [(user, name, events_db.data_json(data)) for user, name, data in events])
    return [(user, seq, name, data) for (user, name, data), seq in zip(events, seqs)]


async def cancel(
    conn: asyncpg.Connection, booking_id: uuid.UUID, party: uuid.UUID
) -> tuple[str, asyncpg.Record | None, Decimal | None, list[tuple]]:
    """Cancel a confirmed booking before its start and refund the booker.

    Returns (outcome, booking, booker balance, the events stored as
    ``(user, seq, name, data)``); outcome is ``cancelled``,
    ``unchanged`` (it already was), ``invalid_state``, ``not_found`` or
    ``balance_limit`` (the refund would take the booker's balance over
    ``BALANCE_MAX``; nothing changed), which is ``refund_blocked`` when
    ``party`` is the host: the booker's balance is not the host's to know."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """SELECT user_id, amount, status, start_at > now() AS before_start FROM bookings
               WHERE id = $1 AND (user_id = $2 OR host_id = $2) FOR UPDATE""",
            booking_id, party,
        )
        if row is None:
            return "not_found", None, None, []
        if row["status"] == "cancelled":
            return "unchanged", await get_for(conn, booking_id, party), None, []
        if row["status"] != "confirmed" or not row["before_start"]:
            return "invalid_state", None, None, []
        booker = row["user_id"]
        refund_fits = await conn.fetchval(
            "SELECT balance + $2 <= $3 FROM users WHERE id = $1 FOR NO KEY UPDATE", booker, row["amount"], BALANCE_MAX
        )
        if not refund_fits:
            return ("balance_limit" if party == booker else "refund_blocked"), None, None, []
        await conn.execute(
            "UPDATE bookings SET status = 'cancelled', updated_at = now() WHERE id = $1", booking_id
        )
        # The refund's key is unique per booking: refunded at most once, whatever happens above.
        await conn.execute(
            """INSERT INTO payments (booking_id, user_id, amount, type, status, idempotency_key)
               SELECT id, user_id, amount, 'refund', 'completed', 'refund:' || id FROM bookings WHERE id = $1""",
            booking_id,
        )
        await conn.execute(
            """INSERT INTO transactions (user_id, amount, type, reference_id)
               SELECT user_id, amount, 'booking_refund', id FROM bookings WHERE id = $1""",
            booking_id,
        )
        balance = await conn.fetchval(
            """UPDATE users u SET balance = u.balance + b.amount FROM bookings b
               WHERE b.id = $1 AND u.id = b.user_id RETURNING u.balance""",
            booking_id,
        )
        booking = await get_for(conn, booking_id, party)
        data = booking_data(booking)
        stored = await _store_events(conn, [
            (booker, "booking.cancelled", data), (booking["host_id"], "booking.cancelled", data),
            (booker, "wallet.updated", {"balance": f"{balance:.2f}"}),
        ])
        return "cancelled", booking, balance, stored


async def list_for(
    conn: asyncpg.Connection,
    party: uuid.UUID,
    role: str,
    status: str | None,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """The party's bookings, newest start first, after the keyset cursor.

    Each role is one walk of its (user, start_at desc, id desc) index; "any"
    merges both walks (a booking never has the same user on both sides)."""
    args: list[Any] = [party, limit]
    filters = ""
    if status is not None:
        args.append(status)
        filters += f" AND b.status = ${len(args)}"
    if after is not None:
        args.extend(after)
        filters += f" AND (b.start_at, b.id) < (${len(args) - 1}, ${len(args)})"

    def walk(column: str) -> str:
        return f"""(SELECT {BOOKING_COLUMNS} FROM bookings b WHERE b.{column} = $1{filters}
                    ORDER BY b.start_at DESC, b.id DESC LIMIT $2)"""

    walks = {"booker": [walk("user_id")], "host": [walk("host_id")]}.get(role, [walk("user_id"), walk("host_id")])
    return await conn.fetch(
        f"""SELECT b.*, c.id AS conversation_id FROM ({" UNION ALL ".join(walks)}) b
            LEFT JOIN conversations c ON c.booking_id = b.id
            ORDER BY b.start_at DESC, b.id DESC LIMIT $2""",
        *args,
    )


async def settle_due(
    conn: asyncpg.Connection, batch: int
) -> tuple[list[asyncpg.Record], list[tuple], int]:
    """Complete up to ``batch`` confirmed bookings whose end has passed and
    pay their hosts. Returns (completed bookings, the events stored as
    ``(user, seq, name, data)``: booking.completed to both parties, then
    wallet.updated to each host paid, how many due bookings this call
    locked: fewer than ``batch`` means none were left for it).

    SKIP LOCKED lets any number of processes settle side by side, each
    booking by exactly one; the payout key, unique per booking, makes a
    second payout impossible even so.

    A payout is only made into a wallet that can hold it (``BALANCE_MAX``):
    a booking whose payout cannot be stored is passed over and stays
    confirmed, due again once its host's balance allows (``unpayable_due``
    lists such bookings), and never holds up the others."""
    async with conn.transaction():
        # The balance here may be behind; the wallets locked below decide.
        due = await conn.fetch(
            """SELECT b.id, b.host_id, b.amount FROM bookings b JOIN users h ON h.id = b.host_id
               WHERE b.status = 'confirmed' AND b.end_at <= now() AND h.balance + b.amount <= $2
               ORDER BY b.end_at LIMIT $1 FOR UPDATE OF b SKIP LOCKED""",
            batch, BALANCE_MAX,
        )
        if not due:
            return [], [], 0
        wallets = await conn.fetch(
            "SELECT id, balance FROM users WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE",
            sorted({r["host_id"] for r in due}),
        )
        # Payouts to one host that fit one by one may not fit together: pay
        # them oldest end first while they fit; the rest stay confirmed.
        room = {w["id"]: BALANCE_MAX - w["balance"] for w in wallets}
        ids = []
        for r in due:
            if r["amount"] <= room[r["host_id"]]:
                room[r["host_id"]] -= r["amount"]
                ids.append(r["id"])
        if not ids:
            return [], [], len(due)
        await conn.execute(
            "UPDATE bookings SET status = 'completed', updated_at = now() WHERE id = ANY($1::uuid[])", ids
        )
        await conn.execute(
            """INSERT INTO payments (booking_id, user_id, amount, type, status, idempotency_key)
               SELECT id, host_id, amount, 'payout', 'completed', 'payout:' || id
               FROM bookings WHERE id = ANY($1::uuid[])""",
            ids,
        )
        await conn.execute(
            """INSERT INTO transactions (user_id, amount, type, reference_id)
               SELECT host_id, amount, 'booking_payout', id FROM bookings WHERE id = ANY($1::uuid[])""",
            ids,
        )
        balances = await conn.fetch(
            """UPDATE users u SET balance = u.balance + paid.total
               FROM (SELECT host_id, sum(amount) AS total FROM bookings
                     WHERE id = ANY($1::uuid[]) GROUP BY host_id) paid
               WHERE u.id = paid.host_id RETURNING u.id, u.balance""",
            ids,
        )
        completed = await conn.fetch(f"{BOOKING_SELECT} WHERE b.id = ANY($1::uuid[]) ORDER BY b.end_at", ids)
        events: list[tuple[uuid.UUID, str, dict[str, Any]]] = []
        for r in completed:
            data = booking_data(r)
            events += [(r["user_id"], "booking.completed", data), (r["host_id"], "booking.completed", data)]
        events += [(r["id"], "wallet.updated", {"balance": f"{r['balance']:.2f}"}) for r in balances]
        return completed, await _store_events(conn, events), len(due)


async def unpayable_due(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Up to ``limit`` due confirmed bookings that settlement passes over
    because their host's balance cannot take the payout, oldest end first."""
    return await conn.fetch(
        """SELECT b.id, b.host_id, b.amount, h.balance FROM bookings b JOIN users h ON h.id = b.host_id
           WHERE b.status = 'confirmed' AND b.end_at <= now() AND h.balance + b.amount > $2
           ORDER BY b.end_at LIMIT $1""",
        limit, BALANCE_MAX,
    )
