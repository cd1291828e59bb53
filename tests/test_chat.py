"""chat.*: access, sending, de-duplication, history, join, typing, leave, inbox."""

from __future__ import annotations

import asyncio
import uuid

from protocol.errors import ErrorCode
from protocol.codec import decode, encode
from tests.chat_helpers import (RawSocket, events_until_message, expect_error, messages_until, open_room, room, send_many,
                                subscriber_count, wait_subscribers)
from tests.conftest import PASSWORD, register, replica_caught_up

MESSAGE_KEYS = {"id", "conversation_id", "seq", "sender_id", "content", "created_at", "client_msg_id"}
CONVERSATION_KEYS = {"id", "booking_id", "user_id", "host_id", "created_at", "last_seq", "read_seq", "other_read_seq", "unread"}


async def test_only_the_two_parties_may_touch_a_conversation(room, server):
    stranger = await server.connect()
    await register(stranger, name="Stranger")
    conv = room.conversation_id
    await room.booker.client.call("chat.send", {"conversation_id": conv, "content": "hi"})
    try:
        for cid in (conv, str(uuid.uuid4())):  # someone else's, and one that does not exist
            await expect_error(ErrorCode.NOT_FOUND, stranger.call("chat.join", {"conversation_id": cid}))
            await expect_error(ErrorCode.NOT_FOUND, stranger.call("chat.join", {"conversation_id": cid, "since_seq": 0}))
            await expect_error(ErrorCode.NOT_FOUND, stranger.call("chat.leave", {"conversation_id": cid}))
            await expect_error(ErrorCode.NOT_FOUND, stranger.call("chat.send", {"conversation_id": cid, "content": "x"}))
            await expect_error(ErrorCode.NOT_FOUND, stranger.call(
                "chat.send", {"conversation_id": cid, "content": "x", "client_msg_id": str(uuid.uuid4())}))
            await expect_error(ErrorCode.NOT_FOUND, stranger.call("chat.history", {"conversation_id": cid}))
            await expect_error(ErrorCode.NOT_FOUND, stranger.call("chat.typing", {"conversation_id": cid}))
        assert (await stranger.call("chat.conversations"))["conversations"] == []
        # Nothing the stranger tried was stored (read by the sender: read-your-writes).
        history = await room.booker.client.call("chat.history", {"conversation_id": conv})
        assert [m["content"] for m in history["messages"]] == ["hi"]
    finally:
        await stranger.close()


async def test_methods_need_an_authenticated_socket(server):
    async with await server.connect() as anon:
        conv = {"conversation_id": str(uuid.uuid4())}
        for method, params in (("chat.join", conv), ("chat.leave", conv), ("chat.send", {**conv, "content": "x"}),
                               ("chat.history", conv), ("chat.typing", conv), ("chat.conversations", {})):
            await expect_error(ErrorCode.UNAUTHENTICATED, anon.call(method, params))


async def test_send_returns_the_committed_message_with_gap_free_seq(room, db):
    conv = room.conversation_id
    first = (await room.booker.client.call("chat.send", {"conversation_id": conv, "content": "hello"}))["message"]
    assert set(first) == MESSAGE_KEYS
    assert first["seq"] == 1 and first["sender_id"] == room.booker.user_id and first["conversation_id"] == conv
    assert first["content"] == "hello" and first["client_msg_id"] is None
    second = (await room.host.client.call("chat.send", {"conversation_id": conv, "content": "hi back"}))["message"]
    assert second["seq"] == 2 and second["sender_id"] == room.host.user_id
    sent = await send_many(room.booker.client, conv, 30) + await send_many(room.host.client, conv, 30)
    assert sorted(m["seq"] for m in sent) == list(range(3, 63))
    async with db.acquire() as c:  # committed before the reply, on the primary
        assert await c.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", uuid.UUID(conv)) == 62
        assert await c.fetchval("SELECT last_seq FROM conversations WHERE id = $1", uuid.UUID(conv)) == 62


