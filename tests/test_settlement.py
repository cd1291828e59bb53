"""Settlement: ended bookings become completed and their hosts are paid
exactly once, with both server processes settling side by side (each runs
a Settlement worker every 0.5 s in the test configuration)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from decimal import Decimal

import pytest

from protocol.errors import RpcError
from tests.booking_support import balance, book, booker, events_until, host, move_start_to_past, move_to_past, slot
from server.db.wallet import BALANCE_MAX
from server.services import Services
from server.settlement import Settlement
from tests.conftest import server_config, verified_user

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
    services = Services.build(server_config(stack))
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


async def settlement_pass(stack, passes: int = 1) -> int:
    """Whole settlement passes of one worker, run here and awaited (besides
    the workers of the server processes); returns how many bookings they
    settled."""
    services = Services.build(server_config(stack))
    await services.db.start()
    try:
        worker = Settlement(services)
        return sum([await worker.settle_due() for _ in range(passes)])
    finally:
        await services.db.close()
        await services.redis.aclose()


async def test_a_booking_that_has_started_but_not_ended_is_not_settled(stack, server, db):
    host_client, host_id = await host(server, price="40.00")
    client, _ = await booker(server, balance="300.00")
    started = await book(client, host_id, slot(days=2))
    ended = await book(client, host_id, slot(days=3))
    await move_start_to_past(db, started["id"])  # began an hour ago, ends in 23 hours
    await move_to_past(db, ended["id"])  # moved second: a pass that settles it saw both

    done = (await client.next_event("booking.completed", timeout=15))["booking"]
    assert done["id"] == ended["id"]
    await settlement_pass(stack)  # and one more, awaited, after it
    assert await statuses(db, [started["id"], ended["id"]]) == {started["id"]: "confirmed", ended["id"]: "completed"}
    assert await payouts(db, [started["id"], ended["id"]]) == {ended["id"]: (1, 1)}
    assert await balance(db, host_id) == Decimal("40.00")
    assert await db.fetchval("SELECT count(*) FROM booking_busy WHERE booking_id = $1", uuid.UUID(started["id"])) == 2
    # No booking.completed for the started one reached the booker either.
    await client.call("users.update", {"name": "Marker"})
    assert await events_until(client, "Marker") == ["user.updated"]
    await client.close()
    await host_client.close()


# ---- wallets that cannot take a payout ---------------------------------------


async def payouts(db, booking_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Payout payments and booking_payout transactions per booking, as
    {id: (payments, transactions)}; a booking with neither is absent."""
    rows = await db.fetch(
        """SELECT b.id::text,
                  (SELECT count(*) FROM payments p WHERE p.booking_id = b.id AND p.type = 'payout') AS paid,
                  (SELECT count(*) FROM transactions t WHERE t.reference_id = b.id AND t.type = 'booking_payout') AS led
           FROM bookings b WHERE b.id = ANY($1::uuid[])""",
        [uuid.UUID(i) for i in booking_ids],
    )
    return {r["id"]: (r["paid"], r["led"]) for r in rows if r["paid"] or r["led"]}


async def statuses(db, booking_ids: list[str]) -> dict[str, str]:
    rows = await db.fetch("SELECT id::text, status FROM bookings WHERE id = ANY($1::uuid[])", [uuid.UUID(i) for i in booking_ids])
    return dict(rows)


async def set_balance(db, user_id: str, amount: Decimal) -> None:
    await db.execute("UPDATE users SET balance = $2 WHERE id = $1", uuid.UUID(user_id), amount)


async def test_the_balance_limit_is_the_balance_column_s(db):
    precision, scale = await db.fetchrow(
        """SELECT numeric_precision, numeric_scale FROM information_schema.columns
           WHERE table_schema = current_schema() AND table_name = 'users' AND column_name = 'balance'"""
    )
    assert BALANCE_MAX == Decimal(10) ** (precision - scale) - Decimal(10) ** -scale


