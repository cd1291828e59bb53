"""The push hook: a user without a socket gets a signed POST for each chat
message and booking event meant for them, at least once, with the same id
on every retry, from any process, across restarts; a user with a socket
gets none. The receiver is an aiohttp server of this test on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import re
import subprocess
import sys
import time
import uuid
from typing import Any, AsyncIterator

import asyncpg
import pytest
from aiohttp import web

from server.config import PUSH_RETRY_MAX_S
from server.db import push as push_db
from server.presence import online_key
from server.push_delivery import FAILED_RETENTION, retry_delay
from tests.booking_support import book, booker, host, move_to_past, slot
from tests.chat_helpers import open_room
from tests.conftest import PRESENCE_TAG, ROOT, ServerProcess, free_port, wait_subscriber_connected

SECRET = "push-hook-test-secret-" + "s" * 32
RETRY_BASE_S = 0.2
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


@dataclasses.dataclass
class Post:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """Records every POST; answers 500 to a user's pushes while ``failing``
    holds them (a count of failures still to give, or None for "until told")."""

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.failing: dict[str, int | None] = {}
        self.url = ""
        self._arrived = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        post = Post(time.monotonic(), dict(request.headers), await request.read())
        user = post.payload.get("user_id")
        status = 200
        if user in self.failing:
            left = self.failing[user]
            status = 500
            if left is not None:
                if left <= 1:
                    del self.failing[user]
                else:
                    self.failing[user] = left - 1
        async with self._arrived:
            self.posts.append(post)
            self._arrived.notify_all()
        return web.Response(status=status)

    def of(self, user_id: str, event: str | None = None, about: str | None = None) -> list[Post]:
        """POSTs to ``user_id`` (of ``event``; about the message or booking ``about``)."""
        return [p for p in self.posts if p.payload["user_id"] == user_id and event in (None, p.payload["event"])
                and about in (None, *(v.get("id") for v in p.payload["data"].values() if isinstance(v, dict)))]

    async def wait(self, user_id: str, event: str, count: int = 1, about: str | None = None,
                   timeout: float = 20.0) -> list[Post]:
        """The first ``count`` POSTs of ``event`` to ``user_id`` (about ``about``)."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.of(user_id, event, about)) >= count),
                                   timeout)
        return self.of(user_id, event, about)[:count]


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/push", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    r.url = f"http://127.0.0.1:{port}/push"
    yield r
    await runner.cleanup()


@pytest.fixture(scope="module")
async def pushers(stack, receiver, server, server2) -> AsyncIterator[list[ServerProcess]]:
    """Two processes with the hook on, retrying fast. The hook is a setting
    of the whole deployment: a process without it that settled a booking of
    these tests, or relayed one of their events, would publish the event
    without a push. So the session's servers pause meanwhile."""
    paused = [server, server2]
    for p in paused:
        assert await p.stop() == 0
    procs = [ServerProcess(stack, PUSH_WEBHOOK_URL=receiver.url, PUSH_WEBHOOK_SECRET=SECRET,
                           PUSH_RETRY_BASE_S=str(RETRY_BASE_S), SETTLEMENT_INTERVAL_S="0.5") for _ in range(2)]
    try:
        for p in procs:
            await p.start()
        yield procs
    finally:
        for p in procs:
            await p.stop()
        for p in paused:
            await p.start()
            await wait_subscriber_connected(p)


