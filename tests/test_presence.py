"""Presence: a user is online while a socket of theirs is authenticated on any
process; offline once none has been for 5 s (a reconnect within that time
does not flicker); a killed process's sockets stop counting within its
heartbeat's TTL. Each change reaches the other party's sockets joined to
their shared conversations as ``chat.presence``, and no one else's."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest

from protocol.client import Client
from server.config import Config, ConfigError
from tests.chat_helpers import Party, open_room
from tests.conftest import PASSWORD, PRESENCE_TAG, ServerProcess, wait_subscriber_connected

OFFLINE_AFTER_S = Config.presence_offline_after_s
# The change is made once the delay has passed, by a sweep (every second),
# and must reach the watchers within 5 s of it.
ANNOUNCED_WITHIN_S = 5.0


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def join(client: Client, conversation_id: str) -> dict:
    return await client.call("chat.join", {"conversation_id": conversation_id})


def presences(client: Client) -> list[dict]:
    """The chat.presence events already received (others are dropped)."""
    return [data for name, data in client.drain_events() if name == "chat.presence"]


async def stored_last_seen(db, user_id: str, *, online: bool, timeout: float = 5.0) -> dt.datetime | None:
    """users.last_seen_at once it shows the state (null while online). The
    announcing process writes it right after the change; a bounded poll."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        seen = await db.fetchval("SELECT last_seen_at FROM users WHERE id = $1", uuid.UUID(user_id))
        if (seen is None) == online:
            return seen
        assert asyncio.get_running_loop().time() < deadline, f"last_seen_at is {seen}, online={online} expected"
        await asyncio.sleep(0.05)


async def go_offline(party: Party) -> dt.datetime:
    """Close every socket of the party; returns when the last one was closed."""
    await party.close()
    party.extra.clear()
    return now()


async def test_online_and_offline_reach_the_other_party_across_processes(server, server2, db):
    room = await open_room(server, server2)  # the booker on process 1, the host on process 2
    try:
        joined = await join(room.booker.client, room.conversation_id)
        assert joined["presence"] == {"user_id": room.host.user_id, "online": True, "last_seen_at": None}
        assert await stored_last_seen(db, room.host.user_id, online=True) is None

        closed_at = await go_offline(room.host)
        started = asyncio.get_running_loop().time()
        event = await room.booker.client.next_event("chat.presence", timeout=OFFLINE_AFTER_S + ANNOUNCED_WITHIN_S + 2)
        waited = asyncio.get_running_loop().time() - started
        # Not before the delay (no flicker), and within 5 s of the change.
        assert OFFLINE_AFTER_S - 0.5 <= waited <= OFFLINE_AFTER_S + ANNOUNCED_WITHIN_S, waited
        assert event["conversation_id"] == room.conversation_id
        assert event["user_id"] == room.host.user_id and event["online"] is False
        last_seen = event["last_seen_at"]
        assert abs((last_seen - closed_at).total_seconds()) < 2, (last_seen, closed_at)
        assert await stored_last_seen(db, room.host.user_id, online=False) == last_seen

        # A socket joining now is told the same.
        late = await server.connect(access_token=room.booker.access_token)
        room.booker.extra.append(late)
        assert (await join(late, room.conversation_id))["presence"] == {
            "user_id": room.host.user_id, "online": False, "last_seen_at": last_seen}

        # Going online is immediate: announced well within 5 s.
        room.host.client = await server2.connect(access_token=room.host.access_token)
        for watcher in (room.booker.client, late):
            event = await watcher.next_event("chat.presence", timeout=ANNOUNCED_WITHIN_S)
            assert event == {"conversation_id": room.conversation_id, "user_id": room.host.user_id,
                             "online": True, "last_seen_at": None}
        assert await stored_last_seen(db, room.host.user_id, online=True) is None
        assert (await join(late, room.conversation_id))["presence"]["online"] is True
    finally:
        await room.close()


