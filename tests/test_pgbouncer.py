"""Running behind PgBouncer in transaction mode (``make test``'s second pass,
``DEVSTACK_PGBOUNCER=1``): the servers' connections really share PostgreSQL
sessions, and migrations never leave their session lock behind."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import pytest

from server.db.migrate import LOCK_KEY
from tests.conftest import ROOT


async def test_the_servers_connections_share_postgresql_sessions(stack):
    """What the second pass exercises: each transaction of a client may run
    in another PostgreSQL session than its last, so nothing a server does
    may rely on session state."""
    if not stack.pgbouncer:
        pytest.skip("the stack runs without PgBouncer (DEVSTACK_PGBOUNCER=1 runs it with)")
    env = stack.server_env()
    assert env["DB_STATEMENT_CACHE_SIZE"] == "0"
    clients = [await asyncpg.connect(env["DATABASE_URL"], statement_cache_size=0) for _ in range(40)]
    try:
        backends = set()
        for _ in range(3):
            for conn in clients:
                backends.add(await conn.fetchval("SELECT pg_backend_pid()"))
        assert len(backends) < len(clients)
        # A query with arguments is an unnamed statement: it runs whichever
        # session it lands in.
        rows = await asyncio.gather(*(conn.fetchval("SELECT $1::int + 1", i) for i, conn in enumerate(clients)))
        assert rows == [i + 1 for i in range(len(clients))]
    finally:
        await asyncio.gather(*(conn.close() for conn in clients))


async def test_migrate_on_the_stack_leaves_no_advisory_lock_held(stack, db):
    """``migrate`` holds a session advisory lock: it runs on the primary
    itself (MIGRATE_DATABASE_URL), where closing the session releases it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "migrate", cwd=ROOT,
        env=dict(os.environ, **stack.server_env(), LOG_LEVEL="WARNING"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"nothing (up to date)" in out
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND objsubid = 1"
    assert await db.fetchval(held, LOCK_KEY) == 0
