"""Settlement: ended bookings become completed and their hosts are paid
exactly once, with both server processes settling side by side (each runs
a Settlement worker every 0.5 s in the test configuration)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal

import pytest

from protocol.errors import RpcError
from tests.booking_support import balance, book, booker, events_until, host, move_to_past, slot
from server.config import Config
from server.services import Services
from server.settlement import Settlement
from tests.conftest import verified_user

H = dt.timedelta(hours=1)


async def test_completion_pays_the_host_and_notifies_both_parties_on_both_processes(server, server2, db):
    host_client, host_session = await verified_user(server2, price="70.00")
    host_id = host_session["user"]["id"]
    client, booker_id = await booker(server, balance="300.00")
    host_other_device = await server.connect(access_token=host_session["access_token"])
    b = await book(client, host_id, slot(days=2), hours=2)
    await move_to_past(db, b["id"])

    done = (await client.next_event("booking.completed", timeout=15))["booking"]
    assert done["id"] == b["id"] and done["status"] == "completed"
    assert done["conversation_id"] == b["conversation_id"]
    for c in (host_client, host_other_device):
        assert (await c.next_event("booking.completed"))["booking"] == done
        assert (await c.next_event("wallet.updated"))["balance"] == "140.00"
    # The payout's wallet.updated is the host's alone: the booker's own later
    # change is the marker, and nothing came before it since booking.completed.
    await client.call("users.update", {"name": "Marker"})
    assert await events_until(client, "Marker") == ["user.updated"]

    bid = uuid.UUID(b["id"])
    assert await balance(db, host_id) == Decimal("140.00")
    assert await balance(db, booker_id) == Decimal("160.00")
    payouts = await db.fetch("SELECT user_id, amount, status FROM payments WHERE booking_id = $1 AND type = 'payout'", bid)
    assert [(str(p["user_id"]), p["amount"], p["status"]) for p in payouts] == [(host_id, Decimal("140.00"), "completed")]
    ledger = await db.fetch("SELECT amount FROM transactions WHERE reference_id = $1 AND type = 'booking_payout'", bid)
    assert [t["amount"] for t in ledger] == [Decimal("140.00")]
    assert await db.fetchval("SELECT count(*) FROM booking_busy WHERE booking_id = $1", bid) == 0
    # The host reads their payout at once, on either process.
    assert (await host_other_device.call("wallet.transactions"))["transactions"][0]["type"] == "booking_payout"
    assert (await client.call("bookings.get", {"booking_id": b["id"]}))["status"] == "completed"
    # A completed booking cannot be cancelled.
    with pytest.raises(RpcError) as err:
        await client.call("bookings.cancel", {"booking_id": b["id"]})
    assert err.value.code.value == "invalid_state"
    for c in (client, host_client, host_other_device):
        await c.close()


async def test_many_settlers_at_once_pay_each_booking_exactly_once(stack, server, server2, db):
    hosts = await asyncio.gather(*(host(server if i % 2 else server2, price=f"{10 + i}.00") for i in range(6)))
    bookers = await asyncio.gather(*(booker(server2 if i % 2 else server, balance="1000.00") for i in range(6)))
    day = slot(days=3)
    # Every booker books every host, each pair at its own hour: 36 bookings.
    made = await asyncio.gather(*(
        book(bc, hid, day + (i * 6 + (i + j) % 6) * H)
        for i, (bc, _) in enumerate(bookers) for j, (_, hid) in enumerate(hosts)
    ))
    # Besides the settlement workers of both server processes, six more
    # settlers in this process race for the same bookings in small batches.
    services = Services.build(Config(database_url=stack.database_url, redis_url=stack.redis_url))
    await services.db.start()
    settlers = [Settlement(services, batch_size=4) for _ in range(6)]
    try:
        await move_to_past(db, *(b["id"] for b in made))  # all due at once
        await asyncio.gather(*(s.settle_due() for s in settlers))
    finally:
        await services.db.close()
        await services.redis.aclose()
    ids = [uuid.UUID(b["id"]) for b in made]

    # Each booker hears of each of their six bookings once.
    for bc, _ in bookers:
        seen = [(await bc.next_event("booking.completed", timeout=15))["booking"]["id"] for _ in range(6)]
        assert len(set(seen)) == 6
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE id = ANY($1) AND status = 'completed'", ids) == 36
    payouts = await db.fetch(
        "SELECT booking_id, count(*) AS n FROM payments WHERE booking_id = ANY($1) AND type = 'payout' GROUP BY 1", ids
    )
    assert len(payouts) == 36 and {p["n"] for p in payouts} == {1}
    assert await db.fetchval(
        "SELECT count(*) FROM transactions WHERE reference_id = ANY($1) AND type = 'booking_payout'", ids
    ) == 36
    for i, (_, hid) in enumerate(hosts):
        assert await balance(db, hid) == Decimal(10 + i) * 6
    for c, _ in hosts + bookers:
        await c.close()


async def test_cancelled_and_failed_bookings_are_never_settled(server, db):
    host_client, host_id = await host(server, price="50.00")
    client, _ = await booker(server, balance="60.00")
    cancelled = await book(client, host_id, slot(days=2))
    await client.call("bookings.cancel", {"booking_id": cancelled["id"]})
    with pytest.raises(RpcError) as failed:
        await book(client, host_id, slot(days=3), hours=2)
    confirmed = await book(client, host_id, slot(days=4))
    await move_to_past(db, cancelled["id"], failed.value.data["booking_id"], confirmed["id"])
    # The confirmed one settles; by then the others have been passed over.
    done = (await client.next_event("booking.completed", timeout=15))["booking"]
    assert done["id"] == confirmed["id"]
    statuses = dict(await db.fetch(
        "SELECT id::text, status FROM bookings WHERE user_id = $1", uuid.UUID(confirmed["user_id"])
    ))
    assert statuses == {cancelled["id"]: "cancelled", failed.value.data["booking_id"]: "failed", confirmed["id"]: "completed"}
    assert await balance(db, host_id) == Decimal("50.00")
    await client.close()
    await host_client.close()
