"""chat.send calls made together (Database.write_merged, sql/016).

Sends that wait at the same moment are stored in one transaction. Each must
still get the answer it would get alone: its own seq, in the order the calls
were made within a conversation, a client_msg_id replay (also of a call
earlier in the same batch), not_found for a non-party, and delivery to the
room; and the same answers when the batch fails in the database (its calls
are then made one by one). Batches are made deterministic with the
test-only ``test.hold_merged_writes``.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from protocol.errors import ErrorCode, RpcError
from tests.chat_helpers import collect_messages, messages_until, open_room
from tests.conftest import ServerProcess, ops_status
from tests.test_merged_bookings import merged, until_waiting


@pytest.fixture(scope="module")
async def test_server(stack):
    """A server with the test-only methods (tests/debug_methods.py)."""
    proc = await ServerProcess(stack, test_methods=True, LOG_LEVEL="ERROR").start()
    yield proc
    await proc.stop()


async def sent_together(server, client, calls) -> list:
    """``calls`` (coroutines of chat.send) held back by the server, then
    let go together; their results (or errors), in order."""
    await client.call("test.hold_merged_writes", {"hold": True, "write": "chat.send"})
    try:
        sent = [asyncio.ensure_future(c) for c in calls]
        await until_waiting(server, len(sent))
    finally:
        await client.call("test.hold_merged_writes", {"hold": False, "write": "chat.send"})
    return await asyncio.gather(*sent, return_exceptions=True)


@pytest.mark.parametrize("batch_fails", [False, True], ids=["batch commits", "batch fails, calls made alone"])
async def test_sends_made_together_get_the_answers_they_would_get_alone(test_server, server2, db, batch_fails):
    rooms = [await open_room(test_server, server2) for _ in range(3)]
    outsider = await open_room(test_server)
    try:
        a, b, c = rooms
        await a.host.client.call("chat.join", {"conversation_id": a.conversation_id})
        delivered = asyncio.ensure_future(collect_messages(a.host.client, 3))
        cmid = str(uuid.uuid4())

        def send(party, room, content, client_msg_id=None):
            params = {"conversation_id": room.conversation_id, "content": content}
            if client_msg_id:
                params["client_msg_id"] = client_msg_id
            return party.client.call("chat.send", params)

        before = await merged(test_server)
        if batch_fails:
            await a.booker.client.call("test.fail_merged_writes", {"fail": True, "write": "chat.send"})
        try:
            results = await sent_together(test_server, a.booker.client, [
                send(a.booker, a, "a1"),
                send(b.booker, b, "b1"),
                send(a.booker, a, "a2", cmid),
                send(a.booker, a, "a2 again", cmid),  # a replay of the call before, in the same batch
                send(outsider.booker, a, "not a party"),
                send(a.booker, a, "a3"),
                send(c.booker, c, "c1"),
            ])
        finally:
            await a.booker.client.call("test.fail_merged_writes", {"fail": False, "write": "chat.send"})
        after = await merged(test_server)
        assert after["batches"] == before["batches"] + 1 and after["calls"] == before["calls"] + 7
        assert after["failed"] == before["failed"] + int(batch_fails)

        a1, b1, a2, a2_again, outside, a3, c1 = results
        assert isinstance(outside, RpcError) and outside.code == ErrorCode.NOT_FOUND
        seqs = [r["message"]["seq"] for r in (a1, a2, a3)]
        if batch_fails:  # made alone, side by side: replies come in any order, and so do their seqs
            assert sorted(seqs) == [1, 2, 3]
        else:  # one batch: in the order of the calls
            assert seqs == [1, 2, 3]
        assert a2_again["message"] == a2["message"] and a2["message"]["client_msg_id"] == cmid
        assert a2["message"]["content"] in ("a2", "a2 again")  # whichever was stored first
        assert b1["message"]["seq"] == 1 and c1["message"]["seq"] == 1
        for reply, room, content in ((a1, a, "a1"), (b1, b, "b1"), (a3, a, "a3"), (c1, c, "c1")):
            m = reply["message"]
            assert m["conversation_id"] == room.conversation_id and m["sender_id"] == room.booker.user_id
            assert m["content"] == content

        # Delivered to the joined party on the other process, each once (the
        # replay's publish is dropped there), in seq order.
        assert await delivered == [1, 2, 3]
        await send(a.booker, a, "a4")
        assert await messages_until(a.host.client, 4) == [4]
        async with db.acquire() as conn:
            rows = await conn.fetch(
                "SELECT seq, content FROM messages WHERE conversation_id = $1 ORDER BY seq", uuid.UUID(a.conversation_id)
            )
            stored = [(r["message"]["seq"], r["message"]["content"]) for r in (a1, a2, a3)]
            assert [(r["seq"], r["content"]) for r in rows] == sorted(stored) + [(4, "a4")]
            row = await conn.fetchrow("SELECT last_seq, booker_sent, host_sent FROM conversations WHERE id = $1",
                                      uuid.UUID(a.conversation_id))
            assert tuple(row) == (4, 4, 0)
        # Read-your-writes: the sender's history has the batch's messages.
        history = await a.booker.client.call("chat.history", {"conversation_id": a.conversation_id})
        assert [m["seq"] for m in history["messages"]] == [4, 3, 2, 1]
    finally:
        for r in [*rooms, outsider]:
            await r.close()


@pytest.fixture(scope="module")
async def test_server2(stack):
    proc = await ServerProcess(stack, test_methods=True, LOG_LEVEL="ERROR").start()
    yield proc
    await proc.stop()


async def test_batches_of_two_processes_over_the_same_rooms_do_not_deadlock(test_server, test_server2, db):
    """Each batch locks its conversations in id order, so batches on two
    processes that hold the same rooms in opposite call orders wait for each
    other at most, never in a circle (a deadlock would fail both batches)."""
    rooms = [await open_room(test_server, test_server2) for _ in range(4)]
    try:
        # The booker of each room on the first process, its host on the second.
        one = [(r.booker.client, r.conversation_id) for r in rooms]
        two = [(r.host.client, r.conversation_id) for r in reversed(rooms)]
        before = [await merged(s) for s in (test_server, test_server2)]
        holders = [rooms[0].booker.client, rooms[0].host.client]
        for holder in holders:
            await holder.call("test.hold_merged_writes", {"hold": True, "write": "chat.send"})
        try:
            sent = [asyncio.ensure_future(client.call("chat.send", {"conversation_id": conv, "content": f"{i}"}))
                    for i in range(5) for side in (one, two) for client, conv in side]
            await until_waiting(test_server, 20)
            await until_waiting(test_server2, 20)
        finally:
            await asyncio.gather(*(h.call("test.hold_merged_writes", {"hold": False, "write": "chat.send"})
                                   for h in holders))
        replies = await asyncio.gather(*sent)
        after = [await merged(s) for s in (test_server, test_server2)]
        for b, a in zip(before, after):
            assert a["failed"] == b["failed"] and a["batches"] > b["batches"]
        for r in rooms:
            seqs = sorted(x["message"]["seq"] for x in replies if x["message"]["conversation_id"] == r.conversation_id)
            assert seqs == list(range(1, 11))
    finally:
        for r in rooms:
            await r.close()


async def test_a_send_whose_sender_goes_away_is_still_published(test_server, server2):
    """The sender's socket closes while its send waits for a batch: the call
    is cancelled with the socket, but the message it sent is stored and
    published all the same, so the other party's live room gets it."""
    room = await open_room(test_server, server2)
    try:
        controller = await room.booker.socket(test_server)
        await room.host.client.call("chat.join", {"conversation_id": room.conversation_id})
        await controller.call("test.hold_merged_writes", {"hold": True, "write": "chat.send"})
        try:
            sockets = (await ops_status(test_server))["sockets"]
            sent = asyncio.ensure_future(
                room.booker.client.call("chat.send", {"conversation_id": room.conversation_id, "content": "bye"})
            )
            await until_waiting(test_server, 1)
            await room.booker.client.close()
            deadline = time.monotonic() + 10
            while (await ops_status(test_server))["sockets"] >= sockets:  # bounded: until the server let it go
                assert time.monotonic() < deadline, "the server never noticed the closed socket"
                await asyncio.sleep(0.02)
        finally:
            await controller.call("test.hold_merged_writes", {"hold": False, "write": "chat.send"})
        with pytest.raises(Exception):
            await sent  # the socket went away before the reply
        assert await collect_messages(room.host.client, 1, timeout=10) == [1]
    finally:
        await room.close()
