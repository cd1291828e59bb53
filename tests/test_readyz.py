"""/readyz: ready or not and a boolean per dependency for anyone, from the
health loops' last look (it never waits for a connection). Hosts, lag,
errors, pids and counters are on the metrics port only (/status), which asks
for ``Authorization: Bearer <OPS_TOKEN>`` when OPS_TOKEN is set."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.conftest import (OPS_TOKEN, ServerProcess, metric_sum, ops_status, port_of, readyz, register,
                            row_locked, scrape, until_writes_wait_on_the_lock)

PUBLIC_KEYS = {"ready", "checks"}


async def get(url: str, headers: dict[str, str]) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body


async def test_anyone_sees_ready_and_one_boolean_per_dependency_only(server):
    status, body = await readyz(server)
    assert status == 200
    assert body == {"ready": True, "checks": {"primary": True, "replicas": True, "redis": True}}


async def test_readyz_shows_no_details_even_to_the_ops_token(server):
    status, body = await get(server.http + "/readyz", {"Authorization": f"Bearer {OPS_TOKEN}"})
    assert status == 200 and set(body) == PUBLIC_KEYS


async def test_the_metrics_port_refuses_a_missing_or_wrong_token(server):
    for path in ("/status", "/metrics"):
        for header in (None, f"Bearer {OPS_TOKEN[:-1]}", f"Bearer {OPS_TOKEN}x", f"Basic {OPS_TOKEN}", OPS_TOKEN,
                       "Bearer", "Bearer é", f"bearer  {OPS_TOKEN[::-1]}"):
            status, body = await get(server.metrics + path, {"Authorization": header} if header else {})
            assert status == 401, (path, header)
            assert "pid" not in str(body) and "replicas" not in str(body)


async def test_the_ops_token_sees_hosts_lag_counters_and_pid(server, stack):
    body = await ops_status(server)
    assert body["ready"] is True
    assert {"primary", "replicas", "redis", "sockets", "pid"} <= set(body)
    assert f":{port_of(stack.replica_urls[0])}/" in body["replicas"][0]["url"]


async def test_without_an_ops_token_the_metrics_port_needs_none(stack):
    """Loopback by default: with no OPS_TOKEN set, Prometheus scrapes it as it is."""
    proc = await ServerProcess(stack, OPS_TOKEN="").start()
    try:
        status, body = await get(proc.metrics + "/status", {})
        assert status == 200 and body["processes"][0]["pid"] == proc.proc.pid
        status, _ = await get(proc.metrics + "/metrics", {})
        assert status == 200
        status, body = await get(proc.http + "/readyz", {})
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
                while (await ops_status(proc))["primary"]["waiting"] < 1:  # bounded poll: a counter
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                samples = await scrape(proc)
                assert metric_sum(samples, "hangout_db_pool_waiting") >= 1
                assert metric_sum(samples, "hangout_db_pool_waits_total") >= 1
                for _ in range(5):
                    started = time.monotonic()
                    status, body = await readyz(proc)
                    assert time.monotonic() - started < 1
                    assert status == 200 and body["checks"]["primary"] is True
            await asyncio.gather(held, queued)
    finally:
        await proc.stop()
