"""Durable user events: numbered per user without gaps, stored with the
change, live frames carrying ``seq``, ``users.me``'s ``event_seq``, and
``events.resume`` (paging, retention)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from protocol.errors import RpcError
from tests.booking_support import book, booker, host, key, move_to_past, slot
from tests.conftest import ServerProcess, register



async def resume_all(client, since: int = 0) -> list[tuple[int, str, dict]]:
    """Every stored event after ``since``, page by page."""
    out: list[tuple[int, str, dict]] = []
    for _ in range(100):
        r = await client.call("events.resume", {"since_seq": since})
        out += [(e["seq"], e["event"], e["data"]) for e in r["events"]]
        if not r["has_more"]:
            return out
        since = r["events"][-1]["seq"]
    raise AssertionError("events.resume never ended")


async def test_each_change_is_one_numbered_event_per_party_live_and_in_resume(server, server2):
    host_client, host_id = await host(server2)  # user.updated (KYC) 1, user.updated (price) 2
    client, booker_id = await booker(server)  # user.updated (KYC) 1, wallet.updated (top-up) 2
    try:
        await host_client.wait_numbered([1, 2])
        await client.wait_numbered([1, 2])
        booking = await book(client, host_id, slot(days=3))
        await client.call("bookings.cancel", {"booking_id": booking["id"]})
        await client.wait_numbered(range(1, 7))
        await host_client.wait_numbered(range(1, 5))
        assert [client.numbered[s][0] for s in range(1, 7)] == [
            "user.updated", "wallet.updated", "booking.created", "wallet.updated", "booking.cancelled", "wallet.updated"]
        assert [host_client.numbered[s][0] for s in range(1, 5)] == [
            "user.updated", "user.updated", "booking.created", "booking.cancelled"]
        assert client.numbered[3][1]["booking"]["id"] == booking["id"]
        assert host_client.numbered[3][1]["booking"]["id"] == booking["id"]
        assert client.numbered[6][1]["balance"] == "1000.00"

        me = await client.call("users.me")
        assert me["event_seq"] == 6
        assert (await host_client.call("users.me"))["event_seq"] == 4
        # A user.updated's user carries its own seq.
        assert host_client.numbered[2][1]["user"]["event_seq"] == 2

        stored = await resume_all(client)
        assert [s for s, _, _ in stored] == list(range(1, 7))
        for seq, name, data in stored:
            assert (name, data) == client.numbered[seq]
        r = await client.call("events.resume", {"since_seq": 4})
        assert [e["seq"] for e in r["events"]] == [5, 6]
        assert r["last_seq"] == 6 and r["has_more"] is False and r["truncated"] is False
        assert not client.numbered_again and not host_client.numbered_again
    finally:
        await client.close()
        await host_client.close()


async def test_a_new_user_has_no_events_and_resume_needs_a_valid_since_seq(server):
    client = await server.connect()
    try:
        session = await register(client)
        assert session["user"]["event_seq"] == 0
        r = await client.call("events.resume", {"since_seq": 0})
        assert r == {"events": [], "last_seq": 0, "has_more": False, "truncated": False}
        for bad in (-1, "1", 1.5, None):
            with pytest.raises(RpcError) as err:
                await client.call("events.resume", {"since_seq": bad})
            assert err.value.code == "invalid_params"
        # Numbers the server never gave: the app must re-read its state.
        r = await client.call("events.resume", {"since_seq": 7})
        assert r["events"] == [] and r["last_seq"] == 0 and r["truncated"] is True
    finally:
        await client.close()


async def test_resume_pages_500_at_a_time(server, db):
    client = await server.connect()
    try:
        user = uuid.UUID((await register(client))["user"]["id"])
        n = 1203
        data = [json.dumps({"balance": f"{i}.00"}) for i in range(n)]
        await db.execute("SELECT user_events_add($1::uuid[], $2::text[], $3::jsonb[])",
                         [user] * n, ["wallet.updated"] * n, data)
        pages = []
        since = 0
        for _ in range(5):
            r = await client.call("events.resume", {"since_seq": since})
            pages.append(r)
            if not r["has_more"]:
                break
            since = r["events"][-1]["seq"]
        assert [len(p["events"]) for p in pages] == [500, 500, 203]
        assert [p["has_more"] for p in pages] == [True, True, False]
        seqs = [e["seq"] for p in pages for e in p["events"]]
        assert seqs == list(range(1, n + 1))
        assert all(p["last_seq"] == n and not p["truncated"] for p in pages)
        assert pages[2]["events"][-1]["data"] == {"balance": f"{n - 1}.00"}
    finally:
        await client.close()


@pytest.fixture
async def short_retention(stack):
    # Its cleanup deletes every user's events older than a second: stopped
    # as soon as the test that needs it is over.
    proc = await ServerProcess(stack, EVENT_RETENTION_S="1", SESSION_CLEANUP_INTERVAL_S="0.3").start()
    yield proc
    await proc.stop()


async def test_resume_says_truncated_once_retention_deleted_events_after_since_seq(short_retention, db):
    client = await short_retention.connect()
    try:
        user = (await register(client))["user"]["id"]
        for amount in ("1.00", "2.00"):
            await client.call("wallet.topup", {"amount": amount, "idempotency_key": key()})
        await client.wait_numbered([1, 2])
        for _ in range(200):  # the cleanup's passes: nothing to await from outside
            if not await db.fetchval("SELECT count(*) FROM user_events WHERE user_id = $1", uuid.UUID(user)):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("retention never deleted the events")
        r = await client.call("events.resume", {"since_seq": 0})
        assert r == {"events": [], "last_seq": 2, "has_more": False, "truncated": True}
        r = await client.call("events.resume", {"since_seq": 2})
        assert r == {"events": [], "last_seq": 2, "has_more": False, "truncated": False}
        assert (await client.call("users.me"))["event_seq"] == 2
        await client.call("wallet.topup", {"amount": "3.00", "idempotency_key": key()})
        r = await client.call("events.resume", {"since_seq": 1})
        assert [e["seq"] for e in r["events"]] == [3] and r["truncated"] is True
        r = await client.call("events.resume", {"since_seq": 2})
        assert [e["seq"] for e in r["events"]] == [3] and r["truncated"] is False
    finally:
        await client.close()


async def test_a_host_booked_by_many_at_once_gets_every_seq_once(server, server2, db):
    host_client, host_id = await host(server, price="1.00")
    bookers = [await booker(server2 if i % 2 else server, balance="100.00") for i in range(12)]
    try:
        await host_client.wait_numbered([1, 2])
        await asyncio.gather(*(book(c, host_id, slot(days=5, hour=i)) for i, (c, _) in enumerate(bookers)))
        await host_client.wait_numbered(range(1, 15))
        assert sorted(host_client.numbered) == list(range(1, 15))
        assert not host_client.numbered_again
        stored = await resume_all(host_client)
        assert [s for s, _, _ in stored] == list(range(1, 15))
        for c, _ in bookers:
            await c.wait_numbered(range(1, 5))
            assert [c.numbered[s][0] for s in (3, 4)] == ["booking.created", "wallet.updated"]
    finally:
        await host_client.close()
        for c, _ in bookers:
            await c.close()


async def test_settlement_numbers_booking_completed_for_both_parties_and_the_hosts_wallet(server, db):
    host_client, host_id = await host(server)
    client, _ = await booker(server)
    try:
        booking = await book(client, host_id, slot(days=2))
        await client.wait_numbered(range(1, 5))
        await host_client.wait_numbered(range(1, 4))
        await move_to_past(db, booking["id"])
        await client.wait_numbered([5], timeout=15)
        await host_client.wait_numbered([4, 5], timeout=15)
        assert client.numbered[5][0] == "booking.completed"
        assert client.numbered[5][1]["booking"]["status"] == "completed"
        assert [host_client.numbered[s][0] for s in (4, 5)] == ["booking.completed", "wallet.updated"]
        assert host_client.numbered[5][1] == {"balance": "50.00"}
        assert [s for s, _, _ in await resume_all(host_client)] == [1, 2, 3, 4, 5]
    finally:
        await client.close()
        await host_client.close()
