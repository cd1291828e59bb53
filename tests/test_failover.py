"""Primary failover under a booking load, on a dev stack of this module's
own (a temporary directory, its own ports), so the suite's shared stack
keeps its roles.

The server's ``DATABASE_URL`` names both PostgreSQL servers with
``target_session_attrs=read-write``. The primary is stopped at once
(``pg_ctl stop -m immediate``) and the replica promoted: meanwhile writes
answer ``unavailable`` (each within the contract's 5 s), then succeed again
within 10 s of the promotion, in the same server process. With synchronous
replication, every booking a client got a result for is on the new primary,
and the ledger invariants hold there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import asyncpg
import pytest

from protocol.client import Client
from protocol.errors import RpcError
from server import devstack
from server.db.migrate import migrate
from server.devstack.failover import was_promoted
from tests.booking_support import booker, host, key, slot
from tests.conftest import ServerProcess, free_port
from tests import test_ledger  # the module, so that its test is not collected here too

BOOKERS = 4
# The contract's bounds: a write is answered within 5 s, even when the
# primary does not answer; writes resume within 10 s of a promotion.
ANSWER_WITHIN_S = 5.0
RESUME_WITHIN_S = 10.0
# One second of slack on ANSWER_WITHIN_S for the test's own event loop on a
# shared machine (the server's deadline is 4 s).
SCHEDULING_SLACK_S = 1.0
# Each booker books an hour of its host and cancels it, hour after hour (an
# hour comes round again only after all the others). A call answered `unavailable`
# is made again (a booking with the same idempotency key), as a client would.
HOURS = 87 * 24  # bookings go at most 90 days ahead
MAX_BOOKINGS_PER_BOOKER = 5000
LOAD_LIMIT_S = 60


@pytest.fixture(scope="module")
def own_stack() -> Iterator[devstack.DevStack]:
    base = Path(tempfile.mkdtemp(prefix="devstack-failover-"))
    base.chmod(0o755)  # PostgreSQL runs as its own OS user when we are root
    ports: list[int] = []
    for _ in range(30):  # three different free ports
        if len(ports) == 3:
            break
        port = free_port()
        if port not in ports:
            ports.append(port)
    stack = devstack.DevStack(base_dir=base, primary_port=ports[0], replica_port=ports[1], redis_port=ports[2])
    try:
        stack.start()
        asyncio.run(migrate(stack.database_url))
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Load:
    """Bookers booking and cancelling hours of one host each until told to
    stop, recording what each call was answered and how long it took."""

    bookers: list[tuple[Client, str, str]]  # (socket, booker id, host id)
    hosts: list[Client]  # the hosts' sockets
    # (booker index, booking id, when sent) of each booking with a result
    acknowledged: list[tuple[int, str, float]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    # Acknowledged bookings that a cancel then did not find: lost in the failover
    lost: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    promoted_at: float | None = None
    resumed_at: float | None = None  # first result of a call made after promoted_at
    warmed_up: asyncio.Event = field(default_factory=asyncio.Event)
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def booking_ids(self) -> list[str]:
        return [b for _, b, _ in self.acknowledged]

    async def run(self) -> None:
        await asyncio.gather(*(self._book(i, *b) for i, b in enumerate(self.bookers)))

    def _running(self, deadline: float) -> bool:
        return not self.stop.is_set() and time.monotonic() < deadline

    async def _book(self, i: int, client: Client, _booker_id: str, host_id: str) -> None:
        first = slot(days=1)
        deadline = time.monotonic() + LOAD_LIMIT_S
        for n in range(MAX_BOOKINGS_PER_BOOKER):
            start = first + dt.timedelta(hours=n % HOURS)
            params = {"host_id": host_id, "start_at": start, "end_at": start + dt.timedelta(hours=1),
                      "idempotency_key": key()}
            created, sent = None, 0.0
            while created is None and self._running(deadline):
                sent = time.monotonic()
                created = await self._call(client, "bookings.create", params)
            if created is None:
                return
            booking_id = created["booking"]["id"]
            self.acknowledged.append((i, booking_id, sent))
            if len(self.acknowledged) >= 20:
                self.warmed_up.set()
            # A cancel answered `unavailable` may have committed: made again,
            # it is then refused as already cancelled.
            cancelled = None
            while cancelled is None and self._running(deadline):
                cancelled = await self._call(client, "bookings.cancel", {"booking_id": booking_id},
                                             done_if=("invalid_state", "not_found"))
            if cancelled is None:
                return
            if cancelled == "not_found":
                self.lost.append(booking_id)

    async def _call(self, client: Client, method: str, params: dict, done_if: tuple[str, ...] = ()) -> Any:
        """The call's result, or the code in ``done_if`` it was refused
        with; None if it answered ``unavailable``."""
        sent = time.monotonic()
        try:
            result = await client.call(method, params, timeout=30)
        except RpcError as err:
            code = err.code.value
            self.errors[code] = self.errors.get(code, 0) + 1
            if code in done_if:
                return code
            if code != "unavailable":
                self.unexpected.append(f"{method}: {code} {err.data}")
                self.stop.set()
            return None
        finally:
            self.slowest_s = max(self.slowest_s, time.monotonic() - sent)
        if self.promoted_at is not None and sent >= self.promoted_at and self.resumed_at is None:
            self.resumed_at = time.monotonic()
            self.resumed.set()
        return result


async def replicated(stack: devstack.DevStack) -> None:
    """Wait until the replica has replayed everything the primary wrote so
    far: the load's users then outlive a failover even without synchronous
    replication (the load's own writes may not)."""
    primary = await asyncpg.connect(stack.database_url)
    replica = await asyncpg.connect(stack.replica_urls[0])
    try:
        # The insert position: with the dev stack's asynchronous commits, a
        # commit already answered may lie past the written one, and an
        # immediate stop would lose it with the WAL buffers.
        target = await primary.fetchval("SELECT pg_current_wal_insert_lsn()")
        for _ in range(200):  # another process's progress: polled, 10 s at most
            if await replica.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", target):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the replica did not catch up with the primary")
    finally:
        await primary.close()
        await replica.close()