async def test_client_msg_id_stores_one_message_per_sender(room):
    conv, booker, host = room.conversation_id, room.booker.client, room.host.client
    cmid = str(uuid.uuid4())
    params = {"conversation_id": conv, "content": "once", "client_msg_id": cmid}
    first = (await booker.call("chat.send", params))["message"]
    assert first["client_msg_id"] == cmid
    again = (await booker.call("chat.send", params))["message"]
    assert again == first
    # Concurrent retries of one id: one message, every reply is it, no seq spent.
    other = str(uuid.uuid4())
    replies = await asyncio.gather(*(booker.call("chat.send", {**params, "client_msg_id": other}) for _ in range(20)))
    assert len({r["message"]["id"] for r in replies}) == 1
    assert replies[0]["message"]["seq"] == 2
    # The same id from the other party is that party's own message.
    hosts = (await host.call("chat.send", params))["message"]
    assert hosts["id"] != first["id"] and hosts["seq"] == 3
    nxt = (await booker.call("chat.send", {"conversation_id": conv, "content": "next"}))["message"]
    assert nxt["seq"] == 4
    history = await booker.call("chat.history", {"conversation_id": conv})  # the last writer: read-your-writes
    assert [m["seq"] for m in history["messages"]] == [4, 3, 2, 1]


async def test_one_client_msg_id_sent_at_once_from_sockets_on_two_processes_stores_one_message(room, server, server2):
    """The de-duplication is the database's, not a process's: retries of one
    id racing on several sockets of the sender, on both processes, store one
    message and spend one seq."""
    conv = room.conversation_id
    sockets = [await room.booker.socket(server if i % 2 else server2) for i in range(6)]
    params = {"conversation_id": conv, "content": "once", "client_msg_id": str(uuid.uuid4())}
    replies = await asyncio.gather(*(c.call("chat.send", params) for c in sockets for _ in range(5)))
    assert len({(r["message"]["id"], r["message"]["seq"]) for r in replies}) == 1
    nxt = (await room.booker.client.call("chat.send", {"conversation_id": conv, "content": "next"}))["message"]
    assert nxt["seq"] == replies[0]["message"]["seq"] + 1
    history = await room.booker.client.call("chat.history", {"conversation_id": conv})  # read-your-writes
    assert [m["content"] for m in history["messages"]][:2] == ["next", "once"]


async def test_a_client_msg_id_keeps_its_first_message_and_is_per_conversation(room, server):
    conv, booker = room.conversation_id, room.booker.client
    cmid = str(uuid.uuid4())
    first = (await booker.call("chat.send", {"conversation_id": conv, "content": "first", "client_msg_id": cmid}))["message"]
    # A retry that changed its content still answers with what was stored.
    again = (await booker.call("chat.send", {"conversation_id": conv, "content": "edited", "client_msg_id": cmid}))["message"]
    assert again == first and again["content"] == "first"
    # The same id in another conversation of the same sender is another message.
    other_room = await open_room(server, booker=room.booker)
    try:
        there = (await booker.call("chat.send", {"conversation_id": other_room.conversation_id, "content": "elsewhere",
                                                 "client_msg_id": cmid}))["message"]
        assert there["id"] != first["id"] and there["seq"] == 1 and there["content"] == "elsewhere"
    finally:
        await other_room.host.close()


async def test_history_gives_50_by_default_and_up_to_100(room):
    conv, reader = room.conversation_id, room.booker.client  # the sender reads: read-your-writes
    await send_many(room.booker.client, conv, 101)
    assert [m["seq"] for m in (await reader.call("chat.history", {"conversation_id": conv}))["messages"]] == list(range(101, 51, -1))
    assert len((await reader.call("chat.history", {"conversation_id": conv, "limit": 100}))["messages"]) == 100
    await expect_error(ErrorCode.INVALID_PARAMS, reader.call("chat.history", {"conversation_id": conv, "limit": 101}))


async def test_the_join_reply_comes_before_any_message_of_that_room(room, server):
    conv = room.conversation_id
    raw = await RawSocket.connect(server, room.host.access_token)
    try:
        sending = asyncio.create_task(send_many(room.booker.client, conv, 200, in_flight=8))
        await room.booker.client.call("chat.send", {"conversation_id": conv, "content": "started"})
        seen_before_reply = []
        payload = encode({"id": 1, "method": "chat.join", "params": {"conversation_id": conv}})
        await raw.send_frames([(0x2, payload)])
        while True:
            opcode, data = await raw.frame()
            frame = decode(data) if opcode == 2 else {}
            if frame.get("id") == 1:
                break
            seen_before_reply.append(frame.get("event"))
        assert "chat.message" not in seen_before_reply
        await sending
    finally:
        raw.close()


