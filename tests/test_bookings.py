"""bookings.create / cancel / get / list against the real stack, with
clients spread over two server processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal

import msgpack
import pytest

from protocol.errors import RpcError
from tests.booking_support import balance, book, booker, events_until, host, key, move_start_to_past, slot
from tests.conftest import post_kyc, register, replay_paused, until_writes_wait_on_the_lock, verified_user

H = dt.timedelta(hours=1)


async def refused(coro) -> RpcError:
    with pytest.raises(RpcError) as info:
        await coro
    return info.value


def fields(err: RpcError) -> set[str]:
    return {e["field"] for e in err.data["errors"]}


# ---- create: the happy path, money and events ------------------------------


async def test_booking_commits_booking_payment_ledger_and_conversation_together(server, server2, db):
    host_client, host_id = await host(server2, price="40.00")
    client, booker_id = await booker(server, balance="500.00")
    start = slot(days=3)
    result = await client.call(
        "bookings.create",
        {"host_id": host_id, "start_at": start, "end_at": start + 3 * H, "idempotency_key": key()},
    )
    b = result["booking"]
    assert result["replayed"] is False
    assert b["status"] == "confirmed"
    assert b["amount"] == "120.00"  # 40.00 x 3 h, computed by the server
    assert (b["user_id"], b["host_id"]) == (booker_id, host_id)
    assert (b["start_at"], b["end_at"]) == (start, start + 3 * H)
    assert b["conversation_id"] is not None
    bid = uuid.UUID(b["id"])

    assert await balance(db, booker_id) == Decimal("380.00")
    payments = await db.fetch("SELECT user_id, amount, type, status, idempotency_key FROM payments WHERE booking_id = $1", bid)
    assert [(str(p["user_id"]), p["amount"], p["type"], p["status"]) for p in payments] == [
        (booker_id, Decimal("120.00"), "deduct", "completed")
    ]
    ledger = await db.fetch("SELECT user_id, amount, type FROM transactions WHERE reference_id = $1", bid)
    assert [(str(t["user_id"]), t["amount"], t["type"]) for t in ledger] == [(booker_id, Decimal("-120.00"), "booking_payment")]
    conv = await db.fetchrow("SELECT id, user_id, host_id FROM conversations WHERE booking_id = $1", bid)
    assert (str(conv["id"]), str(conv["user_id"]), str(conv["host_id"])) == (b["conversation_id"], booker_id, host_id)
    busy = await db.fetch("SELECT user_id, role FROM booking_busy WHERE booking_id = $1 ORDER BY role", bid)
    assert [(str(r["user_id"]), r["role"]) for r in busy] == [(booker_id, "booker"), (host_id, "host")]
    await client.close()
    await host_client.close()


async def test_created_event_reaches_both_parties_on_both_processes(server, server2):
    host_client, host_id = await host(server2)
    booker_client, session = await verified_user(server)
    await booker_client.call("wallet.topup", {"amount": "100.00", "idempotency_key": key()})
    # The booker's second device, on the other process.
    other_device = await server2.connect(access_token=session["access_token"])
    b = await book(booker_client, host_id, slot(days=2))
    for client in (booker_client, other_device, host_client):
        event = await client.next_event("booking.created")
        assert event["booking"] == b
    for client in (booker_client, other_device):
        assert (await client.next_event("wallet.updated"))["balance"] == "50.00"
    for c in (booker_client, other_device, host_client):
        await c.close()


async def test_read_your_writes_after_create_on_the_other_process(server, server2):
    host_client, host_session = await verified_user(server, price="50.00")
    client, session = await verified_user(server)
    await client.call("wallet.topup", {"amount": "100.00", "idempotency_key": key()})
    b = await book(client, host_session["user"]["id"], slot(days=2))
    # Both parties, on their other devices on the other process, see it at once.
    booker_elsewhere = await server2.connect(access_token=session["access_token"])
    host_elsewhere = await server2.connect(access_token=host_session["access_token"])
    assert [x["id"] for x in (await booker_elsewhere.call("bookings.list", {}))["bookings"]] == [b["id"]]
    assert [x["id"] for x in (await host_elsewhere.call("bookings.list", {"role": "host"}))["bookings"]] == [b["id"]]
    for c in (client, booker_elsewhere, host_client, host_elsewhere):
        await c.close()


async def test_both_parties_see_a_new_booking_on_the_other_process_while_the_replica_lags(
        server, server2, replica_db):
    host_client, host_session = await verified_user(server, price="50.00")
    client, session = await verified_user(server)
    await client.call("wallet.topup", {"amount": "100.00", "idempotency_key": key()})
    host_elsewhere = await server2.connect(access_token=host_session["access_token"])
    booker_elsewhere = await server2.connect(access_token=session["access_token"])
    async with replay_paused(replica_db):
        b = await book(client, host_session["user"]["id"], slot(days=2))
        # The write positions of both parties were in Redis before the reply,
        # and before the event: a host that lists on the event finds it.
        assert (await host_elsewhere.next_event("booking.created"))["booking"]["id"] == b["id"]
        listed = await host_elsewhere.call("bookings.list", {"role": "host"})
        assert [x["id"] for x in listed["bookings"]] == [b["id"]]
        assert [x["id"] for x in (await booker_elsewhere.call("bookings.list", {}))["bookings"]] == [b["id"]]
        debit = (await booker_elsewhere.call("wallet.transactions", {}))["transactions"][0]
        assert (debit["type"], debit["reference_id"]) == ("booking_payment", b["id"])
        replayed = await replica_db.fetchval("SELECT count(*) FROM bookings WHERE id = $1", uuid.UUID(b["id"]))
        assert replayed == 0  # the replica really was behind: the reads went to the primary
    for c in (client, booker_elsewhere, host_client, host_elsewhere):
        await c.close()


# ---- overlap ----------------------------------------------------------------


async def test_the_database_refuses_an_overlap_written_around_the_code(server, db):
    """No overlap even for a booking the server's code never wrote: busy rows
    follow every write to bookings (sql/008), so the exclusion constraint
    sees bookings inserted, re-activated or moved by hand too."""
    import asyncpg

    host_client, host_id = await host(server, price="20.00")
    client, booker_id = await booker(server)
    taken = await book(client, host_id, slot(days=7, hour=10), hours=2)  # [10:00, 12:00)
    hid, bid = uuid.UUID(host_id), uuid.UUID(booker_id)
    start = slot(days=7, hour=11)

    async def insert(status: str, begin: dt.datetime, hours: int = 1) -> uuid.UUID:
        return await db.fetchval(
            """INSERT INTO bookings (user_id, host_id, start_at, end_at, idempotency_key, status, amount)
               VALUES ($1, $2, $3, $4, $5, $6, 20) RETURNING id""",
            bid, hid, begin, begin + dt.timedelta(hours=hours), key(), status)

    async def busy(booking_id: uuid.UUID) -> list[tuple[str, dt.datetime, dt.datetime]]:
        rows = await db.fetch("""SELECT role, lower(during) AS s, upper(during) AS e FROM booking_busy
                                 WHERE booking_id = $1 ORDER BY role""", booking_id)
        return [(r["role"], r["s"], r["e"]) for r in rows]

    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await insert("confirmed", start)  # [11:00, 12:00) inside the taken one
    # Inactive rows hold nothing; made active over the taken time, refused.
    cancelled = await insert("cancelled", start)
    assert await busy(cancelled) == []
    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await db.execute("UPDATE bookings SET status = 'confirmed' WHERE id = $1", cancelled)
    # Moved clear of it, it may be active; its busy rows move with its times.
    later = slot(days=7, hour=14)
    await db.execute("UPDATE bookings SET start_at = $2, end_at = $3, status = 'confirmed' WHERE id = $1",
                     cancelled, later, later + H)
    assert await busy(cancelled) == [("booker", later, later + H), ("host", later, later + H)]
    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):  # moved back onto the taken one
        await db.execute("UPDATE bookings SET start_at = $2, end_at = $3 WHERE id = $1", cancelled, start, start + H)
    for status in ("completed", "failed", "cancelled"):  # no longer active: the time is free
        await db.execute("UPDATE bookings SET status = 'confirmed' WHERE id = $1", cancelled)
        await db.execute("UPDATE bookings SET status = $2 WHERE id = $1", cancelled, status)
        assert await busy(cancelled) == []
    assert len(await busy(uuid.UUID(taken["id"]))) == 2
    for c in (host_client, client):
        await c.close()


async def test_fifty_bookers_race_for_one_slot_and_exactly_one_wins(server, server2, db):
    host_client, host_id = await host(server, price="30.00")
    bookers = await asyncio.gather(*(booker(server if i % 2 else server2, balance="100.00") for i in range(50)))
    start = slot(days=5)
    outcomes = await asyncio.gather(*(book(c, host_id, start) for c, _ in bookers), return_exceptions=True)
    won = [o for o in outcomes if isinstance(o, dict)]
    lost = [o for o in outcomes if not isinstance(o, dict)]
    assert len(won) == 1 and won[0]["status"] == "confirmed"
    assert all(isinstance(o, RpcError) and o.code.value == "slot_unavailable" for o in lost), lost
    winner = won[0]["user_id"]
    for _, uid in bookers:
        assert await balance(db, uid) == (Decimal("70.00") if uid == winner else Decimal("100.00"))
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE host_id = $1", uuid.UUID(host_id)) == 1
    for c, _ in bookers:
        await c.close()
    await host_client.close()


async def test_overlapping_range_is_refused_and_back_to_back_is_not(server, server2):
    host_client, host_id = await host(server)
    (a, _), (b, _) = await asyncio.gather(booker(server), booker(server2))
    ten = slot(days=4)
    await book(a, host_id, ten, hours=2)  # [10:00, 12:00)
    err = await refused(book(b, host_id, ten + H, hours=2))  # [11:00, 13:00)
    assert err.code.value == "slot_unavailable"
    err = await refused(book(b, host_id, ten - H, hours=2))  # [09:00, 11:00)
    assert err.code.value == "slot_unavailable"
    # Half-open ranges: a booking ending at 12:00 and one starting at 12:00 do not overlap.
    assert (await book(b, host_id, ten + 2 * H))["status"] == "confirmed"
    assert (await book(b, host_id, ten - H))["status"] == "confirmed"
    for c in (a, b, host_client):
        await c.close()


async def test_back_to_back_hours_are_both_confirmed(server, server2):
    host_client, host_id = await host(server2)
    (a, _), (b, _) = await asyncio.gather(booker(server), booker(server2))
    ten = slot(days=4)
    first, second = await asyncio.gather(book(a, host_id, ten), book(b, host_id, ten + H))
    assert first["status"] == second["status"] == "confirmed"
    for c in (a, b, host_client):
        await c.close()


async def test_a_host_who_is_booker_elsewhere_at_that_time_is_refused(server, server2):
    (h1_client, h1), (h2_client, h2) = await asyncio.gather(host(server), host(server2))
    await h1_client.call("wallet.topup", {"amount": "500.00", "idempotency_key": key()})
    ten = slot(days=6)
    await book(h1_client, h2, ten, hours=2)  # h1 is a booker 10:00-12:00
    b_client, _ = await booker(server2)
    err = await refused(book(b_client, h1, ten + H))
    assert err.code.value == "slot_unavailable"
    # ...and the booker is just as busy: a second booking of theirs at that time is refused.
    h3_client, h3 = await host(server)
    err = await refused(book(h1_client, h3, ten + H))
    assert err.code.value == "slot_unavailable"
    assert (await book(b_client, h1, ten + 2 * H))["status"] == "confirmed"
    for c in (h1_client, h2_client, h3_client, b_client):
        await c.close()


async def test_two_users_booking_each_other_at_once_never_deadlock(server, server2):
    (a, a_id), (b, b_id) = await asyncio.gather(host(server), host(server2))
    for c in (a, b):
        await c.call("wallet.topup", {"amount": "500.00", "idempotency_key": key()})
    ten = slot(days=7)
    outcomes = await asyncio.gather(book(a, b_id, ten), book(b, a_id, ten), return_exceptions=True)
    assert sorted(isinstance(o, dict) for o in outcomes) == [False, True]
    assert [o.code.value for o in outcomes if isinstance(o, RpcError)] == ["slot_unavailable"]
    for c in (a, b):
        await c.close()


async def test_bookings_wait_only_for_bookings_that_could_overlap(server, server2, db):
    """A booking holds a lock per person and hour (sql/009), not the host's
    whole wallet: while one hour of a host is held, a booking of that hour
    waits, and a booking of the next hour goes through."""
    host_client, host_id = await host(server)
    (a, _), (b, _) = await asyncio.gather(booker(server), booker(server2))
    ten = slot(days=7, hour=10)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1::text), $2)",
                           host_id, int(ten.timestamp()) // 3600)
        waiting = asyncio.ensure_future(book(a, host_id, ten))
        await until_writes_wait_on_the_lock(db, 1, statement="CALL booking_create%")
        assert (await book(b, host_id, ten + H))["status"] == "confirmed"
        assert not waiting.done()
    assert (await waiting)["status"] == "confirmed"
    for c in (a, b, host_client):
        await c.close()


async def test_cancelled_booking_frees_its_slot(server, server2, db):
    host_client, host_id = await host(server)
    (a, _), (b, _) = await asyncio.gather(booker(server), booker(server2))
    ten = slot(days=4)
    first = await book(a, host_id, ten)
    await a.call("bookings.cancel", {"booking_id": first["id"]})
    assert await db.fetchval("SELECT count(*) FROM booking_busy WHERE booking_id = $1", uuid.UUID(first["id"])) == 0
    assert (await book(b, host_id, ten))["status"] == "confirmed"
    for c in (a, b, host_client):
        await c.close()


async def test_failed_booking_holds_no_slot(server, server2, db):
    host_client, host_id = await host(server, price="80.00")
    (poor, poor_id), (rich, _) = await asyncio.gather(booker(server, balance="10.00"), booker(server2))
    ten = slot(days=4)
    err = await refused(book(poor, host_id, ten))
    assert err.code.value == "insufficient_funds"
    assert await db.fetchval("SELECT count(*) FROM booking_busy WHERE user_id = $1", uuid.UUID(poor_id)) == 0
    assert (await book(rich, host_id, ten))["status"] == "confirmed"
    for c in (poor, rich, host_client):
        await c.close()


# ---- insufficient funds ------------------------------------------------------


async def test_insufficient_funds_stores_a_failed_booking_and_moves_nothing(server, db):
    host_client, host_id = await host(server, price="60.00")
    client, booker_id = await booker(server, balance="100.00")
    k, start = key(), slot(days=2)  # one slot for both calls, even across an hour boundary
    err = await refused(book(client, host_id, start, hours=2, idempotency_key=k))
    assert err.code.value == "insufficient_funds"
    assert err.data["replayed"] is False
    failed = await client.call("bookings.get", {"booking_id": err.data["booking_id"]})
    assert failed["status"] == "failed"
    assert failed["amount"] == "120.00"
    assert failed["conversation_id"] is None
    assert await balance(db, booker_id) == Decimal("100.00")
    bid = uuid.UUID(err.data["booking_id"])
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE reference_id = $1", bid) == 0
    assert await db.fetchval("SELECT count(*) FROM conversations WHERE booking_id = $1", bid) == 0
    assert await db.fetchval(
        "SELECT count(*) FROM payments WHERE booking_id = $1 AND status = 'completed'", bid
    ) == 0
    # The same key answers the same way, even after the booker has topped up.
    await client.call("wallet.topup", {"amount": "500.00", "idempotency_key": key()})
    again = await refused(book(client, host_id, start, hours=2, idempotency_key=k))
    assert again.code.value == "insufficient_funds"
    assert again.data == {"booking_id": err.data["booking_id"], "replayed": True}
    assert await balance(db, booker_id) == Decimal("600.00")
    await client.close()
    await host_client.close()


async def test_one_key_sent_at_once_while_funds_are_short_makes_one_failed_booking(server, server2, db):
    host_client, host_id = await host(server2, price="80.00")
    client, booker_id = await booker(server, balance="50.00")
    k, start = key(), slot(days=4)
    params = {"host_id": host_id, "start_at": start, "end_at": start + H, "idempotency_key": k}
    errors = await asyncio.gather(*(refused(client.call("bookings.create", params)) for _ in range(20)))
    assert {e.code.value for e in errors} == {"insufficient_funds"}
    assert len({e.data["booking_id"] for e in errors}) == 1
    assert sorted(e.data["replayed"] for e in errors) == [False] + [True] * 19
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE idempotency_key = $1", k) == 1
    assert await balance(db, booker_id) == Decimal("50.00")
    # The failed booking's key, from another user, is a conflict.
    other, _ = await booker(server2, balance="500.00")
    assert (await refused(other.call("bookings.create", params))).code.value == "idempotency_conflict"
    for c in (client, host_client, other):
        await c.close()


async def test_top_up_keys_and_booking_keys_are_separate(server, db):
    host_client, host_id = await host(server, price="10.00")
    client, booker_id = await booker(server, balance=None)
    k = key()
    await client.call("wallet.topup", {"amount": "30.00", "idempotency_key": k})
    assert (await book(client, host_id, slot(days=2), idempotency_key=k))["status"] == "confirmed"
    # ...and the top-up's key still replays as the top-up.
    assert (await client.call("wallet.topup", {"amount": "30.00", "idempotency_key": k}))["replayed"] is True
    assert await balance(db, booker_id) == Decimal("20.00")
    await client.close()
    await host_client.close()


async def test_exact_balance_is_enough(server, db):
    host_client, host_id = await host(server, price="25.00")
    client, booker_id = await booker(server, balance="50.00")
    assert (await book(client, host_id, slot(days=2), hours=2))["status"] == "confirmed"
    assert await balance(db, booker_id) == Decimal("0.00")
    await client.close()
    await host_client.close()


# ---- idempotency --------------------------------------------------------------


async def test_one_key_sent_twenty_times_at_once_makes_one_booking(server, server2, db):
    host_client, host_id = await host(server2, price="35.00")
    client, session = await verified_user(server)
    booker_id = session["user"]["id"]
    await client.call("wallet.topup", {"amount": "1000.00", "idempotency_key": key()})
    second_device = await server2.connect(access_token=session["access_token"])
    k, start = key(), slot(days=8)
    params = {"host_id": host_id, "start_at": start, "end_at": start + 2 * H, "idempotency_key": k}
    results = await asyncio.gather(
        *((client if i % 2 else second_device).call("bookings.create", params) for i in range(20))
    )
    assert len({r["booking"]["id"] for r in results}) == 1
    assert sorted(r["replayed"] for r in results) == [False] + [True] * 19
    bid = uuid.UUID(results[0]["booking"]["id"])
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE idempotency_key = $1", k) == 1
    assert await db.fetchval("SELECT count(*) FROM payments WHERE booking_id = $1", bid) == 1
    assert await db.fetchval(
        "SELECT count(*) FROM transactions WHERE reference_id = $1 AND type = 'booking_payment'", bid
    ) == 1
    assert await balance(db, booker_id) == Decimal("930.00")
    for c in (client, second_device, host_client):
        await c.close()


async def _as_if_booked_for(db, booking_id: str, params: dict) -> None:
    """Rewrite a booking as if it had been made with ``params`` (times in the
    past): what a retry sees once the start has passed, without waiting."""
    from protocol.models.bookings import CreateParams
    from server.handlers.bookings import request_hash

    p = CreateParams.model_validate(params)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE bookings SET start_at = $2, end_at = $3, request_hash = $4 WHERE id = $1",
                           uuid.UUID(booking_id), p.start_at, p.end_at, request_hash(p))


async def test_a_retry_after_the_start_gets_the_original_outcome_not_a_time_error(server, db):
    host_client, host_id = await host(server, price="50.00")
    client, booker_id = await booker(server, balance="60.00")
    past = slot(days=0) - H  # the hour that has just started
    # A confirmed booking, and a failed one (its retry must be insufficient_funds again).
    made = await book(client, host_id, slot(days=2))
    failed_key = key()
    failed = await refused(book(client, host_id, slot(days=3), hours=2, idempotency_key=failed_key))
    assert failed.code.value == "insufficient_funds"
    retries = []
    for booking_id, k, hours in ((made["id"], None, 1), (failed.data["booking_id"], failed_key, 2)):
        params = {"host_id": host_id, "start_at": past, "end_at": past + hours * H,
                  "idempotency_key": k or await db.fetchval("SELECT idempotency_key FROM bookings WHERE id = $1",
                                                            uuid.UUID(booking_id))}
        await _as_if_booked_for(db, booking_id, params)
        retries.append(params)
    replay = await client.call("bookings.create", retries[0])
    assert replay["replayed"] is True and replay["booking"]["id"] == made["id"]
    assert replay["booking"]["start_at"] == past
    again = await refused(client.call("bookings.create", retries[1]))
    assert again.code.value == "insufficient_funds" and again.data == {"booking_id": failed.data["booking_id"],
                                                                      "replayed": True}
    assert await balance(db, booker_id) == Decimal("10.00")  # one payment, nothing more
    # A new key with that start is a time error naming start_at.
    err = await refused(client.call("bookings.create", dict(retries[0], idempotency_key=key())))
    assert err.code.value == "invalid_params" and fields(err) == {"start_at"}
    for c in (client, host_client):
        await c.close()


async def test_replay_returns_the_booking_as_it_is_now_and_moves_no_money(server, db):
    host_client, host_id = await host(server)
    client, booker_id = await booker(server, balance="200.00")
    k, start = key(), slot(days=3)
    first = await book(client, host_id, start, idempotency_key=k)
    params = {"host_id": host_id, "start_at": start, "end_at": start + H, "idempotency_key": k}
    replay = await client.call("bookings.create", params)
    assert replay == {"booking": first, "replayed": True}
    assert await balance(db, booker_id) == Decimal("150.00")
    cancelled = (await client.call("bookings.cancel", {"booking_id": first["id"]}))["booking"]
    replay = await client.call("bookings.create", params)
    assert replay == {"booking": cancelled, "replayed": True}
    assert replay["booking"]["status"] == "cancelled"
    assert await balance(db, booker_id) == Decimal("200.00")
    # Same instant written with another offset is the same request.
    local = dict(params, start_at=start.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat())
    assert (await client.call("bookings.create", local))["replayed"] is True
    await client.close()
    await host_client.close()


async def test_key_reused_with_other_params_or_by_another_user_is_a_conflict(server, server2):
    (host_client, host_id), (other_host_client, other_host) = await asyncio.gather(host(server), host(server2))
    (a, _), (b, _) = await asyncio.gather(booker(server), booker(server2))
    k, start = key(), slot(days=3)
    await book(a, host_id, start, idempotency_key=k)
    for changed in (
        {"start_at": start + H, "end_at": start + 2 * H},
        {"end_at": start + 2 * H},
        {"host_id": other_host},
    ):
        params = {"host_id": host_id, "start_at": start, "end_at": start + H, "idempotency_key": k, **changed}
        err = await refused(a.call("bookings.create", params))
        assert err.code.value == "idempotency_conflict", changed
    err = await refused(book(b, host_id, start, idempotency_key=k))
    assert err.code.value == "idempotency_conflict"
    for c in (a, b, host_client, other_host_client):
        await c.close()


async def test_a_refused_call_stores_nothing_and_its_key_can_be_used_again(server, server2):
    host_client, host_id = await host(server)
    (a, _), (b, _) = await asyncio.gather(booker(server), booker(server2))
    start, k = slot(days=3), key()
    taken = await book(a, host_id, start)
    err = await refused(book(b, host_id, start, idempotency_key=k))
    assert err.code.value == "slot_unavailable"
    await a.call("bookings.cancel", {"booking_id": taken["id"]})
    assert (await book(b, host_id, start, idempotency_key=k))["status"] == "confirmed"
    for c in (a, b, host_client):
        await c.close()


async def test_a_failure_late_in_create_leaves_nothing_of_the_booking(server, db):
    """All or nothing: the conversation is written last (sql/006, sql/008);
    a failure there, injected in the database for this booker alone, must
    take the booking, its busy rows, the debit, the payment and the ledger
    line with it."""
    host_client, host_id = await host(server, price="45.00")
    client, booker_id = await booker(server, balance="200.00")
    start, k = slot(days=4), key()
    name = f"test_fail_conversation_{uuid.uuid4().hex}"  # this test's own, never another's
    await db.execute(f"""
        CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected failure'; END $$;
        CREATE TRIGGER {name} BEFORE INSERT ON conversations FOR EACH ROW
          WHEN (NEW.user_id = '{uuid.UUID(booker_id)}'::uuid) EXECUTE FUNCTION {name}();""")
    try:
        err = await refused(book(client, host_id, start, hours=2, idempotency_key=k))
        assert err.code.value == "internal"
    finally:
        await db.execute(f"DROP TRIGGER {name} ON conversations; DROP FUNCTION {name}();")

    bid, hid = uuid.UUID(booker_id), uuid.UUID(host_id)

    async def written() -> dict[str, int]:
        return dict(await db.fetchrow(
            """SELECT (SELECT count(*) FROM bookings WHERE idempotency_key = $1 OR user_id = $2) AS bookings,
                      (SELECT count(*) FROM payments WHERE user_id = $2) AS payments,
                      (SELECT count(*) FROM transactions WHERE user_id = $2 AND type = 'booking_payment') AS ledger,
                      (SELECT count(*) FROM booking_busy WHERE user_id = ANY(ARRAY[$2, $3])) AS busy,
                      (SELECT count(*) FROM conversations WHERE user_id = $2) AS conversations""",
            k, bid, hid))

    assert await written() == {"bookings": 0, "payments": 0, "ledger": 0, "busy": 0, "conversations": 0}
    assert await balance(db, booker_id) == Decimal("200.00")
    assert (await client.call("users.me"))["balance"] == "200.00"
    # Nothing was announced either.
    await client.call("users.update", {"name": "Marker"})
    assert await events_until(client, "Marker") == ["user.updated"]
    # The slot and the key are still free: the same call now books, once,
    # and writes what the failed one did not.
    result = await client.call("bookings.create", {
        "host_id": host_id, "start_at": start, "end_at": start + 2 * H, "idempotency_key": k})
    assert (result["replayed"], result["booking"]["status"]) == (False, "confirmed")
    assert await written() == {"bookings": 1, "payments": 1, "ledger": 1, "busy": 2, "conversations": 1}
    assert await balance(db, booker_id) == Decimal("110.00")
    for c in (client, host_client):
        await c.close()


# ---- validation and refusals ---------------------------------------------------


def _params(host_id: str, start, end, **kw) -> dict:
    return {"host_id": host_id, "start_at": start, "end_at": end, "idempotency_key": key(), **kw}


M = dt.timedelta(minutes=1)
TIME_RULES = [
    # (name, start and end as offsets from a whole hour a day ahead, the failing field)
    ("start not on the hour", 30 * M, 2 * H, "start_at"),
    ("start with seconds", dt.timedelta(seconds=1), 2 * H, "start_at"),
    ("end not on the hour", 0 * H, 90 * M, "end_at"),
    ("zero hours", 0 * H, 0 * H, "end_at"),
    ("end before start", 0 * H, -H, "end_at"),
    ("thirteen hours", 0 * H, 13 * H, "end_at"),
    ("start in the past", -2 * 24 * H, -47 * H, "start_at"),
    ("start this very hour", -24 * H, -23 * H, "start_at"),
    ("more than 90 days ahead", 90 * 24 * H, 90 * 24 * H + H, "start_at"),
]


@pytest.mark.parametrize("name, start, end, field", TIME_RULES, ids=[r[0] for r in TIME_RULES])
async def test_time_rules_are_invalid_params_naming_the_field(server, name, start, end, field):
    async with await server.connect() as c:
        await register(c)
        base = slot(days=1)
        err = await refused(c.call("bookings.create", _params(str(uuid.uuid4()), base + start, base + end)))
        assert err.code.value == "invalid_params"
        assert fields(err) == {field}


def _timestamp(when: dt.datetime, nanoseconds: int = 0) -> msgpack.Timestamp:
    return msgpack.Timestamp(int(when.timestamp()), nanoseconds)


async def test_a_start_or_end_nanoseconds_past_the_hour_is_not_a_whole_hour(server):
    """A datetime holds microseconds; what is below them must not be dropped
    before the whole-hour rule sees it (a booking at :00 confirmed for it)."""
    host_client, host_id = await host(server)
    client, _ = await booker(server)
    start = slot(days=2)
    for start_at, end_at, field in (
        (_timestamp(start, 999), _timestamp(start + H), "start_at"),
        (_timestamp(start, 1), _timestamp(start + H), "start_at"),
        (_timestamp(start), _timestamp(start + H, 1), "end_at"),
        (start.isoformat().replace("+00:00", ".000000001Z"), start + H, "start_at"),
        (start, (start + H).isoformat().replace("+00:00", ".0000000001+00:00"), "end_at"),
    ):
        err = await refused(client.call("bookings.create", _params(host_id, start_at, end_at)))
        assert err.code.value == "invalid_params", (start_at, end_at)
        assert fields(err) == {field}, (start_at, end_at)
    # The same hours to the nanosecond, and zeros past the sixth digit, are whole.
    end_at = (start + H).isoformat().replace("+00:00", ".000000000Z")
    booking = (await client.call("bookings.create", _params(host_id, _timestamp(start), end_at)))["booking"]
    assert (booking["status"], booking["start_at"]) == ("confirmed", start)
    await client.close()
    await host_client.close()


async def test_twelve_hours_and_ninety_days_are_allowed(server):
    host_client, host_id = await host(server, price="1.00")
    client, _ = await booker(server)
    assert (await book(client, host_id, slot(days=10), hours=12))["amount"] == "12.00"
    latest = slot(days=90) - H  # a whole hour within 90 days of now
    assert (await book(client, host_id, latest, hours=1))["status"] == "confirmed"
    await client.close()
    await host_client.close()


async def test_time_without_offset_is_invalid_params_naming_the_field(server):
    async with await server.connect() as c:
        await register(c)
        start = slot(days=1)
        naive = start.replace(tzinfo=None).isoformat()
        err = await refused(c.call("bookings.create", _params(str(uuid.uuid4()), naive, start + H)))
        assert fields(err) == {"start_at"}
        err = await refused(c.call("bookings.create", _params(str(uuid.uuid4()), start, (start + H).replace(tzinfo=None).isoformat())))
        assert fields(err) == {"end_at"}
        # With an offset, RFC 3339 strings are fine (the host is unknown, though).
        err = await refused(c.call("bookings.create", _params(str(uuid.uuid4()), start.isoformat(), (start + H).isoformat().replace("+00:00", "Z"))))
        assert err.code.value == "kyc_required"


async def test_malformed_params_are_invalid_params(server):
    async with await server.connect() as c:
        await register(c)
        start = slot(days=1)
        cases = [
            (_params("not-a-uuid", start, start + H), {"host_id"}),
            (_params(str(uuid.uuid4()), start, start + H, idempotency_key=""), {"idempotency_key"}),
            (_params(str(uuid.uuid4()), start, start + H, idempotency_key="k" * 256), {"idempotency_key"}),
            ({}, {"host_id", "start_at", "end_at", "idempotency_key"}),
            (_params(str(uuid.uuid4()), 1700000000, start + H), {"start_at"}),
        ]
        for params, expected in cases:
            err = await refused(c.call("bookings.create", params))
            assert err.code.value == "invalid_params"
            assert fields(err) == expected, params


async def test_unverified_booker_gets_kyc_required(server):
    host_client, host_id = await host(server)
    async with await server.connect() as c:
        await register(c)
        err = await refused(book(c, host_id, slot(days=2)))
        assert err.code.value == "kyc_required"
    await host_client.close()


async def test_host_must_be_bookable(server, db):
    client, me = await booker(server)
    no_price_client, no_price = await host(server, price=None)
    rejected_client, rejected = await host(server, price="20.00")
    assert (await post_kyc(server, rejected, "rejected")).status == 200
    for host_id in (no_price, rejected, me):
        err = await refused(book(client, host_id, slot(days=2)))
        assert err.code.value == "host_not_bookable", host_id
    err = await refused(book(client, str(uuid.uuid4()), slot(days=2)))
    assert err.code.value == "not_found"
    assert await balance(db, me) == Decimal("1000.00")
    for c in (client, no_price_client, rejected_client):
        await c.close()


# ---- cancel ------------------------------------------------------------------


async def test_booker_cancel_refunds_once_frees_the_slot_and_notifies_both(server, server2, db):
    host_client, host_id = await host(server2, price="45.00")
    client, booker_id = await booker(server, balance="100.00")
    b = await book(client, host_id, slot(days=2))
    await client.next_event("wallet.updated")
    result = await client.call("bookings.cancel", {"booking_id": b["id"]})
    assert result["booking"]["status"] == "cancelled"
    assert result["booking"]["conversation_id"] == b["conversation_id"]
    for c in (client, host_client):
        assert (await c.next_event("booking.cancelled"))["booking"] == result["booking"]
    assert (await client.next_event("wallet.updated"))["balance"] == "100.00"
    bid = uuid.UUID(b["id"])
    assert await balance(db, booker_id) == Decimal("100.00")
    refunds = await db.fetch("SELECT user_id, amount FROM payments WHERE booking_id = $1 AND type = 'refund'", bid)
    assert [(str(r["user_id"]), r["amount"]) for r in refunds] == [(booker_id, Decimal("45.00"))]
    ledger = await db.fetch(
        "SELECT amount, type FROM transactions WHERE reference_id = $1 ORDER BY amount", bid
    )
    assert [(t["amount"], t["type"]) for t in ledger] == [
        (Decimal("-45.00"), "booking_payment"), (Decimal("45.00"), "booking_refund")
    ]
    assert await db.fetchval("SELECT count(*) FROM booking_busy WHERE booking_id = $1", bid) == 0
    # Cancelling again returns it unchanged, and money moves once.
    again = await client.call("bookings.cancel", {"booking_id": b["id"]})
    assert again == result
    assert await balance(db, booker_id) == Decimal("100.00")
    await client.close()
    await host_client.close()


async def test_host_may_cancel_and_the_booker_is_refunded(server, server2, db):
    host_client, host_id = await host(server)
    client, booker_id = await booker(server2, balance="100.00")
    b = await book(client, host_id, slot(days=2))
    result = await host_client.call("bookings.cancel", {"booking_id": b["id"]})
    assert result["booking"]["status"] == "cancelled"
    assert (await client.next_event("booking.cancelled"))["booking"]["id"] == b["id"]
    assert await balance(db, booker_id) == Decimal("100.00")
    assert await balance(db, host_id) == Decimal("0.00")
    await client.close()
    await host_client.close()


async def test_a_host_cancel_notifies_both_and_only_the_booker_gets_wallet_updated(server, server2, db):
    host_client, host_id = await host(server)
    client, booker_id = await booker(server2, balance="100.00")
    b = await book(client, host_id, slot(days=2))
    assert (await client.next_event("wallet.updated"))["balance"] == "50.00"
    result = await host_client.call("bookings.cancel", {"booking_id": b["id"]})
    assert (await client.next_event("booking.cancelled"))["booking"] == result["booking"]
    assert (await client.next_event("wallet.updated"))["balance"] == "100.00"
    # The host's own later change is the marker: up to it, the host got the
    # booking's two events and no wallet.updated, from either.
    await host_client.call("users.update", {"name": "Marker"})
    names = await events_until(host_client, "Marker")
    assert "booking.created" in names and "booking.cancelled" in names
    assert "wallet.updated" not in names
    await client.close()
    await host_client.close()


async def test_concurrent_cancels_refund_exactly_once(server, server2, db):
    host_client, host_id = await host(server2)
    client, booker_id = await booker(server, balance="100.00")
    b = await book(client, host_id, slot(days=2))
    results = await asyncio.gather(
        *((client if i % 2 else host_client).call("bookings.cancel", {"booking_id": b["id"]}) for i in range(10))
    )
    assert {r["booking"]["status"] for r in results} == {"cancelled"}
    assert await balance(db, booker_id) == Decimal("100.00")
    assert await db.fetchval(
        "SELECT count(*) FROM transactions WHERE reference_id = $1 AND type = 'booking_refund'", uuid.UUID(b["id"])
    ) == 1
    await client.close()
    await host_client.close()


async def test_cancel_after_start_or_of_a_failed_booking_is_invalid_state(server, db):
    host_client, host_id = await host(server, price="50.00")
    client, booker_id = await booker(server, balance="60.00")
    b = await book(client, host_id, slot(days=2))
    await move_start_to_past(db, b["id"])
    err = await refused(client.call("bookings.cancel", {"booking_id": b["id"]}))
    assert err.code.value == "invalid_state"
    failed = await refused(book(client, host_id, slot(days=3)))
    err = await refused(client.call("bookings.cancel", {"booking_id": failed.data["booking_id"]}))
    assert err.code.value == "invalid_state"
    assert await balance(db, booker_id) == Decimal("10.00")
    await client.close()
    await host_client.close()


async def test_cancel_whose_refund_would_overflow_the_booker_balance_is_invalid_state_and_moves_nothing(
    server, server2, db
):
    host_client, host_id = await host(server2, price="50.00")
    client, booker_id = await booker(server, balance="100.00")
    b = await book(client, host_id, slot(days=2))
    bid = uuid.UUID(b["id"])
    # users.balance is DECIMAL(12,2): a refund of 50.00 cannot be stored on top of this.
    full = Decimal("9999999960.00")
    await db.execute("UPDATE users SET balance = $2 WHERE id = $1", uuid.UUID(booker_id), full)
    busy = await db.fetchval("SELECT count(*) FROM booking_busy WHERE booking_id = $1", bid)
    err = await refused(client.call("bookings.cancel", {"booking_id": b["id"]}))
    assert err.code.value == "invalid_state" and "limit" in err.message
    # The host is refused too, without learning anything of the booker's wallet.
    err = await refused(host_client.call("bookings.cancel", {"booking_id": b["id"]}))
    assert err.code.value == "invalid_state"
    assert "limit" not in err.message and "balance" not in err.message
    assert (await client.call("bookings.get", {"booking_id": b["id"]}))["status"] == "confirmed"
    assert await balance(db, booker_id) == full
    assert await db.fetchval("SELECT count(*) FROM payments WHERE booking_id = $1 AND type = 'refund'", bid) == 0
    assert await db.fetchval(
        "SELECT count(*) FROM transactions WHERE reference_id = $1 AND type = 'booking_refund'", bid
    ) == 0
    assert busy > 0 and await db.fetchval("SELECT count(*) FROM booking_busy WHERE booking_id = $1", bid) == busy
    # Once the balance can take the refund, the cancel goes through, refunded once.
    await db.execute("UPDATE users SET balance = $2 WHERE id = $1", uuid.UUID(booker_id), Decimal("50.00"))
    assert (await client.call("bookings.cancel", {"booking_id": b["id"]}))["booking"]["status"] == "cancelled"
    assert await balance(db, booker_id) == Decimal("100.00")
    assert await db.fetchval("SELECT count(*) FROM payments WHERE booking_id = $1 AND type = 'refund'", bid) == 1
    await client.close()
    await host_client.close()


async def test_a_third_user_gets_not_found_everywhere(server, server2):
    host_client, host_id = await host(server)
    client, _ = await booker(server)
    b = await book(client, host_id, slot(days=2))
    stranger, _ = await booker(server2)
    for method in ("bookings.get", "bookings.cancel"):
        err = await refused(stranger.call(method, {"booking_id": b["id"]}))
        assert err.code.value == "not_found", method
    assert (await stranger.call("bookings.list", {}))["bookings"] == []
    err = await refused(client.call("bookings.get", {"booking_id": str(uuid.uuid4())}))
    assert err.code.value == "not_found"
    assert (await client.call("bookings.get", {"booking_id": b["id"]}))["status"] == "confirmed"
    assert (await host_client.call("bookings.get", {"booking_id": b["id"]})) == b
    for c in (client, stranger, host_client):
        await c.close()


# ---- list ------------------------------------------------------------------------


async def test_list_by_role_and_status_newest_start_first_with_keyset_pages(server, server2):
    (me, me_id), (h1_client, h1), (h2_client, h2) = await asyncio.gather(
        host(server, price="10.00"), host(server), host(server2)
    )
    await me.call("wallet.topup", {"amount": "1000.00", "idempotency_key": key()})
    someone, _ = await booker(server2)
    day = slot(days=20)
    as_booker = [await book(me, h1, day + i * H) for i in range(3)] + [await book(me, h2, day + 5 * H)]
    as_host = [await book(someone, me_id, day + i * H) for i in (10, 12)]
    cancelled = (await me.call("bookings.cancel", {"booking_id": as_booker[0]["id"]}))["booking"]
    as_booker[0] = cancelled

    def ids(items):
        return [x["id"] for x in items]

    newest_first = lambda items: sorted(items, key=lambda x: (x["start_at"], x["id"]), reverse=True)  # noqa: E731
    assert ids((await me.call("bookings.list", {"role": "booker"}))["bookings"]) == ids(newest_first(as_booker))
    assert ids((await me.call("bookings.list", {"role": "host"}))["bookings"]) == ids(newest_first(as_host))
    everything = newest_first(as_booker + as_host)
    assert ids((await me.call("bookings.list", {}))["bookings"]) == ids(everything)
    assert ids((await me.call("bookings.list", {"status": "cancelled"}))["bookings"]) == [cancelled["id"]]
    assert len((await me.call("bookings.list", {"status": "confirmed", "role": "booker"}))["bookings"]) == 3

    pages, cursor = [], None
    while True:
        page = await me.call("bookings.list", {"limit": 2, **({"cursor": cursor} if cursor else {})})
        pages.append(ids(page["bookings"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids(everything[i : i + 2]) for i in range(0, len(everything), 2)]
    for c in (me, h1_client, h2_client, someone):
        await c.close()


async def test_list_gives_twenty_bookings_a_page_by_default(server):
    host_client, host_id = await host(server, price="1.00")
    client, _ = await booker(server, balance="100.00")
    made = [await book(client, host_id, slot(days=2, hour=i)) for i in range(21)]
    first = await client.call("bookings.list", {})
    assert len(first["bookings"]) == 20 and first["next_cursor"] is not None
    rest = await client.call("bookings.list", {"cursor": first["next_cursor"]})
    assert len(rest["bookings"]) == 1 and rest["next_cursor"] is None
    assert sorted(b["id"] for b in first["bookings"] + rest["bookings"]) == sorted(b["id"] for b in made)
    await client.close()
    await host_client.close()


async def test_list_params_are_validated(server):
    async with await server.connect() as c:
        await register(c)
        for params, field in (
            ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "5"}, "limit"),
            ({"role": "guest"}, "role"), ({"status": "lost"}, "status"), ({"cursor": "garbage!"}, "cursor"),
            ({"cursor": ""}, "cursor"),
        ):
            err = await refused(c.call("bookings.list", params))
            assert err.code.value == "invalid_params"
            assert fields(err) == {field}, params
        assert (await c.call("bookings.list", {"limit": 100}))["next_cursor"] is None
