"""The loop that settlement, the relay, cleanup, presence and the health
checks run in: ``stop`` ends it even when a pass's work swallowed the cancel,
and the metrics see its passes."""

from __future__ import annotations

import asyncio

from server import periodic
from server.periodic import Periodic


async def test_stop_ends_a_loop_whose_pass_swallowed_the_cancel():
    started = asyncio.Event()

    async def swallowing() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # what a careless timeout helper does

    loop = Periodic("swallows", swallowing, 3600)
    await loop.start()
    await started.wait()
    await asyncio.wait_for(loop.stop(), 5)
    assert loop not in list(periodic.running())


async def test_a_finished_pass_is_counted_and_a_failed_one_is_not():
    calls = 0
    done = asyncio.Event()

    async def work() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bad pass")
        if calls == 3:
            done.set()

    loop = Periodic("counted", work, 0)
    await loop.start()
    assert loop in list(periodic.running())
    await asyncio.wait_for(done.wait(), 5)
    await loop.stop()
    assert calls >= 3 and loop.passes == calls - 1 and loop.last_pass is not None
