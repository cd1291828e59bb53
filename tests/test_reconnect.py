"""protocol.reconnect.ResumingClient against real servers: the process
holding its socket is killed mid-conversation; it comes back with backoff,
authenticates, resumes its user events and its room, and the app sees
every message and user event once, none missing; a send made while
offline, and one in flight when the socket died, are each stored once."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from protocol.client import Client
from protocol.errors import ErrorCode, RpcError
from protocol.reconnect import ResumingClient
from protocol.resume import Backoff, SeqWindow
from tests.chat_helpers import open_room, send_many
from tests.conftest import PASSWORD, ServerProcess, new_email, register


@pytest.fixture
async def victim(stack):
    """A server process of this test's own, to be killed and started again
    on the same port."""
    proc = await ServerProcess(stack).start()
    yield proc
    await proc.stop()


async def kill(proc: ServerProcess) -> None:
    proc.proc.kill()
    await asyncio.to_thread(proc.proc.wait)


async def collect(rc: ResumingClient, until: callable, timeout: float = 30.0) -> list[tuple[str, dict]]:
    """Events from ``rc`` until ``until(events)`` holds."""
    got: list[tuple[str, dict]] = []

    async def run() -> None:
        while not until(got):
            got.append(await rc.next_event(timeout=timeout))

    await asyncio.wait_for(run(), timeout)
    return got


def seqs_of(events: list[tuple[str, dict]], conversation_id: str) -> list[int]:
    return [d["message"]["seq"] for n, d in events if n == "chat.message" and d["message"]["conversation_id"] == conversation_id]


async def test_a_killed_socket_comes_back_and_resumes_without_gap_or_duplicate(victim, server2, db):
    room = await open_room(server2)
    conv = room.conversation_id
    rc = await ResumingClient(victim.url, access_token=room.booker.access_token, backoff=Backoff(0.05, 0.4)).start()
    try:
        await rc.call("chat.join", {"conversation_id": conv})
        await send_many(room.host.client, conv, 5, prefix="before")
        events = await collect(rc, lambda got: len(seqs_of(got, conv)) == 5)

        await kill(victim)
        # While it is down: the host writes on, the booker's other device
        # tops up (user events), and the app sends (queued until a socket is ready).
        await send_many(room.host.client, conv, 5, prefix="during")
        topups = []
        for amount in ("1.00", "2.00"):
            result = await room.booker.client.call("wallet.topup", {"amount": amount, "idempotency_key": uuid.uuid4().hex})
            topups.append(result["balance"])
        queued = asyncio.create_task(rc.call("chat.send", {"conversation_id": conv, "content": "sent while offline"}))
        await asyncio.sleep(0.3)  # a few refused attempts, with no event to await while the port is closed
        assert not queued.done()
        await victim.start()

        sent = (await queued)["message"]
        await send_many(room.host.client, conv, 3, prefix="after")
        last = sent["seq"] + 3
        # Every seq up to the last, not just the last: a message the new
        # process's room missed while it subscribed comes late, fetched from
        # PostgreSQL once a later one shows the hole (events may come out of
        # seq order). A seq that never comes times the collection out.
        events += await collect(rc, lambda got: set(range(6, last + 1)) <= set(seqs_of(got, conv)) and len(
            [n for n, _ in got if n == "wallet.updated"]) == len(topups))
    finally:
        await rc.close()
        await room.close()

    seqs = seqs_of(events, conv)
    assert sorted(seqs) == list(range(1, last + 1)), seqs  # no gap
    assert len(seqs) == len(set(seqs)), seqs  # no duplicate
    assert [d["balance"] for n, d in events if n == "wallet.updated"] == topups
    assert ("client.reconnected", {"attempts": rc.failed_attempts}) in events
    assert rc.failed_attempts >= 1 and rc.sockets == 2
    stored = await db.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1 AND content = $2",
                               uuid.UUID(conv), "sent while offline")
    assert stored == 1


async def test_a_send_in_flight_when_the_process_dies_is_sent_again_and_stored_once(victim, server2, db, redis):
    room = await open_room(server2)
    conv = room.conversation_id
    rc = await ResumingClient(victim.url, access_token=room.booker.access_token, backoff=Backoff(0.05, 0.4)).start()
    try:
        await rc.call("chat.join", {"conversation_id": conv})
        # The process is stopped (SIGSTOP) with the send in flight, then killed:
        # the send's reply never comes, whether or not it was stored.
        victim.proc.send_signal(signal.SIGSTOP)
        sending = asyncio.create_task(rc.call("chat.send", {"conversation_id": conv, "content": "in flight"}))
        await asyncio.sleep(0.2)  # the frame is written to a stopped process: nothing to await
        await kill(victim)
        await victim.start()
        message = (await sending)["message"]
        assert message["content"] == "in flight" and message["client_msg_id"]
    finally:
        await rc.close()
        await room.close()
    stored = await db.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1 AND content = 'in flight'",
                               uuid.UUID(conv))
    assert stored == 1


async def test_the_tokens_of_a_registration_made_through_it_serve_its_reconnects(server, server2):
    """Signed in through the client itself: it follows the user's events from
    that registration, and a socket dropped under it resumes them, once each."""
    rc = await ResumingClient(server.url, backoff=Backoff(0.05, 0.4)).start()
    try:
        session = await rc.call("auth.register", {"email": new_email(), "password": PASSWORD, "name": "R", "gender": "x"})
        other = await server2.connect(access_token=session["access_token"])
        balances = [(await other.call("wallet.topup", {"amount": "5.00", "idempotency_key": uuid.uuid4().hex}))["balance"]]
        assert (await rc.next_event("wallet.updated"))["balance"] == balances[0]
        await rc.socket.ws.close()  # the app's side drops: nothing the server did
        for _ in range(2):
            balances.append((await other.call("wallet.topup", {"amount": "5.00", "idempotency_key": uuid.uuid4().hex}))["balance"])
        assert (await rc.call("users.me"))["balance"] == balances[-1]  # waits for the next socket
        # Every event in order: the second top-up may come live after the
        # reconnect's own event, and skipping to it would drop that one.
        seen = []
        while sum(name == "wallet.updated" for name, _ in seen) < 2:
            seen.append(await rc.next_event())
        assert [data["balance"] for name, data in seen if name == "wallet.updated"] == balances[1:]
        await other.close()
        assert rc.sockets == 2 and rc.user_events.through == 3
        rest = [name for name, _ in seen if name != "wallet.updated"]
        rest += [rc.events.get_nowait()[0] for _ in range(rc.events.qsize())]
        assert rest == ["client.reconnected"]  # nothing twice
    finally:
        await rc.close()


async def test_an_expired_access_token_is_refreshed_on_reconnect(stack):
    proc = await ServerProcess(stack, ACCESS_TOKEN_TTL_S="2").start()
    try:
        async with Client.connect(proc.url) as c:
            session = await register(c)
        rc = ResumingClient(proc.url, access_token=session["access_token"], refresh_token=session["refresh_token"])
        async with rc:
            # Announced at once (less than the lead left): refreshed on the socket.
            await rc.next_event("auth.expiring")
            deadline = asyncio.get_running_loop().time() + 10
            while rc.access_token == session["access_token"]:  # the refresh runs beside the app: bounded poll
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            assert (await rc.call("users.me"))["id"] == session["user"]["id"]
    finally:
        await proc.stop()


async def test_a_refused_refresh_token_ends_the_connection_with_that_error(server):
    async with Client.connect(server.url) as c:
        session = await register(c)
        await c.call("auth.refresh", {"refresh_token": session["refresh_token"]})  # spends it
    rc = ResumingClient(server.url, access_token="not a token", refresh_token=session["refresh_token"])
    with pytest.raises(RpcError) as raised:
        await rc.start()
    await rc.close()
    assert raised.value.code is ErrorCode.INVALID_CREDENTIALS


def test_backoff_is_exponential_with_full_jitter():
    top = Backoff(base=0.5, cap=4.0, rng=lambda: 1.0)
    assert [top.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    bottom = Backoff(base=0.5, cap=4.0, rng=lambda: 0.0)
    assert [bottom.next() for _ in range(3)] == [0.0, 0.0, 0.0]  # full jitter: down to zero
    top.reset()
    assert top.next() == 0.5


def test_a_seq_window_takes_each_seq_once_and_resumes_below_a_hole():
    w = SeqWindow(3)
    assert w.take_all([2, 4, 6, 4, 7]) == [4, 6, 7]
    assert w.through == 4  # 5 is missing: resuming from 4 fetches it
    assert w.take(5) and w.through == 7
    w.skip_to(10)
    assert not w.take(9) and w.take(11)
