"""bookings.create calls made together (Database.write_merged, sql/009).

Calls that wait at the same moment go to PostgreSQL as one transaction. Each
must still get the answer it would get alone: the overlaps, replays, short
balances and past starts within one batch, and when a batch fails in the
database (its calls are then made one by one).

A batch is made deterministic here with a test-only method that holds the
calls back (``test.hold_merged_writes``): released, those waiting go as one
batch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from decimal import Decimal

import pytest

from protocol.errors import RpcError
from tests.booking_support import balance, booker, host, key, slot
from server.db.batching import WriteBatcher
from tests.conftest import ServerProcess, ops_status

H = dt.timedelta(hours=1)


async def merged(server) -> dict:
    return (await ops_status(server))["primary"]["merged_writes"]


async def until_waiting(server, count: int, timeout: float = 5.0) -> None:
    """Bounded poll of /status until ``count`` calls wait for a batch."""
    deadline = time.monotonic() + timeout
    while (await merged(server))["waiting"] < count:
        assert time.monotonic() < deadline, f"calls never queued: {await merged(server)}"
        await asyncio.sleep(0.01)


def create(client, host_id: str, start: dt.datetime, k: str | None = None):
    return client.call("bookings.create", {
        "host_id": host_id, "start_at": start, "end_at": start + H, "idempotency_key": k or key(),
    })


async def made_together(server, client, calls, return_exceptions: bool = False) -> list:
    """Sends ``calls`` (coroutines) while the server holds merged writes
    back (``test.hold_merged_writes``), then lets them go together, as one
    batch (or more, past a batch's bounds); their results, in order."""
    await client.call("test.hold_merged_writes", {"hold": True})
    try:
        sent = [asyncio.ensure_future(c) for c in calls]
        await until_waiting(server, len(sent))
    finally:
        await client.call("test.hold_merged_writes", {"hold": False})
    return await asyncio.gather(*sent, return_exceptions=return_exceptions)


@pytest.fixture(scope="module")
async def test_server(stack):
    """A server with the test-only methods (tests/debug_methods.py)."""
    proc = await ServerProcess(stack, test_methods=True, LOG_LEVEL="ERROR").start()
    yield proc
    await proc.stop()


@pytest.mark.parametrize("batch_fails", [False, True], ids=["batch commits", "batch fails, calls made alone"])
async def test_calls_made_together_get_the_answers_they_would_get_alone(test_server, db, batch_fails):
    server = test_server
    host_client, host_id = await host(server, price="40.00")
    people = await asyncio.gather(*(booker(server) for _ in range(4)), booker(server, balance="10.00"))
    (first, _), (second, _), (third, _), (fourth, _), (short, _) = people
    ids = dict(zip(("first", "second", "third", "fourth", "short"), (uid for _, uid in people)))
    start = slot(days=6)
    if batch_fails:
        await host_client.call("test.fail_merged_writes", {"fail": True})
    before = await merged(server)
    try:
        repeated = key()
        results = await made_together(server, host_client, [
            create(first, host_id, start),
            create(second, host_id, start),  # overlaps the first call's booking
            create(third, host_id, start + H, repeated),
            create(third, host_id, start + H, repeated),  # the same call again: a replay
            create(fourth, host_id, start + H),  # overlaps the third's
            create(short, host_id, start + 2 * H),  # 10.00 for a 40.00 hour
            create(fourth, host_id, slot(days=-1)),  # a start that has passed
        ], return_exceptions=True)
        after = await merged(server)
    finally:
        if batch_fails:
            await host_client.call("test.fail_merged_writes", {"fail": False})

    def code(r):
        return r.code.value if isinstance(r, RpcError) else ("replayed" if r["replayed"] else "created")

    first_r, overlap, third_a, third_b, fourth_r, short_r, passed = results
    # Made alone after a failed batch, the first two race for one hour too.
    assert sorted(map(code, (first_r, overlap))) == ["created", "slot_unavailable"]
    # The third's two calls (one key) and the fourth's race for one hour:
    # either the third wins (its second call is a replay) or the fourth does
    # (both of the third's are refused). In a batch, the order of the calls.
    race = sorted(map(code, (third_a, third_b, fourth_r)))
    if code(fourth_r) == "created":
        assert race == ["created", "slot_unavailable", "slot_unavailable"]
    else:
        assert race == ["created", "replayed", "slot_unavailable"]
    assert code(short_r) == "insufficient_funds"
    assert code(passed) == "invalid_params" and passed.data["errors"][0]["field"] == "start_at"
    winner = next(r for r in (third_a, third_b, fourth_r) if code(r) == "created")["booking"]

    # Money moved once per confirmed booking, and for nothing else.
    first_winner = next(r for r in (first_r, overlap) if code(r) == "created")["booking"]
    paid = {first_winner["user_id"], winner["user_id"]}
    for name in ("first", "second", "third", "fourth"):
        expected = Decimal("960.00") if ids[name] in paid else Decimal("1000.00")
        assert await balance(db, ids[name]) == expected
    assert await balance(db, ids["short"]) == Decimal("10.00")
    assert await db.fetchval(
        "SELECT count(*) FROM bookings WHERE host_id = $1 AND status = 'confirmed'", uuid.UUID(host_id)) == 2
    assert await db.fetchval(
        "SELECT count(*) FROM bookings WHERE host_id = $1 AND status = 'failed'", uuid.UUID(host_id)) == 1
    assert after["waiting"] == 0
    if batch_fails:
        assert after["failed"] == before["failed"] + 1
        assert after["batches"] == before["batches"] + 1
    else:
        assert after["failed"] == before["failed"]
        assert after["batches"] == before["batches"] + 1
        assert after["calls"] == before["calls"] + len(results)
    for c in (host_client, first, second, third, fourth, short):
        await c.close()


async def test_each_call_of_a_batch_gets_its_own_booking_balance_and_events(test_server, server2, db):
    """Five bookers book one host (on the other process) for five hours, as
    one batch: each booker gets their own booking, balance and events, and
    the host all five booking.created."""
    server = test_server
    host_client, host_id = await host(server2, price="25.00")
    bookers = await asyncio.gather(*(booker(server) for _ in range(5)))
    start = slot(days=9)
    before = await merged(server)
    results = await made_together(server, bookers[0][0],
                                  [create(c, host_id, start + i * H) for i, (c, _) in enumerate(bookers)])
    assert (await merged(server))["calls"] == before["calls"] + len(bookers)
    for i, ((client, uid), r) in enumerate(zip(bookers, results)):
        b = r["booking"]
        assert (b["user_id"], b["host_id"], b["status"], r["replayed"]) == (uid, host_id, "confirmed", False)
        assert b["start_at"] == start + i * H
        assert (await client.next_event("booking.created"))["booking"]["id"] == b["id"]
        assert (await client.next_event("wallet.updated"))["balance"] == "975.00"
        assert await balance(db, uid) == Decimal("975.00")
        # All of a booking's rows, as one made alone has them (sql/010 writes
        # a batch like this one a table at a time).
        booking_id = uuid.UUID(b["id"])
        rows = await db.fetchrow(
            """SELECT (SELECT count(*) FROM payments WHERE booking_id = $1 AND user_id = $2 AND amount = 25
                       AND type = 'deduct' AND status = 'completed' AND idempotency_key = 'deduct:' || $1) AS payments,
                      (SELECT count(*) FROM transactions WHERE reference_id = $1 AND user_id = $2 AND amount = -25
                       AND type = 'booking_payment') AS transactions,
                      (SELECT count(*) FROM conversations WHERE booking_id = $1 AND user_id = $2
                       AND host_id = $3) AS conversations,
                      (SELECT count(*) FROM booking_busy WHERE booking_id = $1) AS busy""",
            booking_id, uuid.UUID(uid), uuid.UUID(host_id))
        assert dict(rows) == {"payments": 1, "transactions": 1, "conversations": 1, "busy": 2}
        fetched = await client.call("bookings.get", {"booking_id": b["id"]})
        assert fetched == b
    seen = {(await host_client.next_event("booking.created"))["booking"]["id"] for _ in bookers}
    assert seen == {r["booking"]["id"] for r in results}
    for c, _ in [(host_client, None), *bookers]:
        await c.close()


async def test_a_batch_takes_at_most_256_locks(test_server, db):
    """Twelve 12-hour bookings take 25 locks each (the booker's wallet, 24
    hour locks): ten fit in a batch, the other two go in the next."""
    server = test_server
    host_client, host_id = await host(server, price="10.00")
    bookers = await asyncio.gather(*(booker(server) for _ in range(12)))
    start = slot(days=20)
    before = await merged(server)
    results = await made_together(server, host_client, [c.call("bookings.create", {
        "host_id": host_id, "start_at": start + 12 * i * H, "end_at": start + 12 * (i + 1) * H,
        "idempotency_key": key()}) for i, (c, _) in enumerate(bookers)])
    assert [r["booking"]["status"] for r in results] == ["confirmed"] * 12
    after = await merged(server)
    assert (after["batches"] - before["batches"], after["calls"] - before["calls"]) == (2, 12)
    for uid in (u for _, u in bookers):
        assert await balance(db, uid) == Decimal("880.00")
    for c in (host_client, *(c for c, _ in bookers)):
        await c.close()


async def test_a_booker_twice_in_one_batch_pays_from_what_the_first_call_left(test_server, db):
    """In a batch the booker's row is locked once, up front (sql/010): each
    call still reads the balance the calls before it left."""
    server = test_server
    host_client, host_id = await host(server, price="40.00")
    client, uid = await booker(server, balance="50.00")
    start = slot(days=11)
    before = await merged(server)
    first, second = await made_together(server, host_client,
                                        [create(client, host_id, start + i * H) for i in range(2)],
                                        return_exceptions=True)
    after = await merged(server)
    assert (after["batches"] - before["batches"], after["calls"] - before["calls"]) == (1, 2)
    assert first["booking"]["status"] == "confirmed"
    assert isinstance(second, RpcError) and second.code.value == "insufficient_funds"
    assert await balance(db, uid) == Decimal("10.00")
    assert await db.fetchval(
        "SELECT sum(amount) FROM transactions WHERE user_id = $1", uuid.UUID(uid)) == Decimal("10.00")
    for c in (host_client, client):
        await c.close()


async def test_a_batch_holds_at_most_max_batch_calls(test_server):
    """One call more than a batch holds waits for the next batch."""
    server = test_server
    size = WriteBatcher.MAX_BATCH
    host_client, host_id = await host(server, price="10.00")
    bookers = await asyncio.gather(*(booker(server) for _ in range(size + 1)))
    start = slot(days=30)
    before = await merged(server)
    results = await made_together(server, host_client,
                                  [create(c, host_id, start + i * H) for i, (c, _) in enumerate(bookers)])
    assert [r["booking"]["status"] for r in results] == ["confirmed"] * (size + 1)
    after = await merged(server)
    # The batch of the one left over is a batch of one: made alone, not counted.
    assert (after["batches"] - before["batches"], after["calls"] - before["calls"]) == (1, size)
    for c in (host_client, *(c for c, _ in bookers)):
        await c.close()
