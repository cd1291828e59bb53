"""auth.*: register, login (and its rate limit), authenticate, refresh
rotation, logout, tokens at the upgrade, and access-token expiry on a live
socket."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import struct
import time
import uuid
from typing import AsyncIterator

import aiohttp
import jwt
import pytest

from protocol.client import Client
from protocol.codec import encode
from server.credentials import issue_access_token
from server.config import DEV_JWT_SECRET
from tests.booking_support import events_until
from tests.chat_helpers import RawSocket, open_room
from tests.conftest import (PASSWORD, ServerProcess, new_email, post_kyc, register, replay_paused, replica_caught_up,
                            row_locked, until_replica_has_replayed, until_writes_wait_on_the_lock, verified_user)

UTC = dt.timezone.utc


async def error_of(client: Client, method: str, params: dict | None = None) -> dict:
    reply = await client.call_raw(method, params)
    assert "error" in reply, reply
    return reply["error"]


def mint_access_token(user_id: str, ttl_s: int, session: dict | None = None) -> str:
    """A token exactly as the server issues them, with a chosen lifetime, in
    the family (session) of ``session``'s access token, else in a made-up one."""
    family = jwt.decode(session["access_token"], options={"verify_signature": False})["fam"] if session else str(uuid.uuid4())
    return issue_access_token(DEV_JWT_SECRET, ttl_s, uuid.UUID(user_id), uuid.UUID(family))


async def upgrade_status(server: ServerProcess, **kw) -> int:
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(server.url, **kw):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


# ---- register --------------------------------------------------------------


async def test_register_trims_and_lowercases_the_email(server):
    local = uuid.uuid4().hex[:12]
    async with await server.connect() as c:
        s = await c.call(
            "auth.register",
            {"email": f"  {local.upper()}@Example.TEST \n", "password": PASSWORD, "name": "Ann", "gender": "female"},
        )
        assert s["user"]["email"] == f"{local}@example.test"
    async with await server.connect() as c:
        s = await c.call("auth.login", {"email": f" {local}@EXAMPLE.test ", "password": PASSWORD})
        assert s["user"]["email"] == f"{local}@example.test"


async def test_a_new_user_is_kyc_pending_and_the_socket_is_authenticated(server):
    async with await server.connect() as c:
        s = await register(c, name="Bea", gender="f")
        assert s["user"]["kyc_status"] == "pending"
        assert s["user"]["balance"] == "0.00"
        assert s["user"]["price_per_hour"] is None
        assert s["access_token"] and s["refresh_token"]
        me = await c.call("users.me")  # no further auth call needed
        assert me["id"] == s["user"]["id"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("email", "not-an-email"),
        ("email", "two@@example.test"),
        ("email", "no-dot@example"),
        ("email", "sp ace@example.test"),
        ("email", ""),
        ("password", "x" * 7),
        ("password", "x" * 257),
        ("name", ""),
        ("name", "n" * 256),
        ("gender", ""),
        ("gender", "g" * 21),
        ("password", 12345678),
    ],
)
async def test_register_refuses_an_invalid_field(server, field, value):
    params = {"email": new_email(), "password": PASSWORD, "name": "Ann", "gender": "female", field: value}
    async with await server.connect() as c:
        err = await error_of(c, "auth.register", params)
        assert err["code"] == "invalid_params"
        assert [e["field"] for e in err["data"]["errors"]] == [field]


async def test_register_accepts_the_bounds_of_every_field(server):
    async with await server.connect() as c:
        s = await c.call(
            "auth.register",
            {"email": new_email(), "password": "p" * 8, "name": "n", "gender": "g" * 20},
        )
        assert s["user"]["gender"] == "g" * 20
    async with await server.connect() as c:
        s = await c.call(
            "auth.register",
            {"email": new_email(), "password": "p" * 256, "name": "n" * 255, "gender": "g"},
        )
        assert s["user"]["name"] == "n" * 255


async def test_register_names_every_failing_field(server):
    async with await server.connect() as c:
        err = await error_of(c, "auth.register", {"email": "nope", "password": "short", "name": "", "gender": "g" * 21})
        assert err["code"] == "invalid_params"
        assert sorted(e["field"] for e in err["data"]["errors"]) == ["email", "gender", "name", "password"]


async def test_register_with_an_email_in_use_is_email_taken_whatever_its_case(server):
    email = new_email()
    async with await server.connect() as c:
        await register(c, email=email)
    async with await server.connect() as c:
        for taken in (email, email.upper(), f"  {email} "):
            err = await error_of(c, "auth.register", {"email": taken, "password": PASSWORD, "name": "B", "gender": "m"})
            assert err["code"] == "email_taken"
        err = await error_of(c, "users.me")  # the failed registration did not authenticate
        assert err["code"] == "unauthenticated"


# ---- login -----------------------------------------------------------------


async def test_login_returns_a_session_and_authenticates_the_socket(server):
    email = new_email()
    async with await server.connect() as c:
        s = await register(c, email=email)
    async with await server.connect() as c:
        again = await c.call("auth.login", {"email": email, "password": PASSWORD})
        assert again["user"] == s["user"]
        assert again["refresh_token"] != s["refresh_token"]
        assert (await c.call("users.me"))["id"] == s["user"]["id"]


