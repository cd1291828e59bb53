"""chat.read: read positions only move forward, reach every joined socket of
both parties, and the unread counts of chat.conversations and chat.join stay
exact whatever races them."""

from __future__ import annotations

import asyncio
import random
import uuid

from protocol.client import Client
from protocol.errors import ErrorCode
from server.db import chat as chat_db
from tests.chat_helpers import Room, events_until_message, expect_error, open_room, room
from tests.conftest import register, replay_paused, replica_caught_up, until_writes_wait_on_the_lock

READ_KEYS = ("read_seq", "other_read_seq", "unread")


async def send(client: Client, conv: str, content: str = "m") -> int:
    return (await client.call("chat.send", {"conversation_id": conv, "content": content}))["message"]["seq"]


async def read(client: Client, conv: str, seq: int) -> int:
    return (await client.call("chat.read", {"conversation_id": conv, "seq": seq}))["read_seq"]


async def joined_figures(client: Client, conv: str) -> tuple[int, int, int]:
    """(read_seq, other_read_seq, unread) as chat.join gives them."""
    conversation = (await client.call("chat.join", {"conversation_id": conv}))["conversation"]
    return tuple(conversation[k] for k in READ_KEYS)  # type: ignore[return-value]


async def inbox_figures(client: Client, conv: str) -> tuple[int, int, int]:
    """(read_seq, other_read_seq, unread) as chat.conversations gives them."""
    items = (await client.call("chat.conversations", {"limit": 100}))["conversations"]
    (item,) = [c for c in items if c["id"] == conv]
    return tuple(item[k] for k in READ_KEYS)  # type: ignore[return-value]


async def events_until(client: Client, name: str, timeout: float = 10.0) -> list[tuple[str, dict]]:
    """Every event up to and including the next one called ``name``."""
    seen: list[tuple[str, dict]] = []

    async def run() -> None:
        while not seen or seen[-1][0] != name:
            seen.append(await client.events.get())

    await asyncio.wait_for(run(), timeout)
    return seen


async def test_seq_must_name_a_message_and_strangers_get_not_found(room, server):
    conv, booker = room.conversation_id, room.booker.client
    # No message yet: no seq can be read.
    err = await expect_error(ErrorCode.INVALID_PARAMS, read(booker, conv, 1))
    assert [e["field"] for e in err.data["errors"]] == ["seq"]
    for _ in range(3):
        await send(room.host.client, conv)
    for bad in (0, -1, 4, 2**63, "1", 1.0, None):
        err = await expect_error(ErrorCode.INVALID_PARAMS, read(booker, conv, bad))  # type: ignore[arg-type]
        assert [e["field"] for e in err.data["errors"]] == ["seq"], bad
    stranger = await server.connect()
    await register(stranger, name="Stranger")
    try:
        for cid in (conv, str(uuid.uuid4())):  # someone else's, and one that does not exist
            for seq in (1, 3, 4):  # past last_seq too: whether it exists is not told
                await expect_error(ErrorCode.NOT_FOUND, read(stranger, cid, seq))
        await expect_error(ErrorCode.NOT_FOUND, read(booker, str(uuid.uuid4()), 1))
    finally:
        await stranger.close()
    # None of it moved anything.
    assert await joined_figures(booker, conv) == (0, 0, 3)
    assert await joined_figures(room.host.client, conv) == (0, 0, 0)


async def test_read_positions_only_move_forward(room):
    conv, booker = room.conversation_id, room.booker.client
    for _ in range(5):
        await send(room.host.client, conv)
    assert await read(booker, conv, 3) == 3
    assert await read(booker, conv, 1) == 3  # lower: unchanged, and the reply says where it is
    assert await read(booker, conv, 3) == 3
    assert await joined_figures(booker, conv) == (3, 0, 2)
    assert await read(booker, conv, 5) == 5
    assert await joined_figures(booker, conv) == (5, 0, 0)
    assert await joined_figures(room.host.client, conv) == (0, 5, 0)


