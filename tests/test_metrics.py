"""/metrics on the metrics port: Prometheus text that moves with calls, from
one process and from the supervisor of WORKERS=2 (every worker's series in
one scrape, labelled by worker)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import aiohttp
import pytest

from protocol.client import Client, ConnectionClosed
from server.config import Config, ConfigError
from tests.conftest import ROOT, ServerProcess, metric_sum, register, scrape

CALLS = "hangout_call_duration_seconds_count"


async def test_calls_are_counted_by_method_and_outcome_with_their_latency(server):
    async with await server.connect() as c:
        await register(c)
        before = await scrape(server)
        for _ in range(3):
            await c.call("users.me")
        unknown = await c.call_raw("no.such.method", {})
        assert unknown["error"]["code"] == "unknown_method"
        after = await scrape(server)
    assert metric_sum(after, CALLS, method="users.me", outcome="ok") == \
        metric_sum(before, CALLS, method="users.me", outcome="ok") + 3
    # A name the server does not know is not a label value of its own.
    assert metric_sum(after, CALLS, method="unknown", outcome="unknown_method") == \
        metric_sum(before, CALLS, method="unknown", outcome="unknown_method") + 1
    assert not any("no.such.method" in str(labels) for _, labels in after)
    # The histogram's buckets hold the same calls, the largest all of them.
    assert metric_sum(after, "hangout_call_duration_seconds_bucket", method="users.me", outcome="ok", le="+Inf") == \
        metric_sum(after, CALLS, method="users.me", outcome="ok")
    assert metric_sum(after, "hangout_call_duration_seconds_sum", method="users.me", outcome="ok") > 0


async def test_an_unauthenticated_call_is_counted_with_its_error_code(server):
    async with await server.connect() as c:
        before = await scrape(server)
        reply = await c.call_raw("users.me", {})
        assert reply["error"]["code"] == "unauthenticated"
        after = await scrape(server)
    assert metric_sum(after, CALLS, method="users.me", outcome="unauthenticated") == \
        metric_sum(before, CALLS, method="users.me", outcome="unauthenticated") + 1


async def test_the_state_of_the_process_is_in_the_scrape(server, stack):
    async with await server.connect() as a, await server.connect() as b:
        await register(a)
        await register(b)
        samples = await scrape(server)
        assert metric_sum(samples, "hangout_sockets_open") >= 2
    assert metric_sum(samples, "hangout_primary_up") == 1
    assert metric_sum(samples, "hangout_redis_up") == 1
    assert metric_sum(samples, "hangout_redis_subscriber_connected") == 1
    assert metric_sum(samples, "hangout_replica_up") == len(stack.replica_urls)
    names = {name for name, _ in samples}
    for name in ("hangout_replica_lag_bytes", "hangout_replica_reads_total", "hangout_primary_reads_total",
                 "hangout_db_pool_waiting", "hangout_db_pool_waits_total", "hangout_merged_write_batches_total",
                 "hangout_redis_outages_total", "hangout_events_fanned_out_total",
                 "hangout_slow_socket_closes_total", "hangout_bookings_settled_total",
                 "hangout_events_relayed_late_total", "process_resident_memory_bytes"):
        assert name in names, name
    loops = {dict(labels)["loop"] for name, labels in samples if name == "hangout_loop_seconds_since_pass"}
    assert {"settlement", "relay", "redis-health", "replica-health"} <= loops


async def test_events_handed_to_sockets_are_counted(server):
    async with await server.connect() as c:
        await register(c)
        before = metric_sum(await scrape(server), "hangout_events_fanned_out_total")
        await c.call("users.update", {"name": "Counted Event"})
        await c.next_event("user.updated")
        after = metric_sum(await scrape(server), "hangout_events_fanned_out_total")
    assert after >= before + 1


async def test_with_workers_2_one_scrape_counts_the_calls_of_both(stack):
    proc = await ServerProcess(stack, WORKERS="2").start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the second worker may still be starting: a bounded poll
            samples = await scrape(proc)
            if metric_sum(samples, "hangout_worker_up") == 2:
                break
            assert time.monotonic() < deadline, "a worker never answered the supervisor"
            await asyncio.sleep(0.05)
        before = {w: metric_sum(samples, CALLS, method="users.me", outcome="ok", worker=w) for w in ("0", "1")}
        made = 0
        held: list[Client] = []
        try:
            while True:
                assert time.monotonic() < deadline, "every socket went to one worker"
                c = await proc.connect()  # its own TCP connection: the kernel picks the worker
                held.append(c)
                await register(c)
                await c.call("users.me")
                made += 1
                samples = await scrape(proc)
                counted = {w: metric_sum(samples, CALLS, method="users.me", outcome="ok", worker=w) - before[w]
                           for w in ("0", "1")}
                if made >= 4 and all(n > 0 for n in counted.values()):
                    break
            # Every call is in the scrape once, whichever worker made it.
            assert sum(counted.values()) == made
            assert metric_sum(samples, "hangout_sockets_open") == len(held)
            # Each worker's series is labelled; no series lacks its worker.
            assert all("worker" in dict(labels) for _, labels in samples)
        finally:
            for c in held:
                await c.close()
        status = await proc.ops_get("/status")
        assert len((await status.json())["processes"]) == 2
        page = await proc.ops_get("/metrics")
        assert page.headers["Content-Type"].startswith("text/plain; version=")
        assert_one_type_line_per_family(await page.text())
    finally:
        await proc.stop()


async def test_an_event_the_relay_had_to_publish_is_counted_with_its_delay(stack, server, server2):
    """A process commits a top-up and dies before publishing it: whichever
    process relays it counts it, with its age (at least the relay's wait)."""
    doomed = await ServerProcess(stack, test_methods=True).start()
    living = (server, server2)
    name = "hangout_relay_delay_seconds_count"
    before = [metric_sum(await scrape(p), name) for p in living]
    async with await server.connect() as c:
        user_id = (await register(c))["user"]["id"]
        seq = (await c.call("users.me"))["event_seq"]
        seam = await doomed.connect()
        with pytest.raises((ConnectionClosed, asyncio.TimeoutError)):
            await seam.call("test.topup_then_exit", {"user_id": user_id, "amount": "7.00"}, timeout=10)
        await seam.close()
        await doomed.stop()
        await c.wait_numbered([seq + 1], timeout=10)
    deadline = time.monotonic() + 5
    while True:  # the relay counts once Redis took the publish, maybe after the delivery: a bounded poll
        after = [await scrape(p) for p in living]
        if sum(metric_sum(a, name) for a in after) - sum(before) >= 1:
            break
        assert time.monotonic() < deadline, "the relayed event was not counted"
        await asyncio.sleep(0.05)
    assert sum(metric_sum(a, "hangout_relay_delay_seconds_sum") for a in after) >= 1.0  # RELAY_AFTER_S on
    assert sum(metric_sum(a, "hangout_events_relayed_late_total") for a in after) >= 1


async def test_a_scrape_is_valid_prometheus_text(server):
    r = await server.ops_get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    assert_one_type_line_per_family(await r.text())


def assert_one_type_line_per_family(text: str) -> None:
    """Prometheus refuses a page that declares a family twice (as pages of
    workers pasted together would)."""
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert types and len(types) == len(set(types))


def test_the_metrics_port_is_on_loopback_unless_configured(monkeypatch):
    monkeypatch.delenv("METRICS_HOST", raising=False)
    monkeypatch.delenv("METRICS_PORT", raising=False)
    config = Config.from_env()
    assert config.metrics_host == "127.0.0.1" and config.metrics_port > 0
    monkeypatch.setenv("METRICS_PORT", "0")
    assert Config.from_env().metrics_port == 0  # turned off


@pytest.mark.parametrize("name,value", [("METRICS_PORT", "70000"), ("METRICS_PORT", "x"), ("LOG_FORMAT", "xml")])
def test_a_bad_setting_names_its_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        Config.from_env()


async def test_metrics_port_0_serves_no_metrics(stack):
    proc = ServerProcess(stack)
    proc.env["METRICS_PORT"] = "0"
    await proc.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proc.http + "/metrics") as r:
                assert r.status == 404  # never on the public port
        async with await proc.connect() as c:
            assert (await register(c))["user"]["id"]
    finally:
        await proc.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_metrics_port_in_use_stops_the_start_before_any_client_is_served(stack, workers):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        proc = ServerProcess(stack, WORKERS=workers, METRICS_PORT=str(taken.getsockname()[1]))
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "serve", cwd=ROOT, env=proc.env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(run.communicate(), 60)
        assert run.returncode == 2 and "cannot serve metrics" in err.decode()
        with pytest.raises(OSError):  # it never listened
            await asyncio.open_connection("127.0.0.1", proc.port)
    finally:
        taken.close()