async def test_invalid_credentials_are_identical_for_an_unknown_email_and_a_wrong_password(server):
    email = new_email()
    async with await server.connect() as c:
        await register(c, email=email)
    async with await server.connect() as c:
        wrong_password = await error_of(c, "auth.login", {"email": email, "password": "wrong password"})
        unknown_email = await error_of(c, "auth.login", {"email": new_email(), "password": "wrong password"})
        assert wrong_password["code"] == "invalid_credentials"
        assert wrong_password == unknown_email  # same code, message and data
        assert (await error_of(c, "users.me"))["code"] == "unauthenticated"


async def test_failed_logins_are_limited_per_email_across_processes(server, server2):
    email = new_email()
    async with await server.connect() as c:
        await register(c, email=email)
    async with await server.connect() as one, await server2.connect() as two:
        started = time.monotonic()
        for client in (one, two, one, two, one):  # 5 failures, on both processes
            assert (await error_of(client, "auth.login", {"email": email, "password": "bad password"}))["code"] == (
                "invalid_credentials"
            )
        for client, password in ((two, PASSWORD), (one, PASSWORD), (two, "bad password")):
            err = await error_of(client, "auth.login", {"email": email.upper(), "password": password})
            assert err["code"] == "rate_limited"
            left = 60 - (time.monotonic() - started)
            assert left - 1 <= err["data"]["retry_after"] <= 60
        # Another email is not affected.
        other = new_email()
        await register(two, email=other)
        assert (await two.call("auth.login", {"email": other, "password": PASSWORD}))["user"]["email"] == other


async def test_concurrent_wrong_guesses_cannot_slip_under_the_limit(server, server2):
    email = new_email()
    async with await server.connect() as c:
        await register(c, email=email)
    async with await server.connect() as one, await server2.connect() as two:
        replies = await asyncio.gather(
            *(
                client.call_raw("auth.login", {"email": email, "password": f"guess {i}"})
                for i in range(15)
                for client in (one, two)
            )
        )
    codes = [r["error"]["code"] for r in replies]
    assert codes.count("invalid_credentials") <= 5  # LOGIN_MAX_FAILURES
    assert set(codes) == {"invalid_credentials", "rate_limited"}


@pytest.fixture(scope="module")
async def short_window_server(stack):
    proc = await ServerProcess(stack, LOGIN_MAX_FAILURES="2", LOGIN_WINDOW_S="3").start()
    yield proc
    await proc.stop()


async def test_a_login_whose_socket_closes_mid_check_is_not_counted(server, redis):
    async with await server.connect() as c:
        s = await register(c)
    email = s["user"]["email"]
    key = f"login-failures:{email}"
    for _ in range(3):
        raw = await RawSocket.connect(server, s["access_token"])
        login = encode({"id": 1, "method": "auth.login", "params": {"email": email, "password": PASSWORD}})
        await raw.send_frames([(0x2, login)])
        # Counted up front; close while the (argon2, slow) password check runs.
        deadline = asyncio.get_running_loop().time() + 5
        while await redis.get(key) is None:
            assert asyncio.get_running_loop().time() < deadline, "the login was never counted"
            await asyncio.sleep(0.001)
        await raw.send_frames([(0x8, struct.pack("!H", 1000))])
        frames = []
        while (frame := await raw.frame())[0] != 0x8:
            frames.append(frame)
        assert frames == []  # cancelled: no reply went out
        raw.close()
    # Nothing stays counted against the email (the releases run in the background).
    deadline = asyncio.get_running_loop().time() + 5
    while await redis.get(key) is not None:
        assert asyncio.get_running_loop().time() < deadline, await redis.get(key)
        await asyncio.sleep(0.02)


async def test_the_login_window_is_fixed_from_the_first_failure_and_a_success_does_not_reset_it(short_window_server):
    email = new_email()
    async with await short_window_server.connect() as c:
        await register(c, email=email)
        first_failure = time.monotonic()
        assert (await error_of(c, "auth.login", {"email": email, "password": "bad password"}))["code"] == (
            "invalid_credentials"
        )
        await c.call("auth.login", {"email": email, "password": PASSWORD})  # does not reset the count
        await asyncio.sleep(1.5)  # let half the window pass: a sliding window would restart here
        assert (await error_of(c, "auth.login", {"email": email, "password": "bad password"}))["code"] == (
            "invalid_credentials"
        )
        limited = await error_of(c, "auth.login", {"email": email, "password": PASSWORD})
        assert limited["code"] == "rate_limited"
        retry_after = limited["data"]["retry_after"]
        left = 3 - (time.monotonic() - first_failure)
        # The seconds left in the window begun at the first failure (~1.5,
        # rounded up), not a fresh 3-second window.
        assert left <= retry_after < left + 1.5 < 3
        await asyncio.sleep(retry_after)  # waiting out the window is the point
        s = await c.call("auth.login", {"email": email, "password": PASSWORD})
        assert s["user"]["email"] == email


# ---- authenticate ----------------------------------------------------------


