"""SQL of the wallet: top-ups and the ledger."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import asyncpg

from server.db import events as events_db

TRANSACTION_COLUMNS = "id, amount, type, reference_id, created_at"

# The largest balance a wallet can hold: users.balance is DECIMAL(12,2)
# (sql/001). Storing more fails with "numeric field overflow", so money is
# only moved into a wallet that can take it (top-ups here, refunds and
# payouts in server/db/bookings.py).
BALANCE_MAX = Decimal("9999999999.99")


async def topup(
    conn: asyncpg.Connection, user_id: uuid.UUID, amount: Decimal, key: str, request_hash: bytes
) -> tuple[str, asyncpg.Record | None, Decimal | None, int | None]:
    """Credit a sandbox top-up once per key.

    Returns (outcome, transaction, balance, seq of the ``wallet.updated``
    stored with a top-up made now, else None); outcome is ``created``,
    ``replayed`` (same user, same request), ``conflict``, or
    ``balance_limit`` (the balance would pass ``BALANCE_MAX``: nothing is
    stored, the key included)."""
    try:
        return await _topup(conn, user_id, amount, key, request_hash)
    except _OverLimit:
        return "balance_limit", None, None, None


class _OverLimit(Exception):
    """Raised to roll the top-up back."""


async def _topup(
    conn: asyncpg.Connection, user_id: uuid.UUID, amount: Decimal, key: str, request_hash: bytes
) -> tuple[str, asyncpg.Record | None, Decimal | None, int | None]:
    async with conn.transaction():
        # A call racing with the same key waits here for the first to commit.
        topup_id = await conn.fetchval(
            """INSERT INTO topups (user_id, amount, idempotency_key, request_hash) VALUES ($1, $2, $3, $4)
               ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
            user_id, amount, key, request_hash,
        )
        if topup_id is None:
            first = await conn.fetchrow("SELECT id, user_id, request_hash FROM topups WHERE idempotency_key = $1", key)
            if first["user_id"] != user_id or first["request_hash"] != request_hash:
                return "conflict", None, None, None
            transaction = await conn.fetchrow(
                f"SELECT {TRANSACTION_COLUMNS} FROM transactions WHERE reference_id = $1 AND type = 'topup'", first["id"]
            )
            balance = await conn.fetchval("SELECT balance FROM users WHERE id = $1", user_id)
            return "replayed", transaction, balance, None
        balance = await conn.fetchval(
            "UPDATE users SET balance = balance + $2 WHERE id = $1 AND balance + $2 <= $3 RETURNING balance",
            user_id, amount, BALANCE_MAX,
        )
        if balance is None:
            raise _OverLimit
        transaction = await conn.fetchrow(
            f"""INSERT INTO transactions (user_id, amount, type, reference_id) VALUES ($1, $2, 'topup', $3)
                RETURNING {TRANSACTION_COLUMNS}""",
            user_id, amount, topup_id,
        )
        [seq] = await events_db.add(conn, [(user_id, "wallet.updated", events_db.data_json({"balance": f"{balance:.2f}"}))])
        return "created", transaction, balance, seq


async def transactions(
    conn: asyncpg.Connection, user_id: uuid.UUID, after: tuple[dt.datetime, uuid.UUID] | None, limit: int
) -> list[asyncpg.Record]:
    """The user's ledger, newest first, after the keyset cursor."""
    if after is None:
        return await conn.fetch(
            f"""SELECT {TRANSACTION_COLUMNS} FROM transactions WHERE user_id = $1
                ORDER BY created_at DESC, id DESC LIMIT $2""",
            user_id, limit,
        )
    return await conn.fetch(
        f"""SELECT {TRANSACTION_COLUMNS} FROM transactions WHERE user_id = $1 AND (created_at, id) < ($3, $4)
            ORDER BY created_at DESC, id DESC LIMIT $2""",
        user_id, limit, *after,
    )
