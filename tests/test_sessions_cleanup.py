"""Sessions end at a fixed maximum age (SESSION_MAX_AGE_S), however often
they are refreshed; the cleanup job (server/cleanup.py) deletes ended
sessions, unused expired refresh tokens and old KYC event ids, and nothing
that reuse detection or a live session still needs, with any number of
processes cleaning at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import shutil
import uuid

import asyncpg
import jwt
import pytest

from server.cleanup import Cleanup
from server.db.migrate import SQL_DIR, migrate
from server.services import Services
from tests.conftest import PASSWORD, ServerProcess, register, server_config
from tests.test_auth import error_of
from tests.test_migrations import fresh_database  # noqa: F401  (a fixture)

MAX_AGE_S = 3


@pytest.fixture(scope="module")
async def short_sessions(stack):
    proc = await ServerProcess(stack, SESSION_MAX_AGE_S=str(MAX_AGE_S)).start()
    yield proc
    await proc.stop()


async def family_of(db, user_id: str) -> asyncpg.Record:
    return await db.fetchrow(
        "SELECT id, created_at, ends_at, revoked_at FROM refresh_token_families WHERE user_id = $1", uuid.UUID(user_id)
    )


async def until_db_clock(db, moment: dt.datetime) -> None:
    """Wait until the database's clock, which decides a session's end, reads ``moment``."""
    for _ in range(100):
        left = (moment - await db.fetchval("SELECT now()")).total_seconds()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 1.0))
    raise AssertionError(f"the database clock never reached {moment}")


async def test_a_session_ends_its_max_age_after_it_began_however_often_refreshed(short_sessions, db):
    async with await short_sessions.connect() as c:
        s = await register(c)
        family = await family_of(db, s["user"]["id"])
        assert family["ends_at"] - family["created_at"] == dt.timedelta(seconds=MAX_AGE_S)
        token = s["refresh_token"]
        for _ in range(5):  # refreshing does not move the end
            token = (await c.call("auth.refresh", {"refresh_token": token}))["refresh_token"]
        assert (await family_of(db, s["user"]["id"]))["ends_at"] == family["ends_at"]

        await until_db_clock(db, family["ends_at"] - dt.timedelta(seconds=1))
        fresh = await c.call("auth.refresh", {"refresh_token": token})  # just before the end: fine
        # Its access token does not outlive the session.
        exp = jwt.decode(fresh["access_token"], options={"verify_signature": False})["exp"]
        assert exp <= family["ends_at"].timestamp() + 1
        assert (await c.call("auth.authenticate", {"access_token": fresh["access_token"]}))["user"]["id"] == s["user"]["id"]

        await until_db_clock(db, family["ends_at"])
        assert (await error_of(c, "auth.refresh", {"refresh_token": fresh["refresh_token"]}))["code"] == "invalid_credentials"
        # The session's access tokens no longer authenticate either.
        assert (await error_of(c, "auth.authenticate", {"access_token": s["access_token"]}))["code"] == "unauthenticated"
        # Ended, not revoked: nothing was reused.
        assert (await family_of(db, s["user"]["id"]))["revoked_at"] is None


async def test_a_login_begins_a_session_with_its_own_end(short_sessions, db):
    async with await short_sessions.connect() as c:
        s = await register(c)
        first = await family_of(db, s["user"]["id"])
        await until_db_clock(db, first["ends_at"])
        login = await c.call("auth.login", {"email": s["user"]["email"], "password": PASSWORD})
        rows = await db.fetch(
            "SELECT created_at, ends_at FROM refresh_token_families WHERE user_id = $1 AND id <> $2",
            uuid.UUID(s["user"]["id"]), first["id"],
        )
        assert [r["ends_at"] - r["created_at"] for r in rows] == [dt.timedelta(seconds=MAX_AGE_S)]
        assert await c.call("auth.refresh", {"refresh_token": login["refresh_token"]})
        assert (await error_of(c, "auth.refresh", {"refresh_token": s["refresh_token"]}))["code"] == "invalid_credentials"


async def test_families_from_before_the_migration_end_90_days_after_they_began(fresh_database, tmp_path):  # noqa: F811
    for path in SQL_DIR.glob("*.sql"):
        if path.stem < "011":
            shutil.copy(path, tmp_path / path.name)
    await migrate(fresh_database, tmp_path)
    conn = await asyncpg.connect(fresh_database)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (email, password_hash, name, gender) VALUES ('old@example.test', 'x', 'Old', 'f') RETURNING id"
        )
        began = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
        family = await conn.fetchval(
            "INSERT INTO refresh_token_families (user_id, created_at) VALUES ($1, $2) RETURNING id", user, began
        )
        await migrate(fresh_database)
        ends = await conn.fetchval("SELECT ends_at FROM refresh_token_families WHERE id = $1", family)
        assert ends == began + dt.timedelta(days=90)
    finally:
        await conn.close()


# ---- the cleanup -----------------------------------------------------------


@pytest.fixture
async def services(stack):
    """A process's services, in the test, to run Cleanup passes on."""
    s = Services.build(server_config(stack))
    await s.db.start()
    yield s
    await s.db.close()
    await s.redis.aclose()