async def test_authenticate_binds_a_socket(server):
    async with await server.connect() as c:
        s = await register(c)
    async with await server.connect() as c:
        assert (await error_of(c, "users.me"))["code"] == "unauthenticated"
        result = await c.call("auth.authenticate", {"access_token": s["access_token"]})
        assert result["user"]["id"] == s["user"]["id"]
        assert result["user"]["email"] == s["user"]["email"]
        assert (await c.call("users.me"))["id"] == s["user"]["id"]


async def test_authenticate_rebinds_a_socket_to_another_user(server):
    async with await server.connect() as c:
        a = await register(c, name="A")
        b = await register(c, name="B")  # registering again rebinds too
        assert (await c.call("users.me"))["id"] == b["user"]["id"]
        await c.call("auth.authenticate", {"access_token": a["access_token"]})
        assert (await c.call("users.me"))["id"] == a["user"]["id"]
        # Events about B no longer reach it; events about A do.
        assert (await post_kyc(server, b["user"]["id"], "verified")).status == 200
        assert (await post_kyc(server, a["user"]["id"], "rejected")).status == 200
        event = await c.next_event("user.updated")
        assert event["user"]["id"] == a["user"]["id"]


async def test_an_expired_token_is_token_expired(server):
    async with await server.connect() as c:
        s = await register(c)
        expired = mint_access_token(s["user"]["id"], -5)
        assert (await error_of(c, "auth.authenticate", {"access_token": expired}))["code"] == "token_expired"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        jwt.encode({"sub": str(uuid.uuid4()), "exp": int(time.time()) + 600, "typ": "access"}, "another-secret-of-the-same-length-as-ours", "HS256"),
        jwt.encode({"sub": str(uuid.uuid4()), "exp": int(time.time()) + 600, "typ": "refresh"}, DEV_JWT_SECRET, "HS256"),
        jwt.encode({"sub": "not-a-uuid", "exp": int(time.time()) + 600, "typ": "access"}, DEV_JWT_SECRET, "HS256"),
        jwt.encode({"sub": str(uuid.uuid4()), "typ": "access"}, DEV_JWT_SECRET, "HS256"),  # no exp
        "x" * 60_000,
    ],
    ids=["empty", "garbage", "three-parts", "wrong-secret", "not-access", "bad-subject", "no-exp", "huge"],
)
async def test_an_invalid_token_is_unauthenticated(server, token):
    async with await server.connect() as c:
        err = await error_of(c, "auth.authenticate", {"access_token": token})
        assert err["code"] == "unauthenticated"


async def test_a_refresh_token_is_not_an_access_token(server):
    async with await server.connect() as c:
        s = await register(c)
        err = await error_of(c, "auth.authenticate", {"access_token": s["refresh_token"]})
        assert err["code"] == "unauthenticated"


async def test_a_token_of_an_unknown_user_is_unauthenticated(server):
    async with await server.connect() as c:
        err = await error_of(c, "auth.authenticate", {"access_token": mint_access_token(str(uuid.uuid4()), 600)})
        assert err["code"] == "unauthenticated"


async def test_a_failed_authenticate_keeps_the_earlier_binding(server):
    async with await server.connect() as c:
        s = await register(c)
        for token in ("", "garbage", mint_access_token(s["user"]["id"], -5)):
            await error_of(c, "auth.authenticate", {"access_token": token})
            assert (await c.call("users.me"))["id"] == s["user"]["id"]


async def test_an_authenticate_whose_session_ended_meanwhile_keeps_the_earlier_binding(stack):
    """The session is checked in the database, then the socket is bound. If
    this process hears in between that the session ended (test-only
    test.hear_session_ended stands in for that news), the call fails and
    the socket stays bound as before, with its events."""
    proc = await ServerProcess(stack, test_methods=True).start()
    try:
        async with await proc.connect() as c, await proc.connect() as other:
            a = await register(c)
            b = await register(other)
            family = jwt.decode(b["access_token"], options={"verify_signature": False})["fam"]
            await c.call("test.hear_session_ended", {"user_id": b["user"]["id"], "family_id": family})
            assert (await error_of(c, "auth.authenticate", {"access_token": b["access_token"]}))["code"] == "unauthenticated"
            assert (await c.call("users.me"))["id"] == a["user"]["id"]
            async with await proc.connect(access_token=a["access_token"]) as a_elsewhere:
                await a_elsewhere.call("users.update", {"name": "Still A"})
            assert (await c.next_event("user.updated"))["user"]["name"] == "Still A"
    finally:
        await proc.stop()


