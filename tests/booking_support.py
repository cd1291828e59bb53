"""Helpers shared by the wallet, hosts, bookings, settlement and ledger tests:
funded bookers, priced hosts, whole-hour slots, and moving a booking into
the past (bookings can only be made in the future)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from protocol.client import Client
from tests.conftest import ServerProcess, verified_user

UTC = dt.timezone.utc


def slot(days: int = 1, hour: int = 0) -> dt.datetime:
    """A whole UTC hour ``days`` days plus ``hour`` hours after the current hour."""
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return now + dt.timedelta(days=days, hours=hour)


def key() -> str:
    return uuid.uuid4().hex


async def host(server: ServerProcess, price: str = "50.00", **kw: Any) -> tuple[Client, str]:
    """A connected, verified, bookable host; returns (client, user id)."""
    client, session = await verified_user(server, price=price, **kw)
    return client, session["user"]["id"]


async def booker(server: ServerProcess, balance: str | None = "1000.00", **kw: Any) -> tuple[Client, str]:
    """A connected, verified user with ``balance`` in their wallet."""
    client, session = await verified_user(server, **kw)
    if balance is not None:
        await client.call("wallet.topup", {"amount": balance, "idempotency_key": key()})
        await client.next_event("wallet.updated")
    return client, session["user"]["id"]


async def book(
    client: Client, host_id: str, start: dt.datetime, hours: int = 1, idempotency_key: str | None = None
) -> dict:
    """bookings.create; returns the booking (raises RpcError on refusal)."""
    result = await client.call(
        "bookings.create",
        {
            "host_id": host_id,
            "start_at": start,
            "end_at": start + dt.timedelta(hours=hours),
            "idempotency_key": idempotency_key or key(),
        },
    )
    return result["booking"]


async def balance(db: asyncpg.Pool, user_id: str) -> Decimal:
    return await db.fetchval("SELECT balance FROM users WHERE id = $1", uuid.UUID(user_id))


async def move_to_past(db: asyncpg.Pool, *booking_ids: str, hours_ago: int = 2) -> None:
    """Make bookings (their busy rows follow: sql/008) end in the past, keeping their
    length, so that settlement finds them due, all in one transaction. The
    first ends ``hours_ago`` hours ago and each next one ends where the one
    before starts, so they never overlap."""
    async with db.acquire() as conn, conn.transaction():
        end = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=hours_ago)
        for booking_id in booking_ids:
            bid = uuid.UUID(booking_id)
            row = await conn.fetchrow("SELECT start_at, end_at FROM bookings WHERE id = $1", bid)
            start = end - (row["end_at"] - row["start_at"])
            await conn.execute("UPDATE bookings SET start_at = $2, end_at = $3 WHERE id = $1", bid, start, end)
            end = start


async def move_start_to_past(db: asyncpg.Pool, booking_id: str) -> None:
    """Make a booking already started (but not ended): too late to cancel."""
    async with db.acquire() as conn, conn.transaction():
        start = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
        end = start + dt.timedelta(hours=24)
        await conn.execute(
            "UPDATE bookings SET start_at = $2, end_at = $3 WHERE id = $1", uuid.UUID(booking_id), start, end
        )


async def events_until(client: Client, marker: str, timeout: float = 10.0) -> list[str]:
    """Names of the events that arrive up to and including the
    ``user.updated`` that names the user ``marker`` (the test's own change,
    published after what it checks, on the same channel)."""
    names: list[str] = []

    async def run() -> None:
        while True:
            event, data = await client.events.get()
            names.append(event)
            if event == "user.updated" and data["user"]["name"] == marker:
                return

    await asyncio.wait_for(run(), timeout)
    return names
