"""Nothing committed goes unannounced: user events and chat messages that
were committed while Redis was down, or by a process that died before it
published them, reach the sockets that follow them within 5 s (of Redis
answering again), and no live user event arrives twice."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from protocol.client import ConnectionClosed
from protocol.errors import RpcError
from tests.booking_support import book, key, slot
from tests.chat_helpers import messages_until, open_room
from tests.conftest import ServerProcess, register, wait_subscriber_connected

DEADLINE_S = 5.0  # the contract's bound


async def last_seq(client) -> int:
    return (await client.call("users.me"))["event_seq"]


async def test_what_was_committed_while_redis_was_down_arrives_within_5s_of_it_answering(server, server2, stack):
    room = await open_room(server, server2)  # booker on server, host on server2
    booker, host = room.booker.client, room.host.client
    try:
        cid = room.conversation_id
        await host.call("chat.join", {"conversation_id": cid})
        other = await book(booker, room.host.user_id, slot(days=84))
        booker_before, host_before = await last_seq(booker), await last_seq(host)
        await booker.wait_numbered(range(1, booker_before + 1))
        await host.wait_numbered(range(1, host_before + 1))

        await asyncio.to_thread(stack.stop_redis)
        try:
            made = await book(booker, room.host.user_id, slot(days=85))
            await booker.call("bookings.cancel", {"booking_id": other["id"]})
            sent = await booker.call("chat.send", {"conversation_id": cid, "content": "while redis was down"})
            await booker.call("wallet.topup", {"amount": "5.00", "idempotency_key": key()})
        finally:
            await asyncio.to_thread(stack.start_redis)
        answering = asyncio.get_running_loop().time()

        # booking.created + wallet.updated, booking.cancelled + wallet.updated, wallet.updated
        booker_after, host_after = booker_before + 5, host_before + 2
        assert await last_seq(booker) == booker_after and await last_seq(host) == host_after
        await asyncio.gather(
            booker.wait_numbered(range(1, booker_after + 1), timeout=DEADLINE_S),
            host.wait_numbered(range(1, host_after + 1), timeout=DEADLINE_S),
            messages_until(host, sent["message"]["seq"], timeout=DEADLINE_S),
        )
        assert asyncio.get_running_loop().time() - answering <= DEADLINE_S
        assert host.numbered[host_before + 1][1]["booking"]["id"] == made["id"]
        assert host.numbered[host_after][0] == "booking.cancelled"
        assert not booker.numbered_again and not host.numbered_again
    finally:
        await room.close()
        for s in (server, server2):
            await wait_subscriber_connected(s)


@pytest.fixture
async def doomed(stack):
    """A test server process that a test ends through its seams."""
    proc = ServerProcess(stack, test_methods=True)
    await proc.start()
    yield proc
    await proc.stop()


async def test_events_a_process_committed_but_never_published_reach_the_other_process_within_5s(server, doomed):
    room = await open_room(server, server)
    booker, host = room.booker.client, room.host.client
    try:
        await host.call("chat.join", {"conversation_id": room.conversation_id})
        before = await last_seq(booker)
        await booker.wait_numbered(range(1, before + 1))
        seam = await doomed.connect()
        with pytest.raises((ConnectionClosed, asyncio.TimeoutError)):
            await seam.call("test.topup_then_exit", {"user_id": room.booker.user_id, "amount": "7.00"}, timeout=10)
        await seam.close()
        committed = asyncio.get_running_loop().time()
        await booker.wait_numbered([before + 1], timeout=DEADLINE_S)
        assert booker.numbered[before + 1] == ("wallet.updated", {"balance": "97.00"})
        assert asyncio.get_running_loop().time() - committed <= DEADLINE_S
        assert not booker.numbered_again
    finally:
        await room.close()


async def test_a_message_a_process_committed_but_never_published_reaches_joined_sockets_within_5s(server, stack):
    room = await open_room(server, server)
    host = room.host.client
    proc = await ServerProcess(stack, test_methods=True).start()
    try:
        joined = await host.call("chat.join", {"conversation_id": room.conversation_id})
        seam = await proc.connect()
        with pytest.raises((ConnectionClosed, asyncio.TimeoutError)):
            await seam.call("test.send_then_exit", {"conversation_id": room.conversation_id,
                                                    "user_id": room.booker.user_id, "content": "last words"}, timeout=10)
        await seam.close()
        assert await messages_until(host, joined["last_seq"] + 1, timeout=DEADLINE_S) == [joined["last_seq"] + 1]
    finally:
        await proc.stop()
        await room.close()


async def test_resume_during_a_booking_storm_and_live_events_cover_every_seq_once(server, server2):
    room = await open_room(server, server2)
    host_party = room.host
    bookers = [room.booker.client]
    try:
        for _ in range(5):
            extra = await open_room(server, server2)
            bookers.append(extra.booker.client)
            await extra.host.close()
        storm = asyncio.gather(*(book(c, host_party.user_id, slot(days=86, hour=i * 6 + j))
                                 for i, c in enumerate(bookers) for j in range(6)))
        late = await server.connect(access_token=host_party.access_token)
        host_party.extra.append(late)
        await late.call("auth.authenticate", {"access_token": host_party.access_token})
        resumed = await late.call("events.resume", {"since_seq": 0})
        await storm
        final = await last_seq(late)
        await late.wait_numbered([s for s in range(1, final + 1)
                                  if s not in {e["seq"] for e in resumed["events"]}], timeout=DEADLINE_S)
        covered = {e["seq"] for e in resumed["events"]} | set(late.numbered)
        assert covered == set(range(1, final + 1))
        assert not late.numbered_again
    finally:
        await room.close()
        for c in bookers[1:]:
            await c.close()


async def test_kill_9_of_one_process_under_load_loses_nothing(stack, server2, db):
    """Bookers on a process killed with SIGKILL mid-load: every booking all
    or nothing, the ledger holds, and their reconnected sockets on the other
    process, resuming, have every event (live or resumed) exactly once."""
    from tests.test_ledger import check_ledger

    victim = await ServerProcess(stack).start()
    rooms = [await open_room(victim, server2) for _ in range(4)]
    try:
        for r in rooms:
            await r.booker.client.call("wallet.topup", {"amount": "500.00", "idempotency_key": key()})

        async def load(i: int, client) -> None:
            for j in range(24 * 80):
                try:
                    made = await book(client, rooms[i].host.user_id, slot(days=1, hour=j))
                    if j % 3 == 0:
                        await client.call("bookings.cancel", {"booking_id": made["id"]})
                    await client.call("wallet.topup", {"amount": "1.00", "idempotency_key": key()})
                except RpcError:
                    continue  # a refusal (say, funds): business as usual
                except (ConnectionClosed, ConnectionError, asyncio.TimeoutError):
                    return

        loads = [asyncio.create_task(load(i, r.booker.client)) for i, r in enumerate(rooms)]
        for r in rooms:  # some of the load has committed
            await r.booker.client.wait_numbered([8], timeout=30)
        victim.proc.kill()
        await asyncio.wait_for(asyncio.gather(*loads), 30)

        users = [uuid.UUID(r.booker.user_id) for r in rooms] + [uuid.UUID(r.host.user_id) for r in rooms]
        await check_ledger(db, users)
        unannounced = await db.fetchval(
            """SELECT count(*) FROM bookings b CROSS JOIN LATERAL (VALUES (b.user_id), (b.host_id)) AS p(u)
               WHERE b.user_id = ANY($1) AND b.status <> 'failed' AND NOT EXISTS (
                 SELECT 1 FROM user_events e WHERE e.user_id = p.u AND e.event = 'booking.created'
                   AND e.data->'booking'->>'id' = b.id::text)""",
            users,
        )
        assert unannounced == 0

        for r in rooms:
            old = r.booker.client
            again = await server2.connect(access_token=r.booker.access_token)
            r.booker.extra.append(again)
            since = 0  # what the app holds without a gap
            while since + 1 in old.numbered:
                since += 1
            resumed = await again.call("events.resume", {"since_seq": since})
            assert not resumed["has_more"] and not resumed["truncated"]
            got = set(range(1, since + 1)) | {e["seq"] for e in resumed["events"]}
            assert got == set(range(1, resumed["last_seq"] + 1))
            # The user's newest event, from the primary: the write that made it
            # may have died with the victim before its reply (and before its
            # position reached Redis), so a replica may not have it yet.
            newest = await db.fetchval("SELECT coalesce(max(seq), 0) FROM user_events WHERE user_id = $1",
                                       uuid.UUID(r.booker.user_id))
            assert resumed["last_seq"] == newest
            assert not old.numbered_again
    finally:
        await victim.stop()
        for r in rooms:
            await r.close()


async def test_an_event_published_again_by_the_relay_is_not_delivered_twice(server, db):
    client = await server.connect()
    try:
        user = uuid.UUID((await register(client))["user"]["id"])
        await client.call("wallet.topup", {"amount": "3.00", "idempotency_key": key()})
        await client.wait_numbered([1])

        async def until_published() -> None:
            for _ in range(200):  # the relay's passes: nothing to await from outside
                if await db.fetchval("SELECT published FROM user_events WHERE user_id = $1 AND seq = 1", user):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the event was never marked published")

        await until_published()  # the fast path's mark
        # As if its publish had never been known: the relay publishes it again.
        await db.execute("UPDATE user_events SET published = false, created_at = created_at - interval '10 s' "
                         "WHERE user_id = $1", user)
        await until_published()  # the relay's
        # Published after the repeat on the same channel: once it is here, so is the repeat.
        await client.call("wallet.topup", {"amount": "4.00", "idempotency_key": key()})
        await client.wait_numbered([2])
        assert sorted(client.numbered) == [1, 2]
        assert not client.numbered_again
    finally:
        await client.close()