async def test_a_session_that_ends_while_its_channel_is_subscribed_leaves_the_earlier_binding(stack, server):
    """Rebinding to user B first subscribes B's channel and waits for Redis
    to confirm it; only then does the socket change. News that B's session
    ended, heard during that wait (Redis's confirmation is held back by
    test.hold_subscriptions meanwhile), fails the call, and the socket keeps
    user A's binding, events included: it never gets B's, and it is not
    left bound as A but deaf to A's. B lives on another process, so that
    this one has no subscription to B's channel already."""
    proc = await ServerProcess(stack, test_methods=True, SUBSCRIBE_WAIT_S="60").start()
    try:
        async with await proc.connect() as c, await proc.connect() as ops, await server.connect() as b_socket:
            a = await register(c)
            b = await register(b_socket)
            family = jwt.decode(b["access_token"], options={"verify_signature": False})["fam"]
            await ops.call("test.hold_subscriptions", {"hold": True})
            try:
                rebind = asyncio.create_task(error_of(c, "auth.authenticate", {"access_token": b["access_token"]}))
                await ops.call("test.subscription_held", {"channel": f"u:{b['user']['id']}"})
                await ops.call("test.hear_session_ended", {"user_id": b["user"]["id"], "family_id": family})
            finally:
                await ops.call("test.hold_subscriptions", {"hold": False})
            assert (await rebind)["code"] == "unauthenticated"
            assert (await c.call("users.me"))["id"] == a["user"]["id"]
            async with await proc.connect(access_token=a["access_token"]) as a_elsewhere:
                await a_elsewhere.call("users.update", {"name": "Still A"})
            assert (await c.next_event("user.updated"))["user"]["name"] == "Still A"
            # B's next event reaches a socket of B's on this process (a new
            # session: this process holds B's first one as ended), and not c.
            async with await proc.connect() as b_here:
                await b_here.call("auth.login", {"email": b["user"]["email"], "password": PASSWORD})
                await b_socket.call("users.update", {"name": "B"})
                assert (await b_here.next_event("user.updated"))["user"]["name"] == "B"
            await c.call("users.me")
            assert [name for name, _ in c.drain_events()] == []
    finally:
        await proc.stop()


async def test_a_session_ended_while_a_process_was_away_from_redis_is_checked_when_it_is_back(stack, server):
    """The news of an ended session travels through Redis; a process away
    from Redis at that moment misses it. Once its link is back it asks the
    database which of its sockets' sessions ended meanwhile, and unbinds
    their sockets: the logout holds on every process."""
    proc = await ServerProcess(stack, test_methods=True).start()
    try:
        async with await proc.connect() as s, await proc.connect() as kept, await proc.connect() as ops, \
                await server.connect() as elsewhere:
            u = await register(s)
            v = await register(kept)  # another user's session, which goes on
            await ops.call("test.hold_subscriber_away", {"hold": True})
            try:
                await elsewhere.call("auth.authenticate", {"access_token": u["access_token"]})
                await elsewhere.call("auth.logout")
                assert (await s.call("users.me"))["id"] == u["user"]["id"]  # not heard here yet
            finally:
                await ops.call("test.hold_subscriber_away", {"hold": False})
            assert (await error_of(s, "users.me"))["code"] == "unauthenticated"
            assert (await kept.call("users.me"))["id"] == v["user"]["id"]
    finally:
        await proc.stop()


async def test_news_of_an_ended_session_that_could_not_be_published_goes_out_when_redis_answers(stack, server):
    """A logout on a process whose Redis publishes fail at that moment still
    reaches the other processes: the news is published once Redis answers
    that process's probe again. (Their links to Redis never broke, so they
    have nothing to catch up from the database.)"""
    proc = await ServerProcess(stack, test_methods=True, REDIS_PROBE_INTERVAL_S="3").start()
    try:
        async with await server.connect() as s, await server.connect() as w_there, \
                await proc.connect() as e, await proc.connect() as w_here, await proc.connect() as ops:
            u = await register(s)
            w = await register(w_there)
            await w_here.call("auth.authenticate", {"access_token": w["access_token"]})
            await e.call("auth.authenticate", {"access_token": u["access_token"]})
            await ops.call("test.redis_unreachable")
            await e.call("auth.logout")
            assert (await ops.call("test.outbox_reopened"))["resent"] == 1  # not sent in time otherwise
            # Published after the news by the same outbox: once it is here,
            # so is the news.
            await w_here.call("users.update", {"name": "After"})
            assert (await w_there.next_event("user.updated"))["user"]["name"] == "After"
            assert (await error_of(s, "users.me"))["code"] == "unauthenticated"
    finally:
        await proc.stop()


# ---- refresh and logout ----------------------------------------------------


async def test_refresh_rotates_the_refresh_token_and_issues_a_working_access_token(server):
    async with await server.connect() as c:
        s = await register(c)
    async with await server.connect() as c:
        fresh = await c.call("auth.refresh", {"refresh_token": s["refresh_token"]})
        assert fresh["refresh_token"] != s["refresh_token"]
        assert (await c.call("auth.authenticate", {"access_token": fresh["access_token"]}))["user"]["id"] == s["user"]["id"]
        newer = await c.call("auth.refresh", {"refresh_token": fresh["refresh_token"]})
        assert newer["refresh_token"] not in (s["refresh_token"], fresh["refresh_token"])


async def test_a_reused_refresh_token_is_refused_and_revokes_its_whole_family(server):
    async with await server.connect() as c:
        s = await register(c)
        r1 = (await c.call("auth.refresh", {"refresh_token": s["refresh_token"]}))["refresh_token"]
        reuse = await error_of(c, "auth.refresh", {"refresh_token": s["refresh_token"]})
        assert reuse["code"] == "invalid_credentials"
        # The newest token of the family, never used, is refused too.
        assert (await error_of(c, "auth.refresh", {"refresh_token": r1}))["code"] == "invalid_credentials"
        # Another session (another family) of the same user is unaffected.
        other = await c.call("auth.login", {"email": s["user"]["email"], "password": PASSWORD})
        assert await c.call("auth.refresh", {"refresh_token": other["refresh_token"]})


