"""Process lifecycle: graceful shutdown on SIGTERM, and WORKERS=N processes
sharing one port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import pytest

from protocol.client import ConnectionClosed
from protocol.errors import RpcError
from tests.conftest import (ROOT, ServerProcess, metric_sum, register, row_locked, scrape,
                            until_writes_wait_on_the_lock)


async def until_connections_are_refused(server: ServerProcess, timeout: float = 5.0) -> None:
    """Bounded poll: a listening socket closing is not an event we can await."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except (ConnectionRefusedError, ConnectionResetError):  # reset: caught closing its backlog
            return
        writer.close()
        assert time.monotonic() < deadline, "still accepting connections"
        await asyncio.sleep(0.02)


async def test_sigterm_stops_accepting_finishes_in_flight_calls_then_closes_sockets_with_1001(stack, db):
    proc = await ServerProcess(stack).start()
    try:
        async with await proc.connect() as busy, await proc.connect() as idle:
            s = await register(busy)
            async with row_locked(db, s["user"]["id"]):
                in_flight = asyncio.create_task(busy.call("users.update", {"name": "Finished Late"}))
                await until_writes_wait_on_the_lock(db, 1)
                proc.proc.send_signal(signal.SIGTERM)
                # A socket with nothing in flight is closed at once; the busy
                # one stays open while its call has not finished.
                assert await idle.wait_closed() == 1001
                # A new request during the drain is told to go elsewhere.
                with pytest.raises(RpcError) as refused:
                    await busy.call("users.me")
                assert refused.value.code.value == "unavailable"
                assert not in_flight.done()
                assert not busy.closed.is_set()
                await until_connections_are_refused(proc)
                with pytest.raises((aiohttp.ClientError, OSError)):
                    await proc.connect()
            # The call finishes (the row is free), its reply is delivered, then 1001.
            assert (await in_flight)["name"] == "Finished Late"
            assert await busy.wait_closed() == 1001
        assert await asyncio.to_thread(proc.proc.wait, 15) == 0
    finally:
        await proc.stop()
    # The change was committed, as the reply said.
    assert await db.fetchval("SELECT name FROM users WHERE email = $1", s["user"]["email"]) == "Finished Late"


async def test_sigterm_gives_in_flight_calls_at_most_the_grace_period(stack, db):
    proc = await ServerProcess(stack, SHUTDOWN_GRACE_S="1").start()
    try:
        async with await proc.connect() as c:
            s = await register(c)
            async with row_locked(db, s["user"]["id"]):
                stuck = asyncio.create_task(c.call("users.update", {"name": "Never"}))
                await until_writes_wait_on_the_lock(db, 1)
                signalled = time.monotonic()
                proc.proc.send_signal(signal.SIGTERM)
                assert await c.wait_closed() == 1001
                assert 0.9 <= time.monotonic() - signalled < 4
                with pytest.raises(ConnectionClosed):
                    await stuck
            assert await asyncio.to_thread(proc.proc.wait, 15) == 0
    finally:
        await proc.stop()


async def test_workers_2_runs_two_processes_on_one_port(stack):
    proc = await ServerProcess(stack, WORKERS="2").start()
    try:
        deadline = time.monotonic() + 15
        while True:  # the second worker may still be starting: a bounded poll
            r = await proc.ops_get("/status")
            processes = (await r.json())["processes"]
            if len(processes) == 2:
                break
            assert time.monotonic() < deadline, processes
            await asyncio.sleep(0.05)
        pids = {p["pid"] for p in processes}
        assert len(pids) == 2 and proc.proc.pid not in pids  # the workers, not the supervisor, serve
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == proc.proc.pid
        # Both serve the protocol: a new TCP connection per socket, which the
        # kernel spreads over the processes listening with SO_REUSEPORT, until
        # each worker has answered a call (its own count in the host's scrape).
        served: dict[str, float] = {}
        while len([n for n in served.values() if n > 0]) < 2:
            assert time.monotonic() < deadline + 15, served
            async with await proc.connect() as c:
                await register(c)
            samples = await scrape(proc)
            served = {w: metric_sum(samples, "hangout_call_duration_seconds_count", method="auth.register",
                                    worker=w) for w in ("0", "1")}
        assert await proc.stop() == 0  # SIGTERM reaches every worker
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}")
    finally:
        await proc.stop()


@pytest.mark.parametrize("unset", [("JWT_SECRET",), ("KYC_WEBHOOK_SECRET",), ("JWT_SECRET", "KYC_WEBHOOK_SECRET")])
async def test_a_server_given_a_database_but_not_its_secrets_refuses_to_start(stack, unset):
    """The development secrets are public: only the embedded dev stack (no
    DATABASE_URL) may fall back to them."""
    proc = ServerProcess(stack)
    for name in unset:
        proc.env[name] = ""  # set but empty counts as not set
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve", cwd=ROOT, env=proc.env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 2
    assert all(name in err.decode() for name in unset)
    with pytest.raises(OSError):  # it never listened
        await asyncio.open_connection("127.0.0.1", proc.port)