async def test_read_figures_in_the_inbox_and_the_join(server, server2, db, replica_db):
    room = await open_room(server, server2)
    try:
        conv, booker, host = room.conversation_id, room.booker.client, room.host.client
        for client in (host, host, booker, host):  # seqs 1, 2 (host), 3 (booker), 4 (host)
            await send(client, conv)
        await replica_caught_up(db, replica_db)  # the inbox is a replica read; the other's sends are not ours
        for figures in (joined_figures, inbox_figures):
            assert await figures(booker, conv) == (0, 0, 3)  # own messages are never unread
            assert await figures(host, conv) == (0, 0, 1)
        assert await read(booker, conv, 3) == 3
        assert await read(host, conv, 4) == 4
        await replica_caught_up(db, replica_db)
        for figures in (joined_figures, inbox_figures):
            assert await figures(booker, conv) == (3, 4, 1)
            assert await figures(host, conv) == (4, 3, 0)
        assert await read(booker, conv, 4) == 4
        assert await joined_figures(booker, conv) == (4, 4, 0)
        assert await inbox_figures(booker, conv) == (4, 4, 0)
    finally:
        await room.close()


async def test_the_event_reaches_every_joined_socket_of_both_parties_and_no_other(server, server2):
    room = await open_room(server, server2)
    try:
        conv = room.conversation_id
        reader = room.booker.client  # process 1, joined
        reader_other_device = await room.booker.socket(server2)  # joined
        reader_not_joined = await room.booker.socket(server2)  # beside a joined socket of the same user
        host = room.host.client  # process 2, joined
        host_not_joined = await room.host.socket(server)  # beside the reader's joined socket
        joined = [reader, reader_other_device, host]
        for c in joined:
            await c.call("chat.join", {"conversation_id": conv})
        for _ in range(3):
            await send(host, conv)

        assert await read(reader, conv, 2) == 2
        want = {"conversation_id": conv, "user_id": room.booker.user_id, "read_seq": 2}
        for c in joined:
            assert await c.next_event("chat.read") == want

        # Calls that leave the position where it is push nothing: the next
        # message (published after them, on the same channel) comes first.
        assert await read(reader_other_device, conv, 1) == 2
        assert await read(reader, conv, 2) == 2
        marker = await send(host, conv)
        for c in joined:
            assert [name for name, _ in await events_until_message(c, marker)] == ["chat.message"]

        # The other party's read reaches the reader's devices.
        assert await read(host, conv, 4) == 4
        for c in joined:
            assert await c.next_event("chat.read") == {"conversation_id": conv, "user_id": room.host.user_id, "read_seq": 4}

        # Sockets that did not join get nothing of the room: their next
        # event is one of their own user's, published after the reads.
        await reader.call("wallet.topup", {"amount": "1.00", "idempotency_key": uuid.uuid4().hex})
        assert [name for name, _ in await events_until(reader_not_joined, "wallet.updated")] == ["wallet.updated"]
        await host.call("users.update", {"name": "Host Renamed"})
        assert [name for name, _ in await events_until(host_not_joined, "user.updated")] == ["user.updated"]
    finally:
        await room.close()


async def test_a_read_is_seen_by_the_readers_next_reads_on_any_process_while_the_replica_lags(
        server, server2, db, replica_db):
    room = await open_room(server, server2)
    try:
        conv, booker, host = room.conversation_id, room.booker.client, room.host.client
        for _ in range(4):
            await send(host, conv)
        await replica_caught_up(db, replica_db)
        booker_elsewhere = await room.booker.socket(server2)
        async with replay_paused(replica_db):
            assert await read(booker, conv, 3) == 3
            # chat.conversations is a replica read: one that had not replayed
            # the read would still say 0.
            assert await inbox_figures(booker_elsewhere, conv) == (3, 0, 1)
            assert await inbox_figures(booker, conv) == (3, 0, 1)
            assert await joined_figures(host, conv) == (0, 3, 0)
    finally:
        await room.close()


