"""Fixtures: the real dev stack (PostgreSQL primary + replica, Redis) and
real server processes started with ``python -m server``.

With ``DEVSTACK_PGBOUNCER=1`` the stack has PgBouncer (transaction mode) in
front of both PostgreSQL servers. What the server uses goes through it:
``ServerProcess``, ``server_config`` and ``stack.database_url``/``replica_urls``.
What the tests use to look at or steer PostgreSQL itself (pausing replay,
``pg_stat_*``, locks held on purpose, new databases, migrations) goes
straight to the servers: ``db``, ``replica_db`` and ``stack.direct_database_url``/
``direct_replica_urls``. Without PgBouncer both are the same."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from protocol.client import Client
from server import devstack, redis_cluster
from server.devstack.process import free_port
from server.config import DEV_KYC_SECRET, Config, dev_secrets
from server.db.migrate import migrate
from server.presence import CLUSTER_TAG

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
OPS_TOKEN = "test-ops-token-0123456789abcdef0123456789"


# The suite runs on the stack's Redis Cluster with DEVSTACK_REDIS_CLUSTER=1
# (``make test-cluster``).
ON_CLUSTER = devstack.from_env().redis_cluster
# Presence keys as the servers under test name them (server/presence.py).
PRESENCE_TAG = CLUSTER_TAG if ON_CLUSTER else ""


def port_of(url: str) -> int:
    """The port of a database URL (PgBouncer's, when the stack has one)."""
    port = urlsplit(url).port
    assert port is not None, url
    return port


class ServerProcess:
    """One ``python -m server serve`` process on its own port; with
    ``test_methods``, ``python -m tests.server_with_test_methods serve``
    (the test-only methods of tests/debug_methods.py registered too)."""

    def __init__(self, stack: devstack.DevStack, *, test_methods: bool = False, **env: Any) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.module = "tests.server_with_test_methods" if test_methods else "server"
        self.env = dict(
            os.environ,
            **dev_secrets(),
            **stack.server_env(),
            HOST="127.0.0.1",
            PORT=str(self.port),
            WORKERS="1",
            HANGOUT_SKIP_MIGRATE="1",
            LOG_LEVEL=os.environ.get("TEST_SERVER_LOG_LEVEL", "WARNING"),
            PYTHONUNBUFFERED="1",
            # The whole suite connects and signs in from 127.0.0.1: the
            # per-address limits are raised here, and the tests of those
            # limits set them back explicitly.
            MAX_SOCKETS_PER_ADDRESS="100000",
            AUTH_MAX_PER_ADDRESS="100000",
            # Tests register dozens of users at once from one address, on a
            # machine that may be slow: the hashing admission's wait is
            # raised too, and its own tests set it back explicitly.
            HASH_MAX_WAIT_S="60",
            # The metrics port (/metrics, /status) answers this token only.
            OPS_TOKEN=OPS_TOKEN,
            METRICS_PORT=str(self.metrics_port),
        )
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None
        # Where the process's log goes (a file object to capture it; None
        # = this test run's own stderr).
        self.stderr: Any = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics(self) -> str:
        """The operators' port: /metrics and /status (server/metrics_http.py)."""
        return f"http://127.0.0.1:{self.env['METRICS_PORT']}"

    async def ops_get(self, path: str) -> aiohttp.ClientResponse:
        """GET ``path`` on the metrics port with the process's OPS_TOKEN; the body is read."""
        token = self.env.get("OPS_TOKEN", "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as s:
            async with s.get(self.metrics + path, headers=headers) as r:
                await r.read()
                return r

    async def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "serve"], cwd=ROOT, env=self.env, stderr=self.stderr)
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}")
                try:
                    async with s.get(self.http + "/healthz") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)  # polling a process that has no event to await
        raise RuntimeError("server did not start")

    async def stop(self, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return await asyncio.to_thread(self.proc.wait)

    async def connect(self, **kw: Any) -> Client:
        return await Client.connect(self.url, **kw)


def server_config(stack: devstack.DevStack, **settings: Any) -> Config:
    """The settings of a server on ``stack`` (through PgBouncer when the
    stack has one), for ``Services`` built inside a test; no replicas
    unless given."""
    env = stack.server_env()
    cache = int(env.get("DB_STATEMENT_CACHE_SIZE", Config.db_statement_cache_size))
    return Config(database_url=env["DATABASE_URL"], redis_url=env["REDIS_URL"],
                  db_statement_cache_size=cache, **settings)


@pytest.fixture(scope="session")
def stack() -> devstack.DevStack:
    s = devstack.from_env()
    s.start()
    asyncio.run(migrate(s.direct_database_url))
    return s


@pytest.fixture(scope="session")
async def server(stack) -> AsyncIterator[ServerProcess]:
    proc = await ServerProcess(stack, SETTLEMENT_INTERVAL_S="0.5").start()
    yield proc
    await proc.stop()


@pytest.fixture(scope="session")
async def server2(stack) -> AsyncIterator[ServerProcess]:
    """A second process on the same database and Redis."""
    proc = await ServerProcess(stack, SETTLEMENT_INTERVAL_S="0.5").start()
    yield proc
    await proc.stop()


@pytest.fixture(scope="session")
async def db(stack) -> AsyncIterator[asyncpg.Pool]:
    """The primary itself, never through PgBouncer: tests hold locks and
    read ``pg_stat_activity`` with it."""
    pool = await asyncpg.create_pool(stack.direct_database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def replica_db(stack) -> AsyncIterator[asyncpg.Pool]:
    """The replica itself (pausing its replay is a session of its own)."""
    pool = await asyncpg.create_pool(stack.direct_replica_urls[0], min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def redis(stack) -> AsyncIterator[aioredis.Redis]:
    # On the stack's Redis Cluster: redis-py's cluster client (routes by key).
    r = redis_cluster.client(stack.redis_url, 5.0) if stack.redis_cluster else aioredis.from_url(stack.redis_url)
    yield r
    await r.aclose()


def new_email() -> str:
    return f"u{uuid.uuid4().hex[:16]}@example.test"


async def register(client: Client, name: str = "Test User", gender: str = "female", email: str | None = None) -> dict:
    """Register a fresh user on ``client``'s socket; returns the session result."""
    return await client.call(
        "auth.register", {"email": email or new_email(), "password": PASSWORD, "name": name, "gender": gender}
    )


def sign(body: bytes, secret: str = DEV_KYC_SECRET, t: int | str | None = None) -> str:
    """The KYC webhook's ``X-Signature``, made at ``t`` (default now)."""
    stamp = str(int(time.time()) if t is None else t)
    return f"t={stamp},sha256=" + hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def kyc_body(user_id: str, status: str, event_id: str | None = None) -> bytes:
    return json.dumps({"event_id": event_id or f"evt_{uuid.uuid4().hex}", "user_id": user_id, "status": status}).encode()


async def post_kyc(
    server: ServerProcess, user_id: str, status: str, secret: str = DEV_KYC_SECRET, event_id: str | None = None
) -> aiohttp.ClientResponse:
    """A signed webhook delivery, of a new event unless ``event_id`` is given."""
    body = kyc_body(user_id, status, event_id)
    async with aiohttp.ClientSession() as s:
        async with s.post(server.http + "/webhooks/kyc", data=body, headers={"X-Signature": sign(body, secret)}) as r:
            await r.read()
            return r


async def verified_user(server: ServerProcess, price: str | None = None, **kw: Any) -> tuple[Client, dict]:
    """A connected, KYC-verified user (optionally a host with a price)."""
    client = await server.connect()
    session = await register(client, **kw)
    uid = session["user"]["id"]
    resp = await post_kyc(server, uid, "verified")
    assert resp.status == 200
    await client.next_event("user.updated")
    if price is not None:
        await client.call("users.update", {"price_per_hour": price})
    return client, session


async def get_when_replicated(client: Client, user_id: str, timeout: float = 10.0) -> dict:
    """``users.get`` of another user, who may have registered a moment ago:
    that read is served by a replica that may not have the user yet ("other
    users may see it a little later"). A bounded poll, nothing to await."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await client.call_raw("users.get", {"user_id": user_id})
        if "result" in reply:
            return reply["result"]
        assert reply["error"]["code"] == "not_found", reply
        assert asyncio.get_running_loop().time() < deadline, f"{user_id} never became visible"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replay_paused(replica_db: asyncpg.Pool) -> AsyncIterator[None]:
    """The replica stops replaying WAL (it lags on purpose) until the block ends."""
    await replica_db.execute("SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        await replica_db.execute("SELECT pg_wal_replay_resume()")


async def readyz(server: ServerProcess) -> tuple[int, dict]:
    """/readyz on the public port, as a balancer sees it."""
    async with aiohttp.ClientSession() as s:
        async with s.get(server.http + "/readyz") as r:
            return r.status, await r.json()


async def ops_status(server: ServerProcess) -> dict:
    """The process's details (hosts, lag, errors, counters, pid) from /status
    on its metrics port: the one process of a WORKERS=1 server."""
    r = await server.ops_get("/status")
    assert r.status == 200, r.status
    (process,) = (await r.json())["processes"]
    return process


def metric_sum(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= have)


async def scrape(server: ServerProcess) -> dict[tuple[str, frozenset], float]:
    """/metrics on the metrics port, parsed: (sample name, its labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await server.ops_get("/metrics")
    assert r.status == 200, r.status
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(await r.text()) for s in family.samples}


async def until_not_ready(server: ServerProcess, timeout: float = 15.0) -> dict:
    """Bounded poll until /readyz says 503: it reports the health loops'
    last look, which sees an outage within a poll interval and a timeout.
    Each answer comes at once (it never waits on a dependency)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        started = loop.time()
        status, body = await readyz(server)
        assert loop.time() - started < 1, "/readyz waited"
        if status == 503:
            assert body["ready"] is False
            return body
        assert loop.time() < deadline, f"still ready: {body}"
        await asyncio.sleep(0.05)


async def wait_subscriber_connected(server: ServerProcess, timeout: float = 20.0) -> None:
    """The hub's reconnection is visible in /readyz; poll it, bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status, _ = await readyz(server)
        body = await ops_status(server)
        if status == 200 and body["redis"]["subscriber_connected"]:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"hub did not reconnect: {body}")
        await asyncio.sleep(0.05)


async def replica_caught_up(db: asyncpg.Pool, replica_db: asyncpg.Pool, timeout: float = 10.0) -> int:
    """Waits until the replica has replayed everything the primary has
    written so far; returns that position. (Replay has no event to await.)"""
    head = await db.fetchval("SELECT pg_current_wal_insert_lsn()::text")
    deadline = asyncio.get_running_loop().time() + timeout
    while not await replica_db.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", head):
        assert asyncio.get_running_loop().time() < deadline, "replica did not catch up"
        await asyncio.sleep(0.01)
    hi, lo = head.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


async def until_replica_has_replayed(server: ServerProcess, position: int, timeout: float = 15.0) -> None:
    """Bounded poll of the server's own view of the replica (its health loop
    polls the replay position): nothing to await."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        (replica,) = (await ops_status(server))["replicas"]
        if replica["ok"] and replica["replay_lsn"] >= position:
            return
        assert asyncio.get_running_loop().time() < deadline, f"replica never replayed {position}: {replica}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def redis_writes_hung(redis: aioredis.Redis) -> AsyncIterator[asyncio.Task]:
    """Redis that hangs rather than refuses: ``CLIENT PAUSE WRITE`` holds
    every write, ``PUBLISH`` and ``EVAL`` of every client (reads still
    answer) until the block ends. Yields a witness: a ``PUBLISH`` sent once
    the pause began, which is done only once Redis takes writes again."""
    # On a cluster every master is paused, and the witness is a sharded publish.
    where = {"target_nodes": RedisCluster.ALL_NODES} if isinstance(redis, RedisCluster) else {}
    await redis.execute_command("CLIENT", "PAUSE", 120_000, "WRITE", **where)
    witness = asyncio.create_task(redis.execute_command("SPUBLISH", "hangout-test:witness", b"") if where
                                  else redis.publish("hangout-test:witness", b""))
    try:
        yield witness
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE", **where)
        await witness


@contextlib.asynccontextmanager
async def row_locked(db: asyncpg.Pool, user_id: str) -> AsyncIterator[None]:
    """Hold a user's row lock: their writes (users.update...) wait until the
    block ends. A way to keep a real call in flight for as long as a test needs."""
    async with db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(user_id))
            yield
        finally:
            await tx.rollback()


async def until_writes_wait_on_the_lock(
        db: asyncpg.Pool, count: int, timeout: float = 5.0, statement: str = "UPDATE users%") -> None:
    """Until ``count`` statements like ``statement`` (updates of users by
    default) wait on a lock (a bounded poll of pg_stat_activity: the waiting
    happens inside PostgreSQL)."""
    deadline = asyncio.get_running_loop().time() + timeout
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1"
    while await db.fetchval(query, statement) < count:
        assert asyncio.get_running_loop().time() < deadline, "the writes never reached the lock"
        await asyncio.sleep(0.01)
