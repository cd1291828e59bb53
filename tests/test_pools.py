"""server/db/pool.py's pool wrapper against the real primary: connections
go to callers in the order they asked, however many are waiting."""

from __future__ import annotations

import asyncio
import itertools
import random

import asyncpg

from server.db.pool import Acquire, FairPool


async def _grant_order(stack, use_gate: bool) -> list[int]:
    """20 callers, 50 uses each, of a pool of 2 connections; returns the
    arrival tickets in the order their connections were granted."""
    raw = await asyncpg.create_pool(stack.direct_database_url, min_size=2, max_size=2)
    pool = FairPool(raw)
    tickets = itertools.count()
    granted: list[int] = []
    rng = random.Random(7)

    async def caller() -> None:
        for _ in range(50):
            ticket = next(tickets)
            async with (Acquire(pool, 10) if use_gate else raw.acquire()) as conn:
                granted.append(ticket)
                await conn.fetchval("SELECT 1")
            await asyncio.sleep(rng.random() / 1000)

    try:
        await asyncio.gather(*(caller() for _ in range(20)))
    finally:
        await raw.close()
    return granted


async def test_connections_are_granted_in_the_order_they_were_asked_for(stack):
    granted = await _grant_order(stack, use_gate=True)
    assert len(granted) == 1000
    assert granted == sorted(granted)


async def test_the_bare_asyncpg_pool_lets_later_callers_pass(stack):
    """Why FairPool exists: a freed connection goes to whoever asks first
    after it is freed, and the woken waiter queues again at the end."""
    granted = await _grant_order(stack, use_gate=False)
    assert granted != sorted(granted)