async def test_content_is_1_to_4000_characters(room):
    conv, c = room.conversation_id, room.booker.client
    for bad in ("", "x" * 4001, "🙂" * 4001, "nul\x00byte", None, 5):
        err = await expect_error(ErrorCode.INVALID_PARAMS, c.call("chat.send", {"conversation_id": conv, "content": bad}))
        assert [e["field"] for e in err.data["errors"]] == ["content"]
    for good in ("x", "x" * 4000, "🙂" * 4000):
        assert (await c.call("chat.send", {"conversation_id": conv, "content": good}))["message"]["content"] == good
    err = await expect_error(ErrorCode.INVALID_PARAMS, c.call(
        "chat.send", {"conversation_id": "nope", "content": "x", "client_msg_id": "nope"}))
    assert {e["field"] for e in err.data["errors"]} == {"conversation_id", "client_msg_id"}


async def test_history_pages_newest_first(room, server2):
    conv = room.conversation_id
    await send_many(room.booker.client, conv, 7, in_flight=1)
    # Another socket of the sender, on another process: it reads its writes.
    other = await room.booker.socket(server2)
    page = await other.call("chat.history", {"conversation_id": conv, "limit": 3})
    assert [m["seq"] for m in page["messages"]] == [7, 6, 5] and page["has_more"] is True
    assert [m["content"] for m in page["messages"]] == ["m6", "m5", "m4"]
    page = await other.call("chat.history", {"conversation_id": conv, "limit": 3, "before_seq": 5})
    assert [m["seq"] for m in page["messages"]] == [4, 3, 2] and page["has_more"] is True
    page = await other.call("chat.history", {"conversation_id": conv, "limit": 3, "before_seq": 2})
    assert [m["seq"] for m in page["messages"]] == [1] and page["has_more"] is False
    page = await other.call("chat.history", {"conversation_id": conv})
    assert [m["seq"] for m in page["messages"]] == [7, 6, 5, 4, 3, 2, 1] and page["has_more"] is False
    exact = await other.call("chat.history", {"conversation_id": conv, "limit": 7})
    assert exact["has_more"] is False
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": "5"}, {"before_seq": 0}, {"before_seq": -1}):
        await expect_error(ErrorCode.INVALID_PARAMS, other.call("chat.history", {"conversation_id": conv, **bad}))


async def test_join_returns_latest_50_or_what_was_missed(room):
    conv, booker = room.conversation_id, room.booker.client
    empty = await booker.call("chat.join", {"conversation_id": conv})
    assert set(empty) == {"conversation", "messages", "last_seq", "truncated"}
    assert set(empty["conversation"]) == CONVERSATION_KEYS
    assert empty["conversation"]["user_id"] == room.booker.user_id and empty["conversation"]["host_id"] == room.host.user_id
    assert empty["conversation"]["booking_id"] == room.booking_id
    assert (empty["messages"], empty["last_seq"], empty["truncated"]) == ([], 0, False)
    await booker.call("chat.leave", {"conversation_id": conv})

    await send_many(room.host.client, conv, 505)
    host = room.host.client
    latest = await host.call("chat.join", {"conversation_id": conv})
    assert [m["seq"] for m in latest["messages"]] == list(range(456, 506))
    assert latest["last_seq"] == 505 and latest["conversation"]["last_seq"] == 505 and latest["truncated"] is False
    missed = await host.call("chat.join", {"conversation_id": conv, "since_seq": 0})
    assert [m["seq"] for m in missed["messages"]] == list(range(6, 506)) and missed["truncated"] is True
    missed = await host.call("chat.join", {"conversation_id": conv, "since_seq": 5})
    assert [m["seq"] for m in missed["messages"]] == list(range(6, 506)) and missed["truncated"] is False
    missed = await host.call("chat.join", {"conversation_id": conv, "since_seq": 500})
    assert [m["seq"] for m in missed["messages"]] == [501, 502, 503, 504, 505] and missed["truncated"] is False
    missed = await host.call("chat.join", {"conversation_id": conv, "since_seq": 505})
    assert missed["messages"] == [] and missed["last_seq"] == 505
    ahead = await host.call("chat.join", {"conversation_id": conv, "since_seq": 9000})  # a seq from the future
    assert ahead["messages"] == [] and ahead["last_seq"] == 505
    await expect_error(ErrorCode.INVALID_PARAMS, host.call("chat.join", {"conversation_id": conv, "since_seq": -1}))
    await expect_error(ErrorCode.INVALID_PARAMS, host.call("chat.join", {"conversation_id": conv, "since_seq": "1"}))