async def test_an_expired_refresh_token_is_invalid_credentials(server, db):
    async with await server.connect() as c:
        s = await register(c)
        await db.execute("UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE user_id = $1::uuid",
                         s["user"]["id"])
        assert (await error_of(c, "auth.refresh", {"refresh_token": s["refresh_token"]}))["code"] == "invalid_credentials"


async def test_an_unknown_refresh_token_is_invalid_credentials(server):
    async with await server.connect() as c:
        for token in ("", "made-up", "x" * 512, "x" * 60_000):
            assert (await error_of(c, "auth.refresh", {"refresh_token": token}))["code"] == "invalid_credentials"


async def test_logout_revokes_the_family_and_unauthenticates_the_socket(server):
    async with await server.connect() as c:
        s = await register(c)
        other = await c.call("auth.login", {"email": s["user"]["email"], "password": PASSWORD})
        await c.call("auth.authenticate", {"access_token": s["access_token"]})
        assert await c.call("auth.logout") == {}
        assert (await error_of(c, "users.me"))["code"] == "unauthenticated"
        assert (await error_of(c, "auth.logout"))["code"] == "unauthenticated"
        assert (await error_of(c, "auth.refresh", {"refresh_token": s["refresh_token"]}))["code"] == "invalid_credentials"
        # Only the family of the socket's token is revoked.
        assert await c.call("auth.refresh", {"refresh_token": other["refresh_token"]})


async def test_an_access_token_of_an_ended_session_authenticates_nowhere(server, server2, replica_db):
    async with await server.connect() as c:
        s = await register(c)
        other = await c.call("auth.login", {"email": s["user"]["email"], "password": PASSWORD})
        await c.call("auth.authenticate", {"access_token": s["access_token"]})
        async with replay_paused(replica_db):
            assert await c.call("auth.logout") == {}
            # On the other process, and before the replica has replayed the logout:
            async with await server2.connect() as c2:
                refused = await error_of(c2, "auth.authenticate", {"access_token": s["access_token"]})
                assert refused["code"] == "unauthenticated"
                assert (await error_of(c2, "users.me"))["code"] == "unauthenticated"  # nothing was bound
                # The user's other session is not affected.
                bound = await c2.call("auth.authenticate", {"access_token": other["access_token"]})
                assert bound["user"]["id"] == s["user"]["id"]
            assert await upgrade_status(server2, headers={"Authorization": f"Bearer {s['access_token']}"}) == 401
            assert await upgrade_status(server2, params={"access_token": s["access_token"]}) == 401
            assert await upgrade_status(server2, headers={"Authorization": f"Bearer {other['access_token']}"}) == 101


async def test_a_session_the_replica_has_not_replayed_yet_still_authenticates(server, db, replica_db):
    async with await server.connect() as c:
        s = await register(c)
    # The server knows the replica has everything, the user's writes included...
    await until_replica_has_replayed(server, await replica_caught_up(db, replica_db))
    async with replay_paused(replica_db):
        # A session the server did not write itself (an operator's, or one
        # whose write position Redis lost): the replica does not know it.
        family = await db.fetchval("INSERT INTO refresh_token_families (user_id) VALUES ($1) RETURNING id",
                                   uuid.UUID(s["user"]["id"]))
        token = issue_access_token(DEV_JWT_SECRET, 600, uuid.UUID(s["user"]["id"]), family)
        async with await server.connect() as c:
            assert (await c.call("auth.authenticate", {"access_token": token}))["user"]["id"] == s["user"]["id"]
        assert await upgrade_status(server, headers={"Authorization": f"Bearer {token}"}) == 101


async def test_a_reused_refresh_token_ends_its_access_tokens_too(server, server2, replica_db):
    async with await server.connect() as c:
        s = await register(c)
        fresh = await c.call("auth.refresh", {"refresh_token": s["refresh_token"]})
        async with replay_paused(replica_db):
            assert (await error_of(c, "auth.refresh", {"refresh_token": s["refresh_token"]}))["code"] == "invalid_credentials"
            async with await server2.connect() as c2:
                for token in (s["access_token"], fresh["access_token"]):
                    assert (await error_of(c2, "auth.authenticate", {"access_token": token}))["code"] == "unauthenticated"


async def _witness_event(witness, name: str) -> None:
    """A user.updated published after what came before it on the user's
    process: once the witness (a socket of the user's on the process
    watched) has it, that process has handled everything published before."""
    await witness.call("users.update", {"name": name})
    await events_until(witness, name)


async def test_logout_unbinds_every_socket_of_that_session_on_every_process(server, server2):
    async with await server.connect() as c, await server.connect() as same_here, \
            await server2.connect() as same_there, await server2.connect() as witness:
        s = await register(c)
        uid = s["user"]["id"]
        for sock in (same_here, same_there):
            await sock.call("auth.authenticate", {"access_token": s["access_token"]})
        await witness.call("auth.login", {"email": s["user"]["email"], "password": PASSWORD})  # its own session

        assert await c.call("auth.logout") == {}
        # The logging-out process unbinds its sockets before the reply.
        assert (await error_of(same_here, "users.me"))["code"] == "unauthenticated"
        await _witness_event(witness, "After logout")
        assert (await error_of(same_there, "users.me"))["code"] == "unauthenticated"
        # ... and they no longer get the user's events (one would have come
        # before that reply).
        assert [e for e, _ in same_there.drain_events() if e == "user.updated"] == []
        assert [e for e, _ in same_here.drain_events() if e == "user.updated"] == []
        # The user's other session is untouched.
        assert (await witness.call("users.me"))["id"] == uid


