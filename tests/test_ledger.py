"""The ledger invariants under concurrency: 500 random top-ups, bookings and
cancels from a small group of users who all book each other, over sockets on
both server processes, then settlement of part of what they booked.

Checked over the users this test made (the database is shared):
- every balance equals the sum of that user's transactions;
- no balance is negative;
- balances + amounts of confirmed, unsettled bookings = top-ups;
- each booking is paid, refunded and paid out at most once, as its status says;
- no user is in two overlapping active bookings, and busy rows match them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid

from protocol.errors import RpcError
from tests.booking_support import key, move_to_past, slot
from tests.conftest import verified_user

USERS = 8
OPERATIONS = 500
IN_FLIGHT = 50
# Answers that are business outcomes of a random workload, not failures.
EXPECTED_REFUSALS = {"slot_unavailable", "insufficient_funds", "invalid_state", "idempotency_conflict"}


async def check_ledger(db, users: list[uuid.UUID]) -> None:
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        rows = await conn.fetch(
            """SELECT u.id, u.balance, coalesce(sum(t.amount), 0) AS ledger
               FROM users u LEFT JOIN transactions t ON t.user_id = u.id
               WHERE u.id = ANY($1) GROUP BY u.id""",
            users,
        )
        for r in rows:
            assert r["balance"] == r["ledger"], f"user {r['id']}: balance {r['balance']} != ledger {r['ledger']}"
            assert r["balance"] >= 0
        balances = sum(r["balance"] for r in rows)
        topups = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM topups WHERE user_id = ANY($1)", users)
        held = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM bookings WHERE user_id = ANY($1) AND status = 'confirmed'", users
        )
        assert balances + held == topups, (balances, held, topups)

        # Money moved for each booking exactly as its status says.
        moves = await conn.fetch(
            """SELECT b.id, b.status, b.amount,
                      count(*) FILTER (WHERE p.type = 'deduct' AND p.status = 'completed') AS deducts,
                      count(*) FILTER (WHERE p.type = 'refund') AS refunds,
                      count(*) FILTER (WHERE p.type = 'payout') AS payouts,
                      (SELECT coalesce(sum(t.amount), 0) FROM transactions t WHERE t.reference_id = b.id) AS net
               FROM bookings b LEFT JOIN payments p ON p.booking_id = b.id
               WHERE b.user_id = ANY($1) GROUP BY b.id""",
            users,
        )
        expected = {"confirmed": (1, 0, 0), "cancelled": (1, 1, 0), "completed": (1, 0, 1), "failed": (0, 0, 0)}
        for m in moves:
            assert (m["deducts"], m["refunds"], m["payouts"]) == expected[m["status"]], dict(m)
            net = {"confirmed": -m["amount"], "completed": 0, "cancelled": 0, "failed": 0}[m["status"]]
            assert m["net"] == net, dict(m)

        overlaps = await conn.fetchval(
            """SELECT count(*) FROM bookings a JOIN bookings b ON a.id < b.id
                 AND a.status IN ('pending', 'confirmed') AND b.status IN ('pending', 'confirmed')
                 AND tstzrange(a.start_at, a.end_at) && tstzrange(b.start_at, b.end_at)
                 AND (a.user_id IN (b.user_id, b.host_id) OR a.host_id IN (b.user_id, b.host_id))
               WHERE a.user_id = ANY($1)""",
            users,
        )
        assert overlaps == 0
        busy_mismatch = await conn.fetchval(
            """SELECT count(*) FROM bookings b
               WHERE b.user_id = ANY($1) AND (SELECT count(*) FROM booking_busy x WHERE x.booking_id = b.id)
                     <> CASE WHEN b.status IN ('pending', 'confirmed') THEN 2 ELSE 0 END""",
            users,
        )
        assert busy_mismatch == 0


async def test_ledger_holds_under_random_concurrent_money_movement(server, server2, db):
    rng = random.Random(20240601)
    people = await asyncio.gather(
        *(verified_user(server if i % 2 else server2, price=f"{rng.randint(20, 60)}.00") for i in range(USERS))
    )
    ids = [s["user"]["id"] for _, s in people]
    # Every user has a socket on each process; each call picks one at random.
    sockets = [[c, await (server2 if i % 2 else server).connect(access_token=s["access_token"])] for i, (c, s) in enumerate(people)]
    day = slot(days=40)
    bookings: list[tuple[int, str]] = []  # (booker index, booking id)
    used_topup_keys: list[tuple[int, str, str]] = []
    used_booking_keys: list[tuple[int, dict]] = []
    answers: dict[str, int] = {}
    unexpected: list[str] = []

    async def call(i: int, method: str, params: dict):
        try:
            result = await rng.choice(sockets[i]).call(method, params)
            answers[method] = answers.get(method, 0) + 1
            return result
        except RpcError as err:
            answers[err.code.value] = answers.get(err.code.value, 0) + 1
            if err.code.value not in EXPECTED_REFUSALS:
                unexpected.append(f"{method} {params}: {err.code.value} {err.data}")
            if err.code.value == "insufficient_funds":
                bookings.append((i, err.data["booking_id"]))
            return None

    async def operation() -> None:
        i = rng.randrange(USERS)
        kind = rng.choices(["topup", "book", "cancel", "replay"], weights=[2, 5, 2, 1])[0]
        if kind == "topup":
            amount, k = f"{rng.randint(1, 120)}.{rng.randint(0, 99):02d}", key()
            used_topup_keys.append((i, k, amount))
            await call(i, "wallet.topup", {"amount": amount, "idempotency_key": k})
        elif kind == "book":
            host = rng.choice([j for j in range(USERS) if j != i])
            start = day + dt.timedelta(hours=rng.randrange(48))
            params = {"host_id": ids[host], "start_at": start, "end_at": start + dt.timedelta(hours=rng.randint(1, 3)),
                      "idempotency_key": key()}
            used_booking_keys.append((i, params))
            result = await call(i, "bookings.create", params)
            if result is not None:
                bookings.append((i, result["booking"]["id"]))
        elif kind == "cancel" and bookings:
            booker, bid = rng.choice(bookings)
            await call(booker, "bookings.cancel", {"booking_id": bid})
        elif kind == "replay":  # an old key again, sometimes by someone else
            if used_topup_keys and rng.random() < 0.5:
                owner, k, amount = rng.choice(used_topup_keys)
                await call(rng.choice([owner, rng.randrange(USERS)]), "wallet.topup", {"amount": amount, "idempotency_key": k})
            elif used_booking_keys:
                owner, params = rng.choice(used_booking_keys)
                someone = rng.choice([j for j in range(USERS) if ids[j] != params["host_id"]])
                await call(rng.choice([owner, someone]), "bookings.create", params)

    for i in range(USERS):  # everyone starts with something
        await call(i, "wallet.topup", {"amount": "60.00", "idempotency_key": key()})
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def gated() -> None:
        async with gate:
            await operation()

    await asyncio.gather(*(gated() for _ in range(OPERATIONS)))
    assert not unexpected, unexpected[:5]
    for answer in ("bookings.create", "bookings.cancel", "slot_unavailable", "insufficient_funds", "idempotency_conflict"):
        assert answers.get(answer, 0) >= 5, answers  # the workload exercised every path
    user_ids = [uuid.UUID(u) for u in ids]
    await check_ledger(db, user_ids)

    # Settle some of what is confirmed, and the books still balance.
    confirmed = [str(r["id"]) for r in await db.fetch(
        "SELECT id FROM bookings WHERE user_id = ANY($1) AND status = 'confirmed' ORDER BY start_at LIMIT 10", user_ids
    )]
    await move_to_past(db, *confirmed)
    for _ in range(300):  # settlement has no event to await from here for every party; poll, bounded
        if not await db.fetchval(
            "SELECT count(*) FROM bookings WHERE id = ANY($1::uuid[]) AND status = 'confirmed'", confirmed
        ):
            break
        await asyncio.sleep(0.05)
    await check_ledger(db, user_ids)
    assert await db.fetchval(
        "SELECT count(*) FROM bookings WHERE id = ANY($1::uuid[]) AND status = 'completed'", confirmed
    ) == len(confirmed)
    for pair in sockets:
        for c in pair:
            await c.close()