async def until_leaving(redis, user_id: str, timeout: float = 5.0) -> None:
    """Until the server has seen the user's last socket go (a bounded poll of
    Redis, where nothing can be awaited)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await redis.zscore(f"{PRESENCE_TAG}presence:leaving", user_id) is None:
        assert asyncio.get_running_loop().time() < deadline, "the last socket's close was never seen"
        await asyncio.sleep(0.02)


async def test_a_reconnect_within_the_delay_does_not_flicker(server, server2, db, redis):
    room = await open_room(server, server2)
    try:
        await join(room.booker.client, room.conversation_id)
        await go_offline(room.host)
        await until_leaving(redis, room.host.user_id)
        # The app reconnects, to the other process, after a backoff that
        # spans several sweeps but ends within the delay.
        await asyncio.sleep(OFFLINE_AFTER_S / 2)
        room.host.client = await server.connect(access_token=room.host.access_token)
        with pytest.raises(asyncio.TimeoutError):
            await room.booker.client.next_event("chat.presence", timeout=OFFLINE_AFTER_S + ANNOUNCED_WITHIN_S)
        assert await stored_last_seen(db, room.host.user_id, online=True) is None
        assert (await join(room.booker.client, room.conversation_id))["presence"]["online"] is True

        # The same user then gone for good: offline once, as in the first test.
        await go_offline(room.host)
        event = await room.booker.client.next_event("chat.presence", timeout=OFFLINE_AFTER_S + ANNOUNCED_WITHIN_S + 2)
        assert event["online"] is False
    finally:
        await room.close()


async def test_a_socket_whose_token_expired_does_not_keep_its_user_online(stack, server, server2):
    """Its user gets no events on it, so the push hook must see them offline."""
    ttl_s = 3
    short = await ServerProcess(stack, ACCESS_TOKEN_TTL_S=str(ttl_s), AUTH_EXPIRING_LEAD_S="1").start()
    try:
        room = await open_room(server, server2)
        try:
            await join(room.booker.client, room.conversation_id)
            # The host's one socket left is signed in with a token that lives ttl_s.
            email = (await room.host.client.call("users.me"))["email"]
            phone = await short.connect()
            room.host.extra.append(phone)
            await phone.call("auth.login", {"email": email, "password": PASSWORD})
            signed_in = asyncio.get_running_loop().time()
            await room.host.client.close()
            event = await room.booker.client.next_event("chat.presence",
                                                        timeout=ttl_s + OFFLINE_AFTER_S + ANNOUNCED_WITHIN_S)
            assert event["user_id"] == room.host.user_id and event["online"] is False
            # Counted until its token expired, then the usual delay.
            assert asyncio.get_running_loop().time() - signed_in >= ttl_s + OFFLINE_AFTER_S - 1
            assert not phone.closed.is_set()
        finally:
            await room.close()
    finally:
        await short.stop()


async def test_a_killed_process_takes_its_users_offline(stack, server, server2, db, redis):
    """The host's only socket is on a process killed with SIGKILL: once its
    heartbeat key expires the host goes offline, announced once to each
    watching socket although two live processes sweep."""
    ttl_s = 3.0
    victim = await ServerProcess(stack, PRESENCE_TTL_S=str(ttl_s), PRESENCE_HEARTBEAT_S="1").start()
    try:
        room = await open_room(server, victim)
        try:
            other = await server2.connect(access_token=room.booker.access_token)
            room.booker.extra.append(other)
            for watcher in (room.booker.client, other):
                assert (await join(watcher, room.conversation_id))["presence"]["online"] is True

            victim.proc.kill()
            killed_at = now()
            started = asyncio.get_running_loop().time()
            for watcher in (room.booker.client, other):
                event = await watcher.next_event("chat.presence", timeout=ttl_s + OFFLINE_AFTER_S + ANNOUNCED_WITHIN_S)
                assert event["user_id"] == room.host.user_id and event["online"] is False
                # Last seen at its last sign of life, which its heartbeat's TTL bounds.
                slack = dt.timedelta(seconds=0.5)  # Redis's clock against ours
                assert killed_at - dt.timedelta(seconds=ttl_s) - slack <= event["last_seen_at"] <= killed_at + slack
            assert asyncio.get_running_loop().time() - started < 60  # the contract's bound
            assert await redis.exists(f"{PRESENCE_TAG}online:{room.host.user_id}") == 0
            assert await stored_last_seen(db, room.host.user_id, online=False) == event["last_seen_at"]
            # Exactly once: no second announcement from the other sweeper.
            with pytest.raises(asyncio.TimeoutError):
                await other.next_event("chat.presence", timeout=2)
            assert presences(room.booker.client) == []
        finally:
            await room.close()
    finally:
        await victim.stop()


async def test_presence_reaches_only_the_other_party_of_shared_conversations(server, server2):
    """A booker with two hosts: one host's change reaches the booker in
    their conversation only; the other host, a stranger to it, gets nothing."""
    first = await open_room(server, server2)
    second = await open_room(server, server2, booker=first.booker)
    try:
        await join(first.booker.client, first.conversation_id)
        await join(first.booker.client, second.conversation_id)
        await join(second.host.client, second.conversation_id)
        await go_offline(first.host)
        event = await first.booker.client.next_event("chat.presence", timeout=OFFLINE_AFTER_S + ANNOUNCED_WITHIN_S + 2)
        assert event["conversation_id"] == first.conversation_id and event["user_id"] == first.host.user_id
        with pytest.raises(asyncio.TimeoutError):
            await second.host.client.next_event("chat.presence", timeout=1)
        assert presences(first.booker.client) == []
    finally:
        await first.host.close()
        await second.close()


async def test_presence_rides_out_a_redis_restart(stack, server, redis):
    """Presence never fails a call: with Redis away, chat.join answers with
    the state PostgreSQL has. Redis back without its data, the processes
    write their sockets' counts again at their next heartbeat."""
    beating = await ServerProcess(stack, PRESENCE_HEARTBEAT_S="1").start()
    try:
        room = await open_room(server, beating)
        try:
            await asyncio.to_thread(stack.stop_redis)
            try:
                joined = await join(room.booker.client, room.conversation_id)
            finally:
                await asyncio.to_thread(stack.start_redis)
            assert joined["presence"] == {"user_id": room.host.user_id, "online": True, "last_seen_at": None}

            deadline = asyncio.get_running_loop().time() + 10
            while not await redis.exists(f"{PRESENCE_TAG}online:{room.host.user_id}"):  # a bounded poll of Redis
                assert asyncio.get_running_loop().time() < deadline, "the host's socket was never counted again"
                await asyncio.sleep(0.05)
            assert (await join(room.booker.client, room.conversation_id))["presence"]["online"] is True
        finally:
            await room.close()
    finally:
        await beating.stop()
        await wait_subscriber_connected(server)


@pytest.mark.parametrize("env, name", [
    ({"PRESENCE_TTL_S": "61"}, "PRESENCE_TTL_S"),
    ({"PRESENCE_TTL_S": "10", "PRESENCE_HEARTBEAT_S": "10"}, "PRESENCE_HEARTBEAT_S"),
    ({"PRESENCE_OFFLINE_AFTER_S": "-1"}, "PRESENCE_OFFLINE_AFTER_S"),
    ({"PRESENCE_SWEEP_INTERVAL_S": "0"}, "PRESENCE_SWEEP_INTERVAL_S"),
])
def test_presence_settings_out_of_range_are_refused(monkeypatch, env, name):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=name):
        Config.from_env()