async def test_a_reused_refresh_token_unbinds_the_sockets_of_its_session(server, server2):
    async with await server.connect() as c, await server2.connect() as thief, \
            await server2.connect() as witness:
        s = await register(c)
        uid = s["user"]["id"]
        fresh = await c.call("auth.refresh", {"refresh_token": s["refresh_token"]})
        await thief.call("auth.authenticate", {"access_token": fresh["access_token"]})
        await witness.call("auth.login", {"email": s["user"]["email"], "password": PASSWORD})

        # The old refresh token comes back: the family is revoked.
        assert (await error_of(c, "auth.refresh", {"refresh_token": s["refresh_token"]}))["code"] == "invalid_credentials"
        assert (await error_of(c, "users.me"))["code"] == "unauthenticated"
        await _witness_event(witness, "After reuse")
        assert (await error_of(thief, "users.me"))["code"] == "unauthenticated"
        assert (await witness.call("users.me"))["id"] == uid


async def test_logout_leaves_the_users_events(server):
    async with await server.connect() as c:
        s = await register(c)
        await c.call("auth.logout")
        other = await register(c)  # same socket, now someone else
        assert (await post_kyc(server, s["user"]["id"], "verified")).status == 200
        assert (await post_kyc(server, other["user"]["id"], "verified")).status == 200
        assert (await c.next_event("user.updated"))["user"]["id"] == other["user"]["id"]


# ---- tokens at the upgrade -------------------------------------------------


async def test_a_token_at_the_upgrade_authenticates_by_header_or_query(server):
    async with await server.connect() as c:
        s = await register(c)
    async with await server.connect(access_token=s["access_token"]) as c:
        assert (await c.call("users.me"))["id"] == s["user"]["id"]
    async with await server.connect(access_token=s["access_token"], token_in_query=True) as c:
        assert (await c.call("users.me"))["id"] == s["user"]["id"]


async def test_a_bad_or_expired_token_at_the_upgrade_is_401_before_upgrading(server):
    async with await server.connect() as c:
        s = await register(c)
    expired = mint_access_token(s["user"]["id"], -5)
    for kw in (
        {"headers": {"Authorization": "Bearer garbage"}},
        {"headers": {"Authorization": f"Bearer {expired}"}},
        {"headers": {"Authorization": f"Basic {s['access_token']}"}},
        {"headers": {"Authorization": "Bearer "}},
        {"params": {"access_token": "garbage"}},
        {"params": {"access_token": expired}},
        {"params": {"access_token": ""}},
    ):
        assert await upgrade_status(server, **kw) == 401, kw
    assert await upgrade_status(server, headers={"Authorization": f"Bearer {s['access_token']}"}) == 101


async def test_a_protected_call_without_authentication_is_unauthenticated(server):
    async with await server.connect() as c:
        for method, params in (("users.me", {}), ("users.update", {"name": "X"}), ("users.get", {"user_id": str(uuid.uuid4())})):
            assert (await error_of(c, method, params))["code"] == "unauthenticated"


# ---- access-token expiry on a live socket ----------------------------------


@pytest.fixture(scope="module")
async def short_token_server(stack):
    proc = await ServerProcess(stack, ACCESS_TOKEN_TTL_S="2").start()
    yield proc
    await proc.stop()


async def test_an_expiring_token_is_announced_then_calls_get_token_expired_until_reauthentication(short_token_server):
    async with await short_token_server.connect() as c:
        s = await register(c)
        # Less than 60 s left when bound: announced at once.
        expiring = await c.next_event("auth.expiring", timeout=1.5)
        expires_at = expiring["expires_at"]
        assert isinstance(expires_at, dt.datetime)
        assert 0 < (expires_at - dt.datetime.now(UTC)).total_seconds() <= 2
        # Nothing is pushed at expiry: wait for the moment itself.
        await asyncio.sleep((expires_at - dt.datetime.now(UTC)).total_seconds() + 0.05)
        assert (await error_of(c, "users.me"))["code"] == "token_expired"
        assert (await error_of(c, "users.update", {"name": "Late"}))["code"] == "token_expired"
        assert not c.closed.is_set()  # the socket stays open
        fresh = await c.call("auth.refresh", {"refresh_token": s["refresh_token"]})
        await c.call("auth.authenticate", {"access_token": fresh["access_token"]})
        assert (await c.call("users.me"))["id"] == s["user"]["id"]