async def new_user(db) -> uuid.UUID:
    return await db.fetchval(
        "INSERT INTO users (email, password_hash, name, gender) VALUES ($1, 'x', 'Cleanup', 'f') RETURNING id",
        f"c{uuid.uuid4().hex[:16]}@example.test",
    )


async def new_family(db, user: uuid.UUID, *, ends_in_s: float = 86400, revoked_ago_s: float | None = None) -> uuid.UUID:
    return await db.fetchval(
        """INSERT INTO refresh_token_families (user_id, ends_at, revoked_at, revoked_reason)
           VALUES ($1, now() + make_interval(secs => $2), now() - make_interval(secs => $3),
                   CASE WHEN $3 IS NULL THEN NULL ELSE 'logout' END)
           RETURNING id""",
        user, float(ends_in_s), None if revoked_ago_s is None else float(revoked_ago_s),
    )


async def new_token(db, family: uuid.UUID, user: uuid.UUID, *, expires_in_s: float = 86400, used: bool = False) -> bytes:
    token_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    await db.execute(
        """INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at, used_at)
           VALUES ($1, $2, $3, now() + make_interval(secs => $4), CASE WHEN $5 THEN now() - interval '1 hour' END)""",
        token_hash, family, user, float(expires_in_s), used,
    )
    return token_hash


async def families_left(db, families: list[uuid.UUID]) -> set[uuid.UUID]:
    return {r["id"] for r in await db.fetch("SELECT id FROM refresh_token_families WHERE id = ANY($1)", families)}


async def tokens_left(db, tokens: list[bytes]) -> set[bytes]:
    return {r["token_hash"] for r in await db.fetch("SELECT token_hash FROM refresh_tokens WHERE token_hash = ANY($1)", tokens)}


async def test_the_cleanup_deletes_ended_sessions_and_expired_tokens_and_nothing_else(services, db):
    grace = services.config.access_token_ttl_s  # an ended session is kept this long
    user = await new_user(db)
    live = await new_family(db, user)
    live_used = await new_token(db, live, user, used=True, expires_in_s=-86400)  # kept: reuse detection
    live_current = await new_token(db, live, user)
    live_expired = await new_token(db, live, user, expires_in_s=-1)  # unused and expired: deleted
    revoked_long_ago = await new_family(db, user, revoked_ago_s=grace + 60)
    revoked_long_ago_tokens = [await new_token(db, revoked_long_ago, user, used=True), await new_token(db, revoked_long_ago, user)]
    revoked_lately = await new_family(db, user, revoked_ago_s=grace - 60)
    revoked_lately_token = await new_token(db, revoked_lately, user, used=True)
    ended_long_ago = await new_family(db, user, ends_in_s=-(grace + 60))
    ended_long_ago_tokens = [await new_token(db, ended_long_ago, user, used=True) for _ in range(3)]
    ended_lately = await new_family(db, user, ends_in_s=-(grace - 60))
    ended_lately_token = await new_token(db, ended_lately, user, used=True)
    old_event, recent_event = f"evt_{uuid.uuid4().hex}", f"evt_{uuid.uuid4().hex}"
    await db.execute(
        """INSERT INTO kyc_events (event_id, user_id, status, applied_at)
           VALUES ($1, $3, 'verified', now() - interval '7 days 1 minute'), ($2, $3, 'verified', now() - interval '6 days 23 hours')""",
        old_event, recent_event, user,
    )

    deleted = await Cleanup(services, batch_size=2).clean()
    assert deleted["ended sessions"] >= 2 and deleted["ended-session tokens"] >= 5  # in batches of 2

    families = [live, revoked_long_ago, revoked_lately, ended_long_ago, ended_lately]
    assert await families_left(db, families) == {live, revoked_lately, ended_lately}
    tokens = [live_used, live_current, live_expired, *revoked_long_ago_tokens, revoked_lately_token,
              *ended_long_ago_tokens, ended_lately_token]
    assert await tokens_left(db, tokens) == {live_used, live_current, revoked_lately_token, ended_lately_token}
    assert {r["event_id"] for r in await db.fetch(
        "SELECT event_id FROM kyc_events WHERE event_id = ANY($1)", [old_event, recent_event])} == {recent_event}