async def start_load(server: ServerProcess, stack: devstack.DevStack) -> tuple[Load, asyncio.Task]:
    bookers, hosts = [], []
    for _ in range(BOOKERS):
        host_client, host_id = await host(server, price="1.00")
        client, booker_id = await booker(server, balance="100.00")
        hosts.append(host_client)
        bookers.append((client, booker_id, host_id))
    if not was_promoted(stack.replica):  # else there is no replica to wait for
        await replicated(stack)
    load = Load(bookers, hosts)
    return load, asyncio.create_task(load.run())


async def fail_over_under(load: Load, failover) -> None:
    """Let the load book a while, fail over, and wait until writes resume."""
    await asyncio.wait_for(load.warmed_up.wait(), 30)
    await asyncio.to_thread(failover)
    load.promoted_at = time.monotonic()
    try:
        await asyncio.wait_for(load.resumed.wait(), 30)
    except asyncio.TimeoutError:
        raise AssertionError(f"writes did not resume: {load.errors} {load.unexpected[:5]}") from None


async def finish(load: Load, task: asyncio.Task) -> None:
    load.stop.set()
    await asyncio.wait_for(task, 60)
    for client in [*(b[0] for b in load.bookers), *load.hosts]:
        await client.close()


def assert_outage_rode_out(load: Load) -> None:
    assert not load.unexpected, load.unexpected[:5]
    assert load.slowest_s <= ANSWER_WITHIN_S + SCHEDULING_SLACK_S, load.slowest_s
    assert load.resumed_at is not None and load.promoted_at is not None
    assert load.resumed_at - load.promoted_at <= RESUME_WITHIN_S, load.resumed_at - load.promoted_at


@pytest.fixture
async def failover_server(own_stack) -> AsyncIterator[ServerProcess]:
    proc = await ServerProcess(own_stack, DATABASE_URL=own_stack.failover_url).start()
    yield proc
    await proc.stop()


async def test_writes_resume_on_the_promoted_replica_without_a_restart(own_stack, failover_server):
    pid = failover_server.proc.pid  # type: ignore[union-attr]
    load, task = await start_load(failover_server, own_stack)
    try:
        await fail_over_under(load, own_stack.failover)
        # Reads go on too: the replica in DATABASE_REPLICA_URLS is a primary
        # now, and still serves them.
        client, _, _ = load.bookers[0]
        made_after = [b for i, b, at in load.acknowledged if i == 0 and at >= load.promoted_at]  # type: ignore[operator]
        if made_after:
            assert (await client.call("bookings.get", {"booking_id": made_after[-1]}))["id"] == made_after[-1]
        assert (await client.call("users.me"))["id"] == load.bookers[0][1]
    finally:
        await finish(load, task)
    assert_outage_rode_out(load)
    assert load.errors.get("unavailable", 0) > 0, "the primary died under load: calls in flight must fail"
    # Asynchronous replication: bookings acknowledged in the primary's last
    # moments may be missing on the promoted replica, none made after.
    sent = {b: at for _, b, at in load.acknowledged}
    assert all(sent[b] < load.promoted_at for b in load.lost), load.lost  # type: ignore[operator]
    assert failover_server.proc.poll() is None and failover_server.proc.pid == pid  # type: ignore[union-attr]