async def test_logout_with_an_expired_access_token_is_token_expired_like_every_protected_call(short_token_server):
    async with await short_token_server.connect() as c:
        s = await register(c)
        expires_at = (await c.next_event("auth.expiring", timeout=1.5))["expires_at"]
        await asyncio.sleep((expires_at - dt.datetime.now(UTC)).total_seconds() + 0.05)
        assert (await error_of(c, "auth.logout"))["code"] == "token_expired"
        # Nothing was revoked; with a fresh token the socket logs out.
        fresh = await c.call("auth.refresh", {"refresh_token": s["refresh_token"]})
        await c.call("auth.authenticate", {"access_token": fresh["access_token"]})
        assert await c.call("auth.logout") == {}
        assert (await error_of(c, "users.me"))["code"] == "unauthenticated"
        assert (await error_of(c, "auth.refresh", {"refresh_token": fresh["refresh_token"]}))["code"] == "invalid_credentials"


async def test_a_token_bound_at_the_upgrade_is_announced_too(short_token_server):
    async with await short_token_server.connect() as c:
        s = await register(c)
    async with await short_token_server.connect(access_token=s["access_token"]) as c:
        assert (await c.next_event("auth.expiring", timeout=1.5))["expires_at"]


async def test_auth_expiring_comes_60_seconds_before_expiry(server):
    async with await server.connect() as c:
        s = await register(c)
        # A 15-minute token was bound at registration: nothing is announced.
        token = mint_access_token(s["user"]["id"], 62, s)
        bound = time.monotonic()
        await c.call("auth.authenticate", {"access_token": token})
        expiring = await c.next_event("auth.expiring", timeout=5)
        waited = time.monotonic() - bound
        assert 0.5 <= waited <= 3.5, waited  # 62 s - 60 s, give or take the second-granular exp
        assert expiring["expires_at"] == dt.datetime.fromtimestamp(jwt.decode(token, options={"verify_signature": False})["exp"], UTC)


