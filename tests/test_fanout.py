"""Live fan-out across server processes: every joined socket gets every
message exactly once, joins neither miss nor repeat, Redis can restart, and a
socket that stops reading is closed without slowing anyone else."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import uuid

import pytest

from tests.chat_helpers import RawSocket, _next_slot, collect_messages, messages_until, open_room, send_many
from tests.conftest import (ServerProcess, metric_sum, ops_status, readyz, redis_writes_hung, replay_paused,
                            replica_caught_up, scrape, until_not_ready, until_replica_has_replayed,
                            wait_subscriber_connected)

STORM = 200


def exactly_once(seqs: list[int], n: int) -> None:
    dupes = [s for s, k in collections.Counter(seqs).items() if k > 1]
    assert not dupes, f"duplicates: {dupes[:10]}"
    missing = sorted(set(range(1, n + 1)) - set(seqs))
    assert not missing, f"missing: {missing[:10]}"
    assert len(seqs) == n


async def test_concurrent_sends_reach_every_joined_socket_exactly_once(server, server2):
    room = await open_room(server, server2)  # booker on process 1, host on process 2
    try:
        conv = room.conversation_id
        booker, host = room.booker.client, room.host.client
        booker2 = await room.booker.socket(server2)
        sockets = [booker, host, booker2]
        for c in sockets:
            await c.call("chat.join", {"conversation_id": conv})
        receiving = [asyncio.create_task(collect_messages(c, STORM)) for c in sockets]
        sent = await asyncio.gather(
            send_many(booker, conv, STORM // 2, prefix="b"), send_many(host, conv, STORM // 2, prefix="h")
        )
        assert sorted(m["seq"] for part in sent for m in part) == list(range(1, STORM + 1))
        got = await asyncio.gather(*receiving)
        # Nothing more is on its way: a last message arrives right after.
        marker = (await host.call("chat.send", {"conversation_id": conv, "content": "end"}))["message"]
        for c, seqs in zip(sockets, got):
            exactly_once(seqs, STORM)
            assert await messages_until(c, marker["seq"]) == [marker["seq"]]
    finally:
        await room.close()


async def test_join_during_a_send_storm_neither_misses_nor_repeats(server, server2):
    room = await open_room(server, server2)
    try:
        conv = room.conversation_id
        booker, host = room.booker.client, room.host.client
        # Keep the room subscribed on process 1 throughout, so joins there
        # find the subscription already in effect; process 2 has no follower.
        await booker.call("chat.join", {"conversation_id": conv})
        total = 300
        storm = asyncio.gather(
            send_many(booker, conv, total // 2, prefix="b", in_flight=8),
            send_many(host, conv, total // 2, prefix="h", in_flight=8),
        )
        joiners = []
        for i in range(6):
            c = await (room.host if i % 2 else room.booker).socket(server2 if i % 3 else server)
            joined = await c.call("chat.join", {"conversation_id": conv, "since_seq": 0})
            joiners.append((c, joined))
            await collect_messages(booker, 30)  # spread the joins over the storm
        await storm
        for c, joined in joiners:
            returned = [m["seq"] for m in joined["messages"]]
            assert returned == list(range(1, joined["last_seq"] + 1))
            live = await collect_messages(c, total - joined["last_seq"])
            exactly_once(returned + live, total)
        marker = (await host.call("chat.send", {"conversation_id": conv, "content": "end"}))["message"]
        for c, _ in joiners:
            assert await messages_until(c, marker["seq"]) == [marker["seq"]]
    finally:
        await room.close()


async def test_redis_restart_loses_no_acknowledged_message(stack, server, server2):
    room = await open_room(server, server2)
    try:
        conv = room.conversation_id
        booker, host = room.booker.client, room.host.client
        booker2 = await room.booker.socket(server2)
        sockets = [booker, host, booker2]
        for c in sockets:
            await c.call("chat.join", {"conversation_id": conv})
        acked: list[dict] = []
        acked += await send_many(booker, conv, 20, prefix="before")
        try:
            await asyncio.to_thread(stack.stop_redis)
            body = await until_not_ready(server)
            assert body["checks"]["redis"] is False and (await ops_status(server))["redis"]["ok"] is False
            # Calls still commit and answer while Redis is down.
            acked += await send_many(booker, conv, 10, prefix="during-b", in_flight=4)
            # A join while Redis is away answers from PostgreSQL at once...
            joined_away = await room.host.socket(server)
            during = await joined_away.call("chat.join", {"conversation_id": conv, "since_seq": 0})
            assert [m["seq"] for m in during["messages"]] == list(range(1, 31))
            acked += await send_many(host, conv, 10, prefix="during-h", in_flight=4)
            history = await host.call("chat.history", {"conversation_id": conv, "limit": 100})
            assert len(history["messages"]) == 40
        finally:
            await asyncio.to_thread(stack.start_redis)
        for s in (server, server2):
            await wait_subscriber_connected(s)
        acked += await send_many(host, conv, 20, prefix="after")
        seqs = sorted(m["seq"] for m in acked)
        assert seqs == list(range(1, 61))
        # Every acknowledged message can be fetched again...
        fresh = await room.booker.socket(server2)
        joined = await fresh.call("chat.join", {"conversation_id": conv, "since_seq": 0})
        assert [m["seq"] for m in joined["messages"]] == seqs
        # ...and live delivery works again. The rooms were repaired from
        # PostgreSQL after resubscribing, so every socket even has them all.
        for c in sockets:
            exactly_once(await collect_messages(c, 60), 60)
        # ...and once it is back that socket gets the rest, once.
        exactly_once(list(range(1, 31)) + await collect_messages(joined_away, 30), 60)
        last = (await booker.call("chat.send", {"conversation_id": conv, "content": "live"}))["message"]
        for c in [*sockets, fresh, joined_away]:
            assert await messages_until(c, last["seq"]) == [last["seq"]]
    finally:
        await room.close()


@pytest.fixture
async def quick_redis_timeout_server(stack):
    proc = await ServerProcess(stack, REDIS_TIMEOUT_S=0.5, REDIS_PROBE_INTERVAL_S=0.1).start()
    yield proc
    await proc.stop()


async def test_a_hung_redis_is_waited_for_once_and_loses_nothing(quick_redis_timeout_server, server2, redis,
                                                                  db, replica_db):
    proc = quick_redis_timeout_server
    room = await open_room(proc)
    try:
        conv = room.conversation_id
        booker, host = room.booker.client, room.host.client
        for c in (booker, host):
            await c.call("chat.join", {"conversation_id": conv})
        booker2 = await room.booker.socket(server2)
        async with contextlib.AsyncExitStack() as replica_lagging:
            async with redis_writes_hung(redis) as witness:
                # The first call meets the hang and waits out REDIS_TIMEOUT_S once; it committed.
                sent = [(await booker.call("chat.send", {"conversation_id": conv, "content": "first"}))["message"]]
                status, _ = await readyz(proc)
                assert status == 503 and (await ops_status(proc))["redis"]["sending"] is False
                # From here the replica lags. Everything written before, the
                # first call's write position included (Redis may still take
                # it once it takes writes again), is replayed there.
                paused_at = await replica_caught_up(db, replica_db)
                await replica_lagging.enter_async_context(replay_paused(replica_db))
                # Every call after the first answers without waiting for
                # Redis: messages, a profile change, a booking, replica reads.
                for i in range(5):
                    sent.append((await booker.call("chat.send", {"conversation_id": conv, "content": f"{i}"}))["message"])
                await booker.call("users.update", {"name": "Renamed While Redis Hung"})
                start = _next_slot()
                booked = await booker.call("bookings.create", {
                    "host_id": room.host.user_id, "start_at": start.isoformat(),
                    "end_at": (start + dt.timedelta(hours=1)).isoformat(), "idempotency_key": uuid.uuid4().hex,
                })
                assert booked["booking"]["status"] == "confirmed"
                # A login cannot count failures without Redis: it is refused at once.
                anonymous = await proc.connect()
                login = await anonymous.call_raw("auth.login", {"email": "x@example.test", "password": "whatever"})
                assert login["error"]["code"] == "unavailable"
                await anonymous.close()
                history = await booker.call("chat.history", {"conversation_id": conv, "limit": 10})
                assert sorted(m["seq"] for m in history["messages"]) == [m["seq"] for m in sent] == list(range(1, 7))
                assert not witness.done()  # all of that while Redis still held every write
            await wait_subscriber_connected(proc)  # ready again: Redis answered a probe
            body = await ops_status(proc)
            assert body["redis"]["sending"] is True and body["redis"]["outages"] == 1
            assert metric_sum(await scrape(proc), "hangout_redis_outages_total") == 1
            # No write position was recorded for the rename, and the replica
            # (as the other process knows it) has replayed all but the calls
            # made during the hang. The booker's read there still sees the
            # rename: the floor of every position rose when Redis came back.
            await until_replica_has_replayed(server2, paused_at)
            assert (await booker2.call("users.me"))["name"] == "Renamed While Redis Hung"
        # Nobody has to send again: the room's newest message is published
        # again once Redis answers, and every joined socket, the sender's
        # included, ends with all six exactly once (the ones before it are
        # fetched from PostgreSQL when its seq shows the gap).
        for c in (host, booker):
            exactly_once(await collect_messages(c, 6), 6)
        # Live delivery goes on as before.
        last = (await host.call("chat.send", {"conversation_id": conv, "content": "back"}))["message"]
        assert await messages_until(booker, last["seq"]) == [7]
    finally:
        await room.close()


@pytest.fixture
async def small_queue_server(stack):
    proc = await ServerProcess(stack, OUTGOING_QUEUE_MAX_BYTES=1048576, SOCKET_SEND_BUFFER_BYTES=65536,
                               PING_INTERVAL_S=120).start()
    yield proc
    await proc.stop()


async def test_a_socket_that_never_reads_is_closed_1013_and_others_get_everything(small_queue_server, server2):
    room = await open_room(small_queue_server, server2)
    try:
        conv = room.conversation_id
        booker, host = room.booker.client, room.host.client
        slow = await RawSocket.connect(small_queue_server, room.booker.access_token)
        reply = await slow.call("chat.join", {"conversation_id": conv})
        assert reply["result"]["last_seq"] == 0
        # From now on the slow socket reads nothing. Its neighbours on the same
        # process and on the other one keep receiving every message.
        for c in (booker, host):
            await c.call("chat.join", {"conversation_id": conv})
        # 4000 four-byte characters a message: ~2.6 MB of events. Past the
        # bound (1 MiB) and the kernel's send buffer as configured (128 KiB),
        # but not past the 4 MB the kernel would grow that buffer to by
        # itself: the socket must be closed because SOCKET_SEND_BUFFER_BYTES
        # capped it. (The bound is not smaller: the readers' buffers are
        # capped too, and a reader of this process may lag a burst briefly.)
        count = 160
        receiving = [asyncio.create_task(collect_messages(c, count)) for c in (booker, host)]
        await asyncio.gather(
            send_many(booker, conv, count // 2, prefix="b", size=4000, fill="🙂"),
            send_many(host, conv, count // 2, prefix="h", size=4000, fill="🙂"),
        )
        for seqs in await asyncio.gather(*receiving):
            exactly_once(seqs, count)
        # The slow socket, when it finally reads, finds the 1013 close after
        # what had been written to it before the bound was passed.
        assert await slow.close_code() == 1013
        slow.close()
        assert metric_sum(await scrape(small_queue_server), "hangout_slow_socket_closes_total") == 1
    finally:
        await room.close()


async def test_a_message_whose_publish_was_lost_is_repaired_from_postgres(db, server, server2):
    """A publish can be lost after its commit (the process dies in between,
    or Redis refuses it). The next message reveals the hole; the rooms fill
    it from PostgreSQL, so joined sockets still get every seq once."""
    room = await open_room(server, server2)
    try:
        conv = room.conversation_id
        booker, host = room.booker.client, room.host.client
        for c in (booker, host):
            await c.call("chat.join", {"conversation_id": conv})
        await booker.call("chat.send", {"conversation_id": conv, "content": "one"})
        async with db.acquire() as c:  # committed, never published
            await c.execute(
                """WITH bumped AS (UPDATE conversations SET last_seq = last_seq + 1 WHERE id = $1 RETURNING id, last_seq, user_id)
                   INSERT INTO messages (conversation_id, sender_id, content, seq) SELECT id, user_id, 'lost', last_seq FROM bumped""",
                uuid.UUID(conv),
            )
        await host.call("chat.send", {"conversation_id": conv, "content": "three"})
        for c in (booker, host):
            events = []
            while len(events) < 3:
                name, data = await asyncio.wait_for(c.events.get(), 10)
                if name == "chat.message":
                    events.append(data["message"])
            assert sorted(m["seq"] for m in events) == [1, 2, 3]
            assert [m["content"] for m in sorted(events, key=lambda m: m["seq"])] == ["one", "lost", "three"]
    finally:
        await room.close()
