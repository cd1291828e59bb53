"""/readyz: ready or not and a boolean per dependency for anyone, from the
health loops' last look (it never waits for a connection); hosts, lag,
errors, pids and counters only with ``Authorization: Bearer <OPS_TOKEN>``."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.conftest import (OPS_TOKEN, ServerProcess, port_of, readyz, register, row_locked,
                            until_writes_wait_on_the_lock)

PUBLIC_KEYS = {"ready", "checks"}


async def get(server: ServerProcess, headers: dict[str, str]) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(server.http + "/readyz", headers=headers) as r:
            return r.status, await r.json()


async def test_anyone_sees_ready_and_one_boolean_per_dependency_only(server):
    status, body = await readyz(server, token="")
    assert status == 200
    assert body == {"ready": True, "checks": {"primary": True, "replicas": True, "redis": True}}


async def test_a_wrong_token_sees_no_details(server):
    for header in (f"Bearer {OPS_TOKEN[:-1]}", f"Bearer {OPS_TOKEN}x", f"Basic {OPS_TOKEN}", OPS_TOKEN,
                   "Bearer", "Bearer é", f"bearer  {OPS_TOKEN[::-1]}"):
        status, body = await get(server, {"Authorization": header})
        assert status == 200
        assert set(body) == PUBLIC_KEYS, header


async def test_the_ops_token_sees_hosts_lag_counters_and_pid(server, stack):
    status, body = await get(server, {"Authorization": f"Bearer {OPS_TOKEN}"})
    assert status == 200 and body["ready"] is True
    assert {"primary", "replicas", "redis", "sockets", "pid"} <= set(body)
    assert f":{port_of(stack.replica_urls[0])}/" in body["replicas"][0]["url"]


async def test_without_an_ops_token_nobody_sees_details(stack):
    proc = await ServerProcess(stack, OPS_TOKEN="").start()
    try:
        for header in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}):
            status, body = await get(proc, header)
            assert status == 200 and set(body) == PUBLIC_KEYS
    finally:
        await proc.stop()


async def test_it_answers_at_once_while_the_primary_pool_is_exhausted(stack, db):
    """One pooled connection, held by a write waiting on a row lock, and a
    second write waiting for the pool: /readyz does not wait behind them,
    and the primary, which answers, is still reported ready."""
    proc = await ServerProcess(stack, DB_POOL_MIN="1", DB_POOL_MAX="1").start()
    try:
        async with await proc.connect() as a, await proc.connect() as b:
            a_id = (await register(a))["user"]["id"]
            await register(b)
            async with row_locked(db, a_id):
                held = asyncio.create_task(a.call("users.update", {"name": "Held"}))
                await until_writes_wait_on_the_lock(db, 1)
                queued = asyncio.create_task(b.call("users.update", {"name": "Queued"}))
                deadline = time.monotonic() + 3
                while (await readyz(proc))[1]["primary"]["waiting"] < 1:  # bounded poll: a counter
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                for _ in range(5):
                    started = time.monotonic()
                    status, body = await readyz(proc, token="")
                    assert time.monotonic() - started < 1
                    assert status == 200 and body["checks"]["primary"] is True
            await asyncio.gather(held, queued)
    finally:
        await proc.stop()