async def test_an_expired_token_stops_the_sockets_events_until_it_authenticates_again(short_token_server):
    """A token that leaked must not keep a socket listening for longer than
    the token lives: from expiry the socket gets none of the user's events
    and nothing from its rooms; authenticated again, it gets the user's
    events, and its rooms carry on without a new chat.join, giving first
    what was sent meanwhile."""
    server = short_token_server  # every access token lives 2 s
    host, hs = await verified_user(server, price="10.00")
    away, bs = await verified_user(server)  # the socket whose token will expire
    try:
        await away.call("wallet.topup", {"amount": "100.00", "idempotency_key": uuid.uuid4().hex})
        start = (dt.datetime.now(UTC) + dt.timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
        booking = (await away.call("bookings.create", {
            "host_id": hs["user"]["id"], "start_at": start, "end_at": start + dt.timedelta(hours=1),
            "idempotency_key": uuid.uuid4().hex,
        }))["booking"]
        room = {"conversation_id": booking["conversation_id"]}
        await away.call("chat.join", room)
        expires_at = jwt.decode(bs["access_token"], options={"verify_signature": False})["exp"]
        await asyncio.sleep(expires_at - time.time() + 0.05)  # nothing marks expiry itself
        assert (await error_of(away, "users.me"))["code"] == "token_expired"
        away.drain_events()  # whatever came before expiry

        # Meanwhile the user (another socket) and the host (in the room) carry on,
        # on the same process: once these witnesses have their events, anything
        # for `away` would be queued before the reply to its next call.
        # Their tokens, and `away`'s next one, live 10 minutes: only the
        # expiry under test is short, however slow the machine.
        async with await server.connect() as other, await server.connect() as host_again:
            await other.call("auth.authenticate", {"access_token": mint_access_token(bs["user"]["id"], 600, bs)})
            await host_again.call("auth.authenticate", {"access_token": mint_access_token(hs["user"]["id"], 600, hs)})
            await host_again.call("chat.join", room)
            sent = (await host_again.call("chat.send", {**room, "content": "while away"}))["message"]
            assert (await host_again.next_event("chat.message"))["message"]["seq"] == sent["seq"]
            await other.call("wallet.topup", {"amount": "1.00", "idempotency_key": uuid.uuid4().hex})
            await other.next_event("wallet.updated")
            assert (await error_of(away, "users.me"))["code"] == "token_expired"
            assert [name for name, _ in away.drain_events()] == []

            # Authenticated again: the room, still joined, gives what was missed...
            await away.call("auth.authenticate", {"access_token": mint_access_token(bs["user"]["id"], 600, bs)})
            assert (await away.next_event("chat.message"))["message"]["content"] == "while away"
            # ... the user's events come again, and so do the room's new messages.
            await other.call("wallet.topup", {"amount": "2.00", "idempotency_key": uuid.uuid4().hex})
            assert (await away.next_event("wallet.updated"))["balance"] == (await other.next_event("wallet.updated"))["balance"]
            await host_again.call("chat.send", {**room, "content": "welcome back"})
            assert (await away.next_event("chat.message"))["message"]["content"] == "welcome back"
            # A join with since_seq still works, and adds no duplicate.
            joined = await away.call("chat.join", {**room, "since_seq": sent["seq"]})
            assert [m["content"] for m in joined["messages"]] == ["welcome back"]
            await other.call("users.update", {"name": "Marker"})
            assert [n for n in await events_until(away, "Marker") if n == "chat.message"] == []
    finally:
        await host.close()
        await away.close()


# ---- a call outlives its socket's binding ----------------------------------
# A socket may log out or authenticate as someone else while one of its calls
# is still running. The call stays its caller's: its writes, events and
# write positions are the caller's, and it never attaches the socket, now
# someone else's, to the caller's rooms.


@contextlib.asynccontextmanager
async def conversations_locked(db) -> AsyncIterator[None]:
    """Reads of conversations wait until the block ends: a chat.join stays in flight."""
    async with db.acquire() as conn:
        async with conn.transaction():
            await conn.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
            yield


async def test_a_top_up_in_flight_stays_its_callers_when_the_socket_signs_in_as_someone_else(server, db):
    switching = await server.connect()
    a = await register(switching)
    a_elsewhere = await server.connect(access_token=a["access_token"])
    b_socket = await server.connect()
    b = await register(b_socket)
    async with row_locked(db, a["user"]["id"]):
        topup = asyncio.create_task(
            switching.call("wallet.topup", {"amount": "25.00", "idempotency_key": uuid.uuid4().hex}))
        await until_writes_wait_on_the_lock(db, 1, statement="INSERT INTO topups%")
        await switching.call("auth.authenticate", {"access_token": b["access_token"]})
    assert (await topup)["balance"] == "25.00"
    # A's balance goes to A's sockets only, never to B's.
    assert (await a_elsewhere.next_event("wallet.updated"))["balance"] == "25.00"
    await b_socket.call("users.update", {"name": "Marker B"})
    assert "wallet.updated" not in await events_until(b_socket, "Marker B")
    assert "wallet.updated" not in await events_until(switching, "Marker B")
    assert (await switching.call("users.me"))["balance"] == "0.00"
    for c in (switching, a_elsewhere, b_socket):
        await c.close()


async def test_a_top_up_in_flight_completes_when_its_socket_logs_out(server, db):
    leaving = await server.connect()
    a = await register(leaving)
    # Another session of A's: logout ends only the socket's own.
    a_elsewhere = await server.connect()
    await a_elsewhere.call("auth.login", {"email": a["user"]["email"], "password": PASSWORD})
    async with row_locked(db, a["user"]["id"]):
        topup = asyncio.create_task(
            leaving.call("wallet.topup", {"amount": "25.00", "idempotency_key": uuid.uuid4().hex}))
        await until_writes_wait_on_the_lock(db, 1, statement="INSERT INTO topups%")
        await leaving.call("auth.logout", {})
    # Committed, so answered as such (not "internal"), and announced to A.
    assert (await topup)["balance"] == "25.00"
    assert (await a_elsewhere.next_event("wallet.updated"))["balance"] == "25.00"
    assert (await error_of(leaving, "users.me"))["code"] == "unauthenticated"
    for c in (leaving, a_elsewhere):
        await c.close()


async def test_a_join_in_flight_does_not_put_a_socket_now_signed_in_as_someone_else_in_the_room(server, db):
    room = await open_room(server)
    switching = await server.connect(access_token=room.booker.access_token)
    b_socket = await server.connect()
    b = await register(b_socket)
    async with conversations_locked(db):
        join = asyncio.create_task(switching.call_raw("chat.join", {"conversation_id": room.conversation_id}))
        await until_writes_wait_on_the_lock(db, 1, statement="%FROM conversations%")
        await switching.call("auth.authenticate", {"access_token": b["access_token"]})
    assert (await join)["error"]["code"] == "unauthenticated"
    await room.host.client.call("chat.send", {"conversation_id": room.conversation_id, "content": "for the booker only"})
    await switching.call("users.update", {"name": "Marker B"})
    assert "chat.message" not in await events_until(switching, "Marker B")
    await switching.close()
    await b_socket.close()
    await room.close()


async def test_a_join_in_flight_when_the_token_expires_gives_the_socket_nothing_of_the_room(short_token_server, db):
    server = short_token_server  # every access token lives 2 s: each socket logs in just before it acts
    room = await open_room(server)
    await room.close()
    email = {u: await db.fetchval("SELECT email FROM users WHERE id = $1", uuid.UUID(u))
             for u in (room.booker.user_id, room.host.user_id)}
    away = await server.connect()
    await away.call("auth.login", {"email": email[room.booker.user_id], "password": PASSWORD})
    expires_at = (await away.next_event("auth.expiring", timeout=2.5))["expires_at"]
    async with conversations_locked(db):
        join = asyncio.create_task(away.call_raw("chat.join", {"conversation_id": room.conversation_id}))
        await until_writes_wait_on_the_lock(db, 1, statement="%FROM conversations%")
        await asyncio.sleep((expires_at - dt.datetime.now(UTC)).total_seconds() + 0.05)  # nothing marks expiry
    assert (await join)["error"]["code"] == "token_expired"
    async with await server.connect() as host, await server.connect() as witness:
        await host.call("auth.login", {"email": email[room.host.user_id], "password": PASSWORD})
        await host.call("chat.send", {"conversation_id": room.conversation_id, "content": "after expiry"})
        # Authenticated again, the socket gets the user's events, and none of the room it never joined.
        await away.call("auth.login", {"email": email[room.booker.user_id], "password": PASSWORD})
        await witness.call("auth.login", {"email": email[room.booker.user_id], "password": PASSWORD})
        await witness.call("users.update", {"name": "Marker"})
        assert "chat.message" not in await events_until(away, "Marker")
    await away.close()