async def test_sender_and_both_parties_get_each_message_once(room, server2):
    conv = room.conversation_id
    booker, host = room.booker.client, room.host.client
    host2 = await room.host.socket(server2)
    for c in (booker, host, host2):
        await c.call("chat.join", {"conversation_id": conv})
    sent = (await booker.call("chat.send", {"conversation_id": conv, "content": "hey"}))["message"]
    for c in (booker, host, host2):  # the sending socket included
        event = await c.next_event("chat.message")
        assert event["message"] == sent
    # Re-joining the same socket does not duplicate what it already has.
    again = await host.call("chat.join", {"conversation_id": conv, "since_seq": 0})
    assert [m["seq"] for m in again["messages"]] == [1]
    last = (await booker.call("chat.send", {"conversation_id": conv, "content": "again"}))["message"]
    for c in (booker, host, host2):
        assert await messages_until(c, last["seq"]) == [2]


async def test_typing_reaches_only_the_other_party(room, server2):
    conv = room.conversation_id
    booker, host = room.booker.client, room.host.client
    booker2 = await room.booker.socket(server2)
    host2 = await room.host.socket(server2)
    for c in (booker, booker2, host, host2):
        await c.call("chat.join", {"conversation_id": conv})
    assert await booker.call("chat.typing", {"conversation_id": conv}) == {}
    for c in (host, host2):
        assert await c.next_event("chat.typing") == {"conversation_id": conv, "user_id": room.booker.user_id}
    # A message published after the typing arrives after it: the booker's
    # own sockets got no typing before it.
    last = (await host.call("chat.send", {"conversation_id": conv, "content": "marker"}))["message"]
    for c in (booker, booker2):
        assert "chat.typing" not in [name for name, _ in await events_until_message(c, last["seq"])]
    # Typing works without joining too, and is not stored.
    host3 = await room.host.socket(server2)
    assert await host3.call("chat.typing", {"conversation_id": conv}) == {}
    assert await booker.next_event("chat.typing") == {"conversation_id": conv, "user_id": room.host.user_id}
    history = await host3.call("chat.history", {"conversation_id": conv})
    assert [m["content"] for m in history["messages"]] == ["marker"]


async def test_leave_stops_delivery_and_the_last_follower_unsubscribes(room, redis):
    conv = room.conversation_id
    channel = f"c:{conv}"
    booker, host = room.booker.client, room.host.client
    await booker.call("chat.join", {"conversation_id": conv})
    await wait_subscribers(redis, channel, 1)
    assert await booker.call("chat.leave", {"conversation_id": conv}) == {}
    await wait_subscribers(redis, channel, 0)
    first = (await host.call("chat.send", {"conversation_id": conv, "content": "while away"}))["message"]
    rejoin = await booker.call("chat.join", {"conversation_id": conv, "since_seq": 0})
    assert [m["seq"] for m in rejoin["messages"]] == [first["seq"]]
    second = (await host.call("chat.send", {"conversation_id": conv, "content": "back"}))["message"]
    assert await messages_until(booker, second["seq"]) == [second["seq"]]  # never the one sent while away
    # Leaving a room not joined is fine for a party.
    assert await host.call("chat.leave", {"conversation_id": conv}) == {}


async def test_closed_or_logged_out_sockets_stop_following(room, server, redis):
    conv = room.conversation_id
    channel = f"c:{conv}"
    a = await room.booker.socket(server)
    b = await room.host.socket(server)
    await a.call("chat.join", {"conversation_id": conv})
    await b.call("chat.join", {"conversation_id": conv})
    await wait_subscribers(redis, channel, 1)  # one subscription for the process
    await a.close()
    await b.call("auth.logout")
    await wait_subscribers(redis, channel, 0)
    # A logged-out socket may not use chat at all any more.
    await expect_error(ErrorCode.UNAUTHENTICATED, b.call("chat.join", {"conversation_id": conv}))
    assert await subscriber_count(redis, channel) == 0


async def test_rebinding_to_another_user_leaves_the_room(room, server):
    conv = room.conversation_id
    s = await room.booker.socket(server)
    await s.call("chat.join", {"conversation_id": conv})
    stranger = await server.connect()
    other = await register(stranger, name="Other")
    await stranger.close()
    await s.call("auth.authenticate", {"access_token": other["access_token"]})
    sent = (await room.host.client.call("chat.send", {"conversation_id": conv, "content": "private"}))["message"]
    await room.booker.client.call("chat.join", {"conversation_id": conv})
    marker = (await room.host.client.call("chat.send", {"conversation_id": conv, "content": "m"}))["message"]
    await messages_until(room.booker.client, marker["seq"])
    await s.call("users.me")  # a reply follows every event queued before it
    assert [d for n, d in s.drain_events() if n == "chat.message"] == [], sent