async def test_rejoin_gives_the_stack_its_roles_back_with_every_write(own_stack, failover_server):
    """After a failover, ``rejoin`` makes the old primary the primary again
    (a switchover from the promoted replica, nothing lost) and rebuilds the
    replica; the same server process follows it."""
    if not was_promoted(own_stack.replica):
        await asyncio.to_thread(own_stack.failover)
    load, task = await start_load(failover_server, own_stack)
    try:
        await fail_over_under(load, own_stack.rejoin)
    finally:
        await finish(load, task)
    assert_outage_rode_out(load)
    assert not load.lost, load.lost
    assert own_stack.replica_streaming()
    conn = await asyncpg.connect(own_stack.database_url)
    try:
        assert await conn.fetchval("SELECT NOT pg_is_in_recovery()")
        found = await conn.fetchval("SELECT count(*) FROM bookings WHERE id = ANY($1::uuid[])", load.booking_ids())
    finally:
        await conn.close()
    assert found == len(load.acknowledged), "a booking was lost in the switchover"


async def test_a_primary_that_turns_read_only_is_left_until_it_takes_writes_again(own_stack, failover_server):
    """A server that stops taking writes (as an old primary back as a
    replica): its connections are dropped, writes answer ``unavailable``
    (not ``internal``), and succeed again once a host takes writes."""
    if was_promoted(own_stack.replica):
        await asyncio.to_thread(own_stack.rejoin)
    _, host_id = await host(failover_server, price="1.00")
    client, _ = await booker(failover_server, balance="1000.00")
    first = slot(days=2)

    async def book(n: int) -> str:
        start = first + dt.timedelta(hours=n)
        try:
            await client.call("bookings.create", {"host_id": host_id, "start_at": start,
                                                  "end_at": start + dt.timedelta(hours=1), "idempotency_key": key()})
        except RpcError as err:
            return err.code.value
        return "result"

    admin = await asyncpg.connect(own_stack.database_url)
    try:
        assert await book(0) == "result"
        await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await admin.execute("SELECT pg_reload_conf()")
        # Each backend reads the new setting at its next statement: a write
        # or so may still commit before it does.
        answers = []
        for n in range(1, 100):
            answers.append(await book(n))
            if answers[-1] != "result":
                break
        answers.append(await book(100))  # no connection to it is made again
        assert answers[-2:] == ["unavailable"] * 2, answers
        await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await admin.execute("SELECT pg_reload_conf()")
        writable_at = time.monotonic()
        resumed = False
        for n in range(101, 1000):  # bounded by count and by the contract's 10 s
            resumed = await book(n) == "result"
            if resumed or time.monotonic() - writable_at > RESUME_WITHIN_S:
                break
        assert resumed and time.monotonic() - writable_at <= RESUME_WITHIN_S
    finally:
        await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()
        await client.close()


async def test_with_synchronous_replication_no_acknowledged_booking_is_lost(own_stack):
    sync_stack = devstack.DevStack(base_dir=own_stack.base_dir, primary_port=own_stack.primary_port,
                                   replica_port=own_stack.replica_port, redis_port=own_stack.redis_port,
                                   sync_replication=True)
    await asyncio.to_thread(sync_stack.start)
    conn = await asyncpg.connect(sync_stack.database_url)
    try:
        assert await conn.fetchval("SHOW synchronous_standby_names") != ""
        assert await conn.fetchval("SELECT sync_state FROM pg_stat_replication") == "sync"
    finally:
        await conn.close()
    server = await ServerProcess(sync_stack, DATABASE_URL=sync_stack.failover_url).start()
    try:
        load, task = await start_load(server, sync_stack)
        try:
            await fail_over_under(load, sync_stack.failover)
        finally:
            await finish(load, task)
    finally:
        await server.stop()
    assert_outage_rode_out(load)

    pool = await asyncpg.create_pool(sync_stack.failover_url, min_size=1, max_size=2)
    try:
        found = await pool.fetchval("SELECT count(*) FROM bookings WHERE id = ANY($1::uuid[])", load.booking_ids())
        assert not load.lost and found == len(load.acknowledged), "an acknowledged booking was lost in the failover"
        await test_ledger.check_ledger(pool, [uuid.UUID(u) for _, b, h in load.bookers for u in (b, h)])
    finally:
        await pool.close()
