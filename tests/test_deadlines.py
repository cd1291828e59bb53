"""One loop timer for many deadlines (server/deadlines.py): each callback runs
once, not before its time, in order of time; a cancelled one never runs; a
failing one stops none of the others; cancelled entries do not pile up."""

from __future__ import annotations

import asyncio

from server import deadlines as deadlines_module
from server.deadlines import Deadlines


async def test_callbacks_run_in_order_of_time_and_not_before_it():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[tuple[str, float]] = []
    done = loop.create_future()

    def at(name: str, when: float):
        def callback() -> None:
            ran.append((name, loop.time() - when))
            if len(ran) == 3:
                done.set_result(None)
        return deadlines.call_at(when, callback)

    start = loop.time()
    at("third", start + 0.15)
    at("first", start + 0.05)
    at("second", start + 0.10)  # added after a later one: the loop timer moves earlier
    await asyncio.wait_for(done, 5)
    assert [name for name, _ in ran] == ["first", "second", "third"]
    assert all(late >= -deadlines_module.CLOCK_SLACK_S for _, late in ran)
    assert len(deadlines) == 0


async def test_a_cancelled_deadline_never_runs_and_a_failing_one_stops_no_other():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[str] = []
    done = loop.create_future()

    def fail() -> None:
        ran.append("fail")
        raise RuntimeError("a bad callback")

    cancelled = deadlines.call_later(0.02, lambda: ran.append("cancelled"))
    deadlines.call_later(0.03, fail)
    deadlines.call_later(0.04, lambda: done.set_result(ran.append("after")))
    deadlines.cancel(cancelled)
    deadlines.cancel(cancelled)  # twice is once
    await asyncio.wait_for(done, 5)
    assert ran == ["fail", "after"]


async def test_a_callback_may_add_deadlines_earlier_than_the_ones_waiting():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[str] = []
    done = loop.create_future()

    def first() -> None:
        ran.append("first")
        deadlines.call_later(0.3, lambda: done.set_result(ran.append("late")))

    deadlines.call_later(0.01, first)
    deadlines.call_later(0.1, lambda: ran.append("waiting"))
    await asyncio.wait_for(done, 5)
    assert ran == ["first", "waiting", "late"]


async def test_cancelled_entries_do_not_pile_up():
    deadlines = Deadlines()
    entries = [deadlines.call_later(3600, lambda: None) for _ in range(3 * deadlines_module.COMPACT_MIN)]
    for entry in entries:
        deadlines.cancel(entry)
    assert len(deadlines) == 0
    assert len(deadlines._heap) <= deadlines_module.COMPACT_MIN + 1
    deadlines.close()