async def test_a_host_whose_balance_cannot_take_a_payout_holds_up_no_other_booking(stack, server, server2, db, caplog):
    full_client, full_id = await host(server, price="50.00")
    hosts = await asyncio.gather(*(host(server2 if i % 2 else server, price=f"{20 + i}.00") for i in range(3)))
    bookers = await asyncio.gather(booker(server), booker(server2))
    day = slot(days=5)
    # The full host's bookings end first, so they come first in every due batch.
    stuck = [await book(bc, full_id, day + 2 * j * H) for j, (bc, _) in enumerate(bookers)]
    others = await asyncio.gather(*(
        book(bc, hid, day + (4 + 2 * i + j) * H) for i, (_, hid) in enumerate(hosts) for j, (bc, _) in enumerate(bookers)
    ))
    full = Decimal("9999999995.00")
    await set_balance(db, full_id, full)
    await move_to_past(db, *(b["id"] for b in others), *(b["id"] for b in reversed(stuck)))

    # Both processes' workers settle every other booking, each paid once.
    for bc, _ in bookers:
        seen = {(await bc.next_event("booking.completed", timeout=15))["booking"]["id"] for _ in range(3)}
        assert seen <= {b["id"] for b in others} and len(seen) == 3
    other_ids = [b["id"] for b in others]
    stuck_ids = [b["id"] for b in stuck]
    assert await statuses(db, other_ids) == {i: "completed" for i in other_ids}
    assert await payouts(db, other_ids) == {i: (1, 1) for i in other_ids}
    for i, (_, hid) in enumerate(hosts):
        assert await balance(db, hid) == Decimal(20 + i) * 2
    # The full host's bookings stay confirmed and unpaid, and a worker says
    # so, once for each, however many passes find them stuck.
    with caplog.at_level(logging.WARNING, logger="hangout.settlement"):
        await settlement_pass(stack, passes=2)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for i in stuck_ids:
        assert sum(i in w for w in warned) == 1, (i, warned)
    assert await statuses(db, stuck_ids) == {i: "confirmed" for i in stuck_ids}
    assert await payouts(db, stuck_ids) == {}
    assert await balance(db, full_id) == full

    # Once the host's balance can take them, they settle, each paid once.
    await set_balance(db, full_id, Decimal("0.00"))
    seen = {(await full_client.next_event("booking.completed", timeout=15))["booking"]["id"] for _ in range(2)}
    assert seen == set(stuck_ids)
    assert await statuses(db, stuck_ids) == {i: "completed" for i in stuck_ids}
    assert await payouts(db, stuck_ids) == {i: (1, 1) for i in stuck_ids}
    assert await balance(db, full_id) == Decimal("100.00")
    for c, _ in [(full_client, None), *hosts, *bookers]:
        await c.close()


async def test_payouts_to_one_host_that_fit_only_one_by_one_settle_one_now_and_the_other_later(server, server2, db):
    host_client, host_id = await host(server, price="50.00")
    other_client, other_id = await host(server2, price="30.00")
    client, _ = await booker(server2)
    day = slot(days=6)
    first, second = await book(client, host_id, day), await book(client, host_id, day + 2 * H)
    other = await book(client, other_id, day + 4 * H)
    # Room for one payout of 50.00, not for two.
    await set_balance(db, host_id, BALANCE_MAX - Decimal("60.00"))
    await move_to_past(db, other["id"], second["id"], first["id"])

    seen = {(await client.next_event("booking.completed", timeout=15))["booking"]["id"] for _ in range(2)}
    assert other["id"] in seen and len(seen & {first["id"], second["id"]}) == 1
    (paid,) = seen - {other["id"]}
    (unpaid,) = {first["id"], second["id"]} - seen
    assert await statuses(db, [other["id"], first["id"], second["id"]]) == {
        other["id"]: "completed", paid: "completed", unpaid: "confirmed"
    }
    assert await payouts(db, [other["id"], first["id"], second["id"]]) == {other["id"]: (1, 1), paid: (1, 1)}
    assert await balance(db, host_id) == BALANCE_MAX - Decimal("10.00")
    assert await balance(db, other_id) == Decimal("30.00")

    # Room again (the host spent some): the other one settles, paid once.
    await db.execute("UPDATE users SET balance = balance - 100 WHERE id = $1", uuid.UUID(host_id))
    assert (await client.next_event("booking.completed", timeout=15))["booking"]["id"] == unpaid
    assert await payouts(db, [first["id"], second["id"]]) == {first["id"]: (1, 1), second["id"]: (1, 1)}
    assert await balance(db, host_id) == BALANCE_MAX - Decimal("60.00")
    for c in (client, host_client, other_client):
        await c.close()