async def test_unread_stays_exact_under_concurrent_sends_and_reads_from_both_parties(server, server2, db, replica_db):
    """Both parties send and read at once from sockets on two processes;
    afterwards every figure equals what the messages table says."""
    room = await open_room(server, server2)
    try:
        conv = room.conversation_id
        parties = {room.booker.user_id: room.booker, room.host.user_id: room.host}
        sockets = [(uid, c) for uid, party in parties.items()
                   for c in (party.client, await party.socket(server if party is room.host else server2))]
        committed: list[int] = []  # seqs whose send has been answered: safe to read
        asked = {uid: 0 for uid in parties}
        rng = random.Random()

        async def one(uid: str, client: Client, gate: asyncio.Semaphore) -> None:
            async with gate:
                if committed and rng.random() < 0.45:
                    seq = rng.choice(committed[-20:])
                    got = await read(client, conv, seq)
                    assert got >= seq
                    asked[uid] = max(asked[uid], seq)
                else:
                    committed.append(await send(client, conv))

        for _ in range(3):
            await asyncio.gather(*(one(uid, c, gate) for uid, c in sockets
                                   for gate in [asyncio.Semaphore(8)] for _ in range(40)))
            # Each party's position is the highest seq it asked for.
            async with db.acquire() as pg:
                row = await pg.fetchrow("SELECT user_id, booker_read_seq, host_read_seq FROM conversations WHERE id = $1",
                                        uuid.UUID(conv))
            assert (row["booker_read_seq"], row["host_read_seq"]) == (asked[room.booker.user_id], asked[room.host.user_id])
            await assert_figures_match_the_messages(room, db, replica_db)
    finally:
        await room.close()


async def assert_figures_match_the_messages(room: Room, db, replica_db) -> None:
    conv = room.conversation_id
    async with db.acquire() as pg:
        c = await pg.fetchrow("SELECT * FROM conversations WHERE id = $1", uuid.UUID(conv))
        messages = await pg.fetch("SELECT seq, sender_id FROM messages WHERE conversation_id = $1", uuid.UUID(conv))
    assert sorted(m["seq"] for m in messages) == list(range(1, c["last_seq"] + 1))
    booker, host = uuid.UUID(room.booker.user_id), uuid.UUID(room.host.user_id)
    booker_unread = sum(1 for m in messages if m["sender_id"] == host and m["seq"] > c["booker_read_seq"])
    host_unread = sum(1 for m in messages if m["sender_id"] == booker and m["seq"] > c["host_read_seq"])
    await replica_caught_up(db, replica_db)
    for figures in (joined_figures, inbox_figures):
        assert await figures(room.booker.client, conv) == (c["booker_read_seq"], c["host_read_seq"], booker_unread)
        assert await figures(room.host.client, conv) == (c["host_read_seq"], c["booker_read_seq"], host_unread)


async def test_a_read_that_waited_for_a_send_counts_the_message_it_waited_for(room, db):
    """A read of a seq whose send has not committed yet (a client may guess
    it) waits for the sender's row lock, then counts that message: unread
    never keeps a message the reader has read."""
    conv, booker = room.conversation_id, room.booker.client
    await send(room.host.client, conv)
    async with db.acquire() as pg:
        tx = pg.transaction()
        await tx.start()
        try:
            stored = await chat_db.send_message(pg, uuid.UUID(conv), uuid.UUID(room.host.user_id), "in flight", None)
            assert stored is not None and stored[0]["seq"] == 2
            reading = asyncio.create_task(read(booker, conv, 2))
            await until_writes_wait_on_the_lock(db, 1, statement="SELECT read_seq%")
        finally:
            await tx.commit()
    assert await reading == 2
    assert await joined_figures(booker, conv) == (2, 0, 0)
