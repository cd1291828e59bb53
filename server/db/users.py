"""SQL of users and hosts."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from server.db import events as events_db

# ``event_seq``: the user's latest event number (sql/012); ``id`` is the
# users row's own in every statement these columns appear in.
USER_COLUMNS = ("id, email, name, gender, balance, kyc_status, price_per_hour, created_at, "
                "COALESCE((SELECT s.last_seq FROM user_event_seqs s WHERE s.user_id = id), 0) AS event_seq")
PUBLIC_COLUMNS = "id, name, gender, kyc_status, price_per_hour, created_at"


async def insert_user(conn: asyncpg.Connection, email: str, password_hash: str, name: str, gender: str) -> asyncpg.Record | None:
    """None when the email is taken."""
    return await conn.fetchrow(
        f"""INSERT INTO users (email, password_hash, name, gender) VALUES ($1, $2, $3, $4)
            ON CONFLICT (email) DO NOTHING RETURNING {USER_COLUMNS}""",
        email, password_hash, name, gender,
    )


async def credentials_by_email(conn: asyncpg.Connection, email: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE email = $1", email)


async def get_own(conn: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)


async def get_public_many(conn: asyncpg.Connection, user_ids: list[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
    """Public profiles of many users in one statement (Database.read_one)."""
    rows = await conn.fetch(f"SELECT {PUBLIC_COLUMNS} FROM users WHERE id = ANY($1::uuid[])", user_ids)
    return {r["id"]: r for r in rows}


async def get_by_email(conn: asyncpg.Connection, email: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE email = $1", email)


async def update_profile(conn: asyncpg.Connection, user_id: uuid.UUID, changes: dict[str, Any]) -> asyncpg.Record | None:
    """Apply ``changes`` (name, gender, price_per_hour). A price needs the
    user to be verified at the moment of the update: checked in the same
    statement so a concurrent KYC downgrade cannot slip between.
    Returns None for an unknown user; raises PermissionError for kyc."""
    allowed = ("name", "gender", "price_per_hour")
    cols = [c for c in allowed if c in changes]
    if not cols:
        return await get_own(conn, user_id)
    sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
    needs_kyc = changes.get("price_per_hour") is not None
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE users SET {sets}, updated_at = now()
                WHERE id = $1 {"AND kyc_status = 'verified'" if needs_kyc else ""}
                RETURNING {USER_COLUMNS}""",
            user_id, *(changes[c] for c in cols),
        )
        if row is None:
            if needs_kyc and await conn.fetchval("SELECT 1 FROM users WHERE id = $1", user_id):
                raise PermissionError("kyc_required")
            return None
        return await add_user_updated(conn, row)


def _own_user_data(row: asyncpg.Record) -> dict[str, Any]:
    """The user as ``user.updated`` stores it (protocol/models/users.py
    OwnUser); its ``event_seq`` is the event's own seq, set when read."""
    price = row["price_per_hour"]
    return {"user": {
        "id": str(row["id"]), "email": row["email"], "name": row["name"], "gender": row["gender"],
        "balance": f"{row['balance']:.2f}", "kyc_status": row["kyc_status"],
        "price_per_hour": None if price is None else f"{price:.2f}", "created_at": row["created_at"].isoformat(),
    }}


async def add_user_updated(conn: asyncpg.Connection, row: asyncpg.Record) -> dict[str, Any]:
    """Store ``user.updated`` for a user row just changed (in the caller's
    transaction, last before its commit); returns the row with
    ``event_seq`` the event's seq."""
    [seq] = await events_db.add(conn, [(row["id"], "user.updated", events_db.data_json(_own_user_data(row)))])
    return {**dict(row), "event_seq": seq}


def search_hosts_query(
    caller: uuid.UUID,
    start_at: dt.datetime | None,
    end_at: dt.datetime | None,
    min_price: Decimal | None,
    max_price: Decimal | None,
    gender: str | None,
    after: tuple[Decimal, uuid.UUID] | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """The SQL and arguments of ``search_hosts`` (loadtests/explain_search.py
    explains exactly this). Only the filters given appear in the statement:
    a ``$n IS NULL OR ...`` form would stop a generic plan from using the
    keyset and price bounds as index conditions."""
    args: list[Any] = [caller, limit]
    where = ["u.price_per_hour IS NOT NULL", "u.kyc_status = 'verified'", "u.id <> $1"]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if min_price is not None:
        where.append(f"u.price_per_hour >= {arg(min_price)}")
    if max_price is not None:
        where.append(f"u.price_per_hour <= {arg(max_price)}")
    if gender is not None:
        where.append(f"u.gender = {arg(gender)}")
    if after is not None:
        where.append(f"(u.price_per_hour, u.id) > ({arg(after[0])}, {arg(after[1])})")
    if start_at is not None and end_at is not None:
        # Free for the whole range: no busy row of theirs (host or booker)
        # touches it. OFFSET 0 keeps this a probe of the GiST index per host
        # (user_id = u.id AND during && range) as the walk goes; flattened
        # into an anti-join, the planner may instead collect every busy row of
        # the range through that index without its leading column, which
        # reads the whole index (loadtests/explain_search.py shows both).
        where.append(
            f"""NOT EXISTS (SELECT 1 FROM booking_busy b WHERE b.user_id = u.id
                    AND b.during && tstzrange({arg(start_at)}, {arg(end_at)}, '[)') OFFSET 0)"""
        )
    # The first two conditions are the predicate of idx_users_bookable_price_id,
    # which also yields rows in (price, id) order.
    sql = f"""SELECT {PUBLIC_COLUMNS} FROM users u
              WHERE {" AND ".join(where)}
              ORDER BY u.price_per_hour, u.id
              LIMIT $2"""
    return sql, args


async def search_hosts(conn: asyncpg.Connection, *criteria: Any) -> list[asyncpg.Record]:
    """Bookable hosts in (price, id) order, after the keyset cursor. With a
    range, only hosts with no active booking (as host or booker) touching it.
    ``criteria`` are those of ``search_hosts_query``."""
    sql, args = search_hosts_query(*criteria)
    return await conn.fetch(sql, *args)


async def busy_intervals(conn: asyncpg.Connection, user_id: uuid.UUID, start: dt.datetime, end: dt.datetime) -> list[asyncpg.Record] | None:
    """None for an unknown user."""
    rows = await conn.fetch(
        """SELECT lower(b.during) AS start_at, upper(b.during) AS end_at FROM booking_busy b
           WHERE b.user_id = $1 AND b.during && tstzrange($2, $3, '[)')
           ORDER BY lower(b.during)""",
        user_id, start, end,
    )
    if not rows and not await conn.fetchval("SELECT 1 FROM users WHERE id = $1", user_id):
        return None
    return rows