async def test_sending_stays_allowed_after_the_booking_ends(room, db):
    conv = room.conversation_id
    cancelled = await room.booker.client.call("bookings.cancel", {"booking_id": room.booking_id})
    assert cancelled["booking"]["status"] == "cancelled"
    msg = (await room.host.client.call("chat.send", {"conversation_id": conv, "content": "after cancel"}))["message"]
    history = await room.host.client.call("chat.history", {"conversation_id": conv, "limit": 1})  # the sender reads
    assert history["messages"][0]["id"] == msg["id"]
    # Completion needs end_at to pass (settlement); set the status directly.
    async with db.acquire() as c:
        await c.execute("UPDATE bookings SET status = 'completed' WHERE id = $1", uuid.UUID(room.booking_id))
    msg = (await room.booker.client.call("chat.send", {"conversation_id": conv, "content": "after end"}))["message"]
    assert msg["seq"] == 2
    joined = await room.host.client.call("chat.join", {"conversation_id": conv})
    assert [m["content"] for m in joined["messages"]] == ["after cancel", "after end"]
    # The inbox keeps it.
    inbox = await room.booker.client.call("chat.conversations")
    assert conv in [x["id"] for x in inbox["conversations"]]


async def test_inbox_lists_conversations_by_recent_activity(server, server2, db, replica_db):
    first_room = await open_room(server, server2)
    booker = first_room.booker  # one booker, three hosts
    rooms = [first_room] + [await open_room(server, server2, booker=booker) for _ in range(2)]
    try:
        a, b, c_ = (r.conversation_id for r in rooms)
        await booker.client.call("chat.send", {"conversation_id": b, "content": "to b"})
        last_a = (await rooms[0].host.client.call("chat.send", {"conversation_id": a, "content": "to a"}))["message"]
        await replica_caught_up(db, replica_db)  # the host's message is another user's write for the booker
        inbox = await booker.client.call("chat.conversations")
        ids = [x["id"] for x in inbox["conversations"]]
        assert ids == [a, b, c_] and inbox["next_cursor"] is None
        first = inbox["conversations"][0]
        assert set(first) == CONVERSATION_KEYS | {"last_message"}
        assert first["last_message"] == last_a and first["last_seq"] == 1
        assert inbox["conversations"][1]["last_message"]["content"] == "to b"
        assert inbox["conversations"][2]["last_message"] is None and inbox["conversations"][2]["last_seq"] == 0
        page1 = await booker.client.call("chat.conversations", {"limit": 2})
        assert [x["id"] for x in page1["conversations"]] == [a, b] and page1["next_cursor"]
        page2 = await booker.client.call("chat.conversations", {"limit": 2, "cursor": page1["next_cursor"]})
        assert [x["id"] for x in page2["conversations"]] == [c_] and page2["next_cursor"] is None
        # Each host sees only their own conversation.
        host_inbox = await rooms[1].host.client.call("chat.conversations")
        assert [x["id"] for x in host_inbox["conversations"]] == [b]
        await expect_error(ErrorCode.INVALID_PARAMS, booker.client.call("chat.conversations", {"cursor": "garbage"}))
        await expect_error(ErrorCode.INVALID_PARAMS, booker.client.call("chat.conversations", {"limit": 0}))
    finally:
        for r in rooms:
            await r.close()


async def test_a_joined_socket_that_swaps_in_a_fresh_token_keeps_its_room_and_events(room, server):
    """auth.authenticate with a new token of the same user (how a long-lived
    socket refreshes) changes nothing else: the room and the user's events
    carry on."""
    conv, booker = room.conversation_id, room.booker.client
    await booker.call("chat.join", {"conversation_id": conv})
    email = (await booker.call("users.me"))["email"]
    other = await room.booker.socket(server)
    fresh = await other.call("auth.login", {"email": email, "password": PASSWORD})
    await booker.call("auth.authenticate", {"access_token": fresh["access_token"]})
    sent = (await room.host.client.call("chat.send", {"conversation_id": conv, "content": "still here?"}))["message"]
    assert (await booker.next_event("chat.message"))["message"]["seq"] == sent["seq"]
    await other.call("users.update", {"name": "Renamed"})
    assert (await booker.next_event("user.updated"))["user"]["name"] == "Renamed"