async def test_a_used_token_of_a_live_session_is_still_recognised_as_reused_after_the_cleanup(server, services, db):
    async with await server.connect() as c:
        s = await register(c)
        fresh = await c.call("auth.refresh", {"refresh_token": s["refresh_token"]})
        await Cleanup(services).clean()
        assert (await error_of(c, "auth.refresh", {"refresh_token": s["refresh_token"]}))["code"] == "invalid_credentials"
        assert (await family_of(db, s["user"]["id"]))["revoked_at"] is not None  # the reuse revoked it
        assert (await error_of(c, "auth.refresh", {"refresh_token": fresh["refresh_token"]}))["code"] == "invalid_credentials"


async def test_the_cleanup_does_not_wait_for_a_refresh_in_progress(services, db):
    user = await new_user(db)
    ended = await new_family(db, user, revoked_ago_s=86400)
    held, other = await new_token(db, ended, user), await new_token(db, ended, user, used=True)
    async with db.acquire() as conn, conn.transaction():
        # What auth.refresh holds while it rotates a token.
        await conn.execute(
            """SELECT 1 FROM refresh_tokens t JOIN refresh_token_families f ON f.id = t.family_id
               WHERE t.token_hash = $1 FOR UPDATE OF t, f""",
            held,
        )
        await asyncio.wait_for(Cleanup(services).clean(), 10)
        assert await tokens_left(db, [held, other]) == {held}
        assert await families_left(db, [ended]) == {ended}  # waits for a later pass
    await Cleanup(services).clean()
    assert await families_left(db, [ended]) == set()
    assert await tokens_left(db, [held, other]) == set()


async def test_processes_cleaning_at_once_share_the_work(stack, db):
    user = await new_user(db)
    live = await new_family(db, user)
    live_tokens = [await new_token(db, live, user, used=True) for _ in range(3)]
    ended = [await new_family(db, user, revoked_ago_s=86400) for _ in range(60)]
    ended_tokens = [await new_token(db, f, user, used=i % 2 == 0) for f in ended for i in range(3)]
    two = [Services.build(server_config(stack)) for _ in range(2)]
    for s in two:
        await s.db.start()
    try:
        # Three workers on each of two processes' pools, in small batches.
        passes = await asyncio.wait_for(
            asyncio.gather(*(Cleanup(s, batch_size=7).clean() for s in two for _ in range(3))), 30
        )
    finally:
        for s in two:
            await s.db.close()
            await s.redis.aclose()
    assert await families_left(db, ended) == set()
    assert await tokens_left(db, ended_tokens) == set()
    assert await families_left(db, [live]) == {live}
    assert await tokens_left(db, live_tokens) == set(live_tokens)
    # Each row was deleted once (a server's own worker may have taken some).
    assert sum(p["ended sessions"] for p in passes) <= len(ended)
    assert sum(p["ended-session tokens"] for p in passes) <= len(ended_tokens)


async def test_each_server_process_runs_the_cleanup_every_interval(stack, db):
    user = await new_user(db)
    ended = await new_family(db, user, revoked_ago_s=86400)
    token = await new_token(db, ended, user, used=True)
    procs = [await ServerProcess(stack, SESSION_CLEANUP_INTERVAL_S="0.2").start() for _ in range(2)]
    try:
        for _ in range(100):
            if not await families_left(db, [ended]):
                break
            await asyncio.sleep(0.1)
        assert await families_left(db, [ended]) == set()
        assert await tokens_left(db, [token]) == set()
        # A session ended after the servers started goes on a later pass.
        later = await new_family(db, user, revoked_ago_s=86400)
        for _ in range(100):
            if not await families_left(db, [later]):
                break
            await asyncio.sleep(0.1)
        assert await families_left(db, [later]) == set()
    finally:
        for p in procs:
            await p.stop()