def verified(post: Post) -> dict:
    """The payload of a POST whose signature is good, made just now."""
    match = re.fullmatch(r"t=([0-9]+),sha256=([0-9a-f]{64})", post.headers["X-Signature"])
    assert match, post.headers["X-Signature"]
    expected = hmac.new(SECRET.encode(), match[1].encode() + b"." + post.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(match[2], expected)
    assert abs(time.time() - int(match[1])) < 60
    assert post.headers["Content-Type"].startswith("application/json")
    payload = post.payload
    assert set(payload) == {"id", "user_id", "event", "data", "created_at"}
    assert str(uuid.UUID(payload["id"])) == payload["id"]
    assert RFC3339.fullmatch(payload["created_at"]), payload["created_at"]
    return payload


def parse_time(text: str) -> dt.datetime:
    assert RFC3339.fullmatch(text), text
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_same(wire: dict, given: dict) -> None:
    """A JSON object of the push equals what the API gave (ids as strings,
    times as RFC 3339 strings)."""
    assert set(wire) == set(given), (wire, given)
    for k, v in given.items():
        if isinstance(v, dt.datetime):
            assert parse_time(wire[k]) == v, k
        else:
            assert wire[k] == v, k


async def until_presence(redis, user_id: str, online: bool, timeout: float = 15.0) -> None:
    """Presence (Redis) says what is expected: a bounded poll, as presence
    changes inside the server processes, out of this test's sight."""
    deadline = time.monotonic() + timeout
    while bool(await redis.exists(online_key(uuid.UUID(user_id), PRESENCE_TAG))) != online:
        assert time.monotonic() < deadline, f"presence never said {user_id} is {'online' if online else 'offline'}"
        await asyncio.sleep(0.05)


async def until_none_pending(db: asyncpg.Pool, user_id: str, timeout: float = 20.0) -> None:
    """No push to ``user_id`` is left in the outbox: each one written was
    POSTed and answered 2xx, so the receiver has it."""
    deadline = time.monotonic() + timeout
    while await db.fetchval("SELECT count(*) FROM push_outbox WHERE user_id = $1", uuid.UUID(user_id)):
        assert time.monotonic() < deadline, f"pushes to {user_id} still pending"
        await asyncio.sleep(0.05)


async def until_events_published(db: asyncpg.Pool, user_id: str, timeout: float = 20.0) -> None:
    """Every user event of ``user_id`` is marked published: the pushes they
    make are written by then."""
    deadline = time.monotonic() + timeout
    while await db.fetchval("SELECT count(*) FROM user_events WHERE user_id = $1 AND NOT published",
                            uuid.UUID(user_id)):
        assert time.monotonic() < deadline, f"events of {user_id} never marked published"
        await asyncio.sleep(0.05)


async def offline_room(pushers: list[ServerProcess], redis, db: asyncpg.Pool) -> Any:
    """A conversation whose host has gone offline (the booker keeps a
    socket), with whatever the booking pushed delivered."""
    room = await open_room(pushers[0])
    await room.host.client.close()
    await until_presence(redis, room.host.user_id, online=False)
    for user in (room.host.user_id, room.booker.user_id):
        await until_events_published(db, user)
        await until_none_pending(db, user)
    return room


async def test_a_chat_message_to_a_user_without_a_socket_is_pushed_signed(pushers, receiver, redis, db):
    room = await offline_room(pushers, redis, db)
    try:
        sent = (await room.booker.client.call("chat.send", {
            "conversation_id": room.conversation_id, "content": "hello\nthere 👋", "client_msg_id": str(uuid.uuid4()),
        }))["message"]
        [post] = await receiver.wait(room.host.user_id, "chat.message")
        payload = verified(post)
        assert payload["user_id"] == room.host.user_id and payload["event"] == "chat.message"
        assert_same(payload["data"]["message"], sent)
        assert parse_time(payload["created_at"]) == sent["created_at"]

        # A replay of the same client_msg_id stores nothing and pushes nothing more.
        again = await room.booker.client.call("chat.send", {
            "conversation_id": room.conversation_id, "content": "hello\nthere 👋", "client_msg_id": sent["client_msg_id"],
        })
        assert again["message"]["id"] == sent["id"]
        await until_none_pending(db, room.host.user_id)
        assert len(receiver.of(room.host.user_id, "chat.message")) == 1
    finally:
        await room.close()


async def test_booking_events_to_a_host_without_a_socket_are_pushed(pushers, receiver, redis, db):
    host_client, host_id = await host(pushers[1], price="10.00")
    booker_client, _ = await booker(pushers[0])
    try:
        await host_client.close()
        await until_presence(redis, host_id, online=False)

        created = await book(booker_client, host_id, slot(days=3))
        [post] = await receiver.wait(host_id, "booking.created")
        payload = verified(post)
        assert payload["user_id"] == host_id
        assert_same(payload["data"]["booking"], created)
        assert payload["data"]["booking"]["amount"] == "10.00"

        cancelled = (await booker_client.call("bookings.cancel", {"booking_id": created["id"]}))["booking"]
        [post] = await receiver.wait(host_id, "booking.cancelled")
        assert_same(verified(post)["data"]["booking"], cancelled)

        ended = await book(booker_client, host_id, slot(days=4))
        await move_to_past(db, ended["id"])
        [post] = await receiver.wait(host_id, "booking.completed")
        payload = verified(post)
        assert payload["data"]["booking"]["id"] == ended["id"]
        assert payload["data"]["booking"]["status"] == "completed"

        # One push per event, and none for wallet.updated (the host was paid).
        await until_events_published(db, host_id)
        await until_none_pending(db, host_id)
        assert sorted(p.payload["event"] for p in receiver.of(host_id)) == [
            "booking.cancelled", "booking.completed", "booking.created", "booking.created"]
    finally:
        await booker_client.close()


async def test_a_user_with_a_socket_gets_no_push_while_one_without_does(pushers, receiver, redis, db):
    # Needs presence (online:{user} keys set while a socket is authenticated).
    room = await offline_room(pushers, redis, db)
    booker_id = room.booker.user_id
    try:
        await until_presence(redis, booker_id, online=True)
        since = len(receiver.posts)  # what the booking pushed while nobody was online has arrived
        again = await book(room.booker.client, room.host.user_id, slot(days=5))
        await receiver.wait(room.host.user_id, "booking.created", about=again["id"])

        host_socket = await pushers[1].connect(access_token=room.host.access_token)
        room.host.extra.append(host_socket)
        await until_presence(redis, room.host.user_id, online=True)
        await host_socket.call("chat.send", {"conversation_id": room.conversation_id, "content": "seen live"})
        await room.booker.client.call("bookings.cancel", {"booking_id": again["id"]})

        await until_events_published(db, booker_id)
        await until_none_pending(db, booker_id)
        assert [p for p in receiver.posts[since:] if p.payload["user_id"] == booker_id] == []
    finally:
        await room.close()


async def test_with_redis_down_pushes_go_out_and_booking_events_are_pushed_once_it_answers(
        pushers, receiver, redis, db, stack):
    room = await offline_room(pushers, redis, db)
    try:
        await asyncio.to_thread(stack.stop_redis)
        try:
            # Presence cannot be asked: the host counts as offline, and the
            # push needs only PostgreSQL and the receiver.
            sent = (await room.booker.client.call("chat.send", {"conversation_id": room.conversation_id,
                                                                 "content": "redis is down"}))["message"]
            await receiver.wait(room.host.user_id, "chat.message", about=sent["id"])
            # Published (and so pushed) only by the relay, once Redis answers.
            made = await book(room.booker.client, room.host.user_id, slot(days=6))
        finally:
            await asyncio.to_thread(stack.start_redis)
        [post] = await receiver.wait(room.host.user_id, "booking.created", about=made["id"])
        assert_same(verified(post)["data"]["booking"], made)
        await until_events_published(db, room.host.user_id)
        await until_none_pending(db, room.host.user_id)
        assert len(receiver.of(room.host.user_id, "booking.created", about=made["id"])) == 1
    finally:
        await room.close()
        for p in pushers:
            await wait_subscriber_connected(p)


async def test_a_failed_push_is_retried_with_backoff_and_the_same_id(pushers, receiver, redis, db):
    room = await offline_room(pushers, redis, db)
    try:
        receiver.failing[room.host.user_id] = 3
        sent = (await room.booker.client.call("chat.send", {"conversation_id": room.conversation_id,
                                                             "content": "again"}))["message"]
        posts = await receiver.wait(room.host.user_id, "chat.message", count=4)
        payloads = [verified(p) for p in posts]
        assert len({p["id"] for p in payloads}) == 1
        assert all(p["data"]["message"]["id"] == sent["id"] for p in payloads)
        gaps = [b.at - a.at for a, b in zip(posts, posts[1:])]
        # Each delay is at least half of base * 2^(n-1) (jittered below it).
        for n, gap in enumerate(gaps, start=1):
            assert gap >= RETRY_BASE_S * 2 ** (n - 1) / 2 - 0.01, gaps
        await until_none_pending(db, room.host.user_id)
        assert len(receiver.of(room.host.user_id, "chat.message")) == 4
    finally:
        await room.close()


async def test_a_pending_push_survives_a_restart_of_every_process(pushers, receiver, redis, db):
    room = await offline_room(pushers, redis, db)
    try:
        receiver.failing[room.host.user_id] = None
        await room.booker.client.call("chat.send", {"conversation_id": room.conversation_id, "content": "later"})
        [first] = await receiver.wait(room.host.user_id, "chat.message")
        await room.booker.close()
        for p in pushers:
            assert await p.stop() == 0
        stored = await db.fetchval("SELECT id FROM push_outbox WHERE user_id = $1 AND event = 'chat.message'",
                                   uuid.UUID(room.host.user_id))
        assert str(stored) == first.payload["id"]

        del receiver.failing[room.host.user_id]
        restarted = time.monotonic()
        for p in pushers:
            await p.start()
        # The failures before the stop pushed the retry back (doubling from
        # RETRY_BASE_S); it is delivered once due, whatever that took.
        due_in = await db.fetchval("SELECT greatest(0, extract(epoch FROM next_at - now()))::float8 FROM push_outbox "
                                   "WHERE id = $1", stored)
        await until_none_pending(db, room.host.user_id, timeout=(due_in or 0) + 20.0)
        posts = receiver.of(room.host.user_id, "chat.message")
        assert {verified(p)["id"] for p in posts} == {first.payload["id"]}
        assert posts[-1].at > restarted
    finally:
        await room.close()


async def test_a_push_one_process_wrote_is_delivered_by_another(pushers, receiver, redis, db):
    room = await offline_room(pushers, redis, db)  # the booker's socket is on pushers[0]
    try:
        receiver.failing[room.host.user_id] = None
        await room.booker.client.call("chat.send", {"conversation_id": room.conversation_id, "content": "via 1"})
        [first] = await receiver.wait(room.host.user_id, "chat.message")
        await room.booker.close()
        assert await pushers[0].stop() == 0
        stopped = time.monotonic()
        del receiver.failing[room.host.user_id]
        await until_none_pending(db, room.host.user_id)  # only pushers[1] runs
        posts = receiver.of(room.host.user_id, "chat.message")
        assert {p.payload["id"] for p in posts} == {first.payload["id"]}
        assert posts[-1].at > stopped
    finally:
        await room.close()
        await pushers[0].start()


async def test_two_processes_share_the_deliveries_each_push_once(pushers, receiver, redis, db):
    room = await offline_room(pushers, redis, db)
    second = await pushers[1].connect(access_token=room.booker.access_token)
    room.booker.extra.append(second)
    try:
        sends = [c.call("chat.send", {"conversation_id": room.conversation_id, "content": f"n{i}"})
                 for i in range(15) for c in (room.booker.client, second)]
        sent = {r["message"]["id"] for r in await asyncio.gather(*sends)}
        await until_none_pending(db, room.host.user_id)
        posts = [verified(p) for p in receiver.of(room.host.user_id, "chat.message")]
        assert sorted(p["data"]["message"]["id"] for p in posts) == sorted(sent)
        assert len({p["id"] for p in posts}) == len(posts) == 30
    finally:
        await room.close()


def message_data() -> str:
    return json.dumps({"message": {
        "id": str(uuid.uuid4()), "conversation_id": str(uuid.uuid4()), "seq": 1, "sender_id": str(uuid.uuid4()),
        "content": "an old one", "created_at": "2026-01-01T00:00:00Z", "client_msg_id": None}})


async def test_a_push_failing_for_an_hour_is_given_up_and_kept_for_operators(pushers, receiver, db):
    user = uuid.uuid4()
    receiver.failing[str(user)] = None
    try:
        old, young = [r["id"] for r in await db.fetch(
            """INSERT INTO push_outbox (user_id, event, data, created_at, queued_at)
               VALUES ($1, 'chat.message', $2::jsonb, now(), now() - interval '61 minutes'),
                      ($1, 'chat.message', $2::jsonb, now(), now() - interval '59 minutes')
               RETURNING id""", user, message_data())]
        # The young one is retried; by its second attempt the old one was given up.
        await receiver.wait(str(user), "chat.message", count=3)
        attempts = [p.payload["id"] for p in receiver.of(str(user))]
        assert attempts.count(str(old)) == 1 and attempts.count(str(young)) >= 2
        rows = {r["id"]: r for r in await db.fetch("SELECT * FROM push_outbox WHERE user_id = $1", user)}
        assert rows[old]["failed_at"] is not None and rows[old]["last_error"] == "HTTP 500"
        assert rows[young]["failed_at"] is None
    finally:
        await db.execute("DELETE FROM push_outbox WHERE user_id = $1", user)
        del receiver.failing[str(user)]


async def test_pushes_given_up_over_a_week_ago_are_deleted(db):
    user = uuid.uuid4()
    try:
        old, recent = [r["id"] for r in await db.fetch(
            """INSERT INTO push_outbox (user_id, event, data, created_at, failed_at)
               VALUES ($1, 'chat.message', $2::jsonb, now(), now() - $3::interval - interval '1 hour'),
                      ($1, 'chat.message', $2::jsonb, now(), now() - $3::interval + interval '1 hour')
               RETURNING id""", user, message_data(), FAILED_RETENTION)]
        async with db.acquire() as conn:
            assert await push_db.delete_failed(conn, FAILED_RETENTION, 1000) >= 1
        assert [r["id"] for r in await db.fetch("SELECT id FROM push_outbox WHERE user_id = $1", user)] == [recent]
    finally:
        await db.execute("DELETE FROM push_outbox WHERE user_id = $1", user)


def test_retry_delays_double_from_the_base_up_to_five_minutes_with_jitter():
    for attempts in range(1, 40):
        full = min(PUSH_RETRY_MAX_S, 2.0 * 2 ** (attempts - 1))
        delays = [retry_delay(2.0, attempts) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 1
    # Retrying for an hour takes a dozen attempts or more at the default base.
    assert sum(min(PUSH_RETRY_MAX_S, 2.0 * 2 ** n) for n in range(12)) < 3600


@pytest.mark.parametrize(("env", "named"), [
    ({"PUSH_WEBHOOK_URL": "https://push.example.test/hook"}, "PUSH_WEBHOOK_SECRET"),
    ({"PUSH_WEBHOOK_URL": "https://push.example.test/hook", "PUSH_WEBHOOK_SECRET": "s" * 31}, "PUSH_WEBHOOK_SECRET"),
    ({"PUSH_WEBHOOK_URL": "push.example.test/hook", "PUSH_WEBHOOK_SECRET": SECRET}, "PUSH_WEBHOOK_URL"),
    ({"PUSH_WEBHOOK_URL": "http://push.example.test:port/", "PUSH_WEBHOOK_SECRET": SECRET}, "PUSH_WEBHOOK_URL"),
    ({"PUSH_RETRY_BASE_S": "0"}, "PUSH_RETRY_BASE_S"),
    ({"PUSH_RETRY_BASE_S": "301"}, "PUSH_RETRY_BASE_S"),
    ({"PUSH_RETRY_BASE_S": "soon"}, "PUSH_RETRY_BASE_S"),
])
def test_a_bad_push_setting_stops_serve_naming_it(stack, env, named):
    proc = ServerProcess(stack, **env)
    done = subprocess.run([sys.executable, "-m", "server", "serve"], cwd=ROOT, env=proc.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert SECRET not in done.stderr
