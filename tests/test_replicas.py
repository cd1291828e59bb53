"""Reads marked "Replica": read-your-writes across sockets and processes,
reads by others served by the replica, and no read ever failing because a
replica is behind or dead.

Replay on the replica is paused with ``pg_wal_replay_pause()`` to make it lag
on purpose (and always resumed), or the replica is stopped outright.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import pytest

from tests.booking_support import book, host, key, slot
from tests.conftest import (ServerProcess, ops_status, post_kyc, register, replay_paused, until_replica_has_replayed,
                            verified_user)


async def write_position(redis, *user_ids: str) -> int:
    """The highest WAL position recorded for these users' writes."""
    values = [await redis.get(f"ryw:{u}") for u in user_ids]
    return max(int(v) for v in values if v is not None)


async def status_body(server: ServerProcess) -> dict:
    """The process's details, from /status on its metrics port."""
    return await ops_status(server)


async def reads_served_by_replica(server: ServerProcess) -> int:
    (replica,) = (await status_body(server))["replicas"]
    return replica["reads_served"]


@pytest.fixture
async def x_and_y(server, server2, redis):
    """User X on both processes, user Y on process 2; the replica (as process
    2 sees it) has replayed both registrations."""
    x1 = await server.connect()
    x = await register(x1, name="Old Name")
    x2 = await server2.connect(access_token=x["access_token"])
    y2 = await server2.connect()
    y = await register(y2)
    await until_replica_has_replayed(server2, await write_position(redis, x["user"]["id"], y["user"]["id"]))
    yield x1, x2, y2, x["user"]["id"]
    for c in (x1, x2, y2):
        await c.close()


async def test_a_user_reads_their_own_write_on_another_process_while_the_replica_lags(x_and_y, replica_db):
    x1, x2, _, x_id = x_and_y
    async with replay_paused(replica_db):
        await x1.call("users.update", {"name": "New Name"})
        assert (await x2.call("users.me"))["name"] == "New Name"
        assert (await x2.call("users.get", {"user_id": x_id}))["name"] == "New Name"


async def test_read_your_writes_survives_redis_losing_the_write_positions(x_and_y, replica_db, redis):
    x1, x2, _, _ = x_and_y
    async with replay_paused(replica_db):
        await x1.call("users.update", {"name": "New Name"})
        await redis.flushall()  # what a restart of a Redis without persistence does
        assert (await x2.call("users.me"))["name"] == "New Name"


async def test_a_user_the_replica_has_not_replayed_yet_is_still_found(x_and_y, replica_db, server):
    _, _, y2, _ = x_and_y
    async with replay_paused(replica_db):
        async with await server.connect() as z:
            z_id = (await register(z, name="Brand New"))["user"]["id"]
        # Y may have learnt the id from a fresher read (a search, an event).
        assert (await y2.call("users.get", {"user_id": z_id}))["name"] == "Brand New"
        now = dt.datetime.now(dt.timezone.utc)
        span = {"host_id": z_id, "from": now, "to": now + dt.timedelta(days=1)}
        assert (await y2.call("hosts.availability", span)) == {"busy": []}


async def test_another_user_is_served_by_the_replica_and_may_see_the_old_value(x_and_y, replica_db, server2):
    x1, _, y2, x_id = x_and_y
    async with replay_paused(replica_db):
        await x1.call("users.update", {"name": "New Name"})
        served = await reads_served_by_replica(server2)
        # Only a replica that has not replayed the update can still say this.
        assert (await y2.call("users.get", {"user_id": x_id}))["name"] == "Old Name"
        assert await reads_served_by_replica(server2) == served + 1
    # Others see it "a little later": once replay resumes.
    deadline = time.monotonic() + 10
    while (await y2.call("users.get", {"user_id": x_id}))["name"] != "New Name":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_replica_lag_is_reported_in_status(server, replica_db):
    async with await server.connect() as c:
        await register(c)
        async with replay_paused(replica_db):
            await c.call("users.update", {"name": "Lagging"})
            deadline = time.monotonic() + 10
            while not ((replica := (await status_body(server))["replicas"][0])["lag_bytes"] or 0) > 0:
                assert time.monotonic() < deadline, replica
                await asyncio.sleep(0.05)
            assert replica["ok"] is True  # a little lag is not a reason to skip it


async def test_a_replica_lagging_past_the_bound_is_skipped(stack, x_and_y, replica_db, redis):
    x1, _, _, x_id = x_and_y
    strict = await ServerProcess(stack, REPLICA_MAX_LAG_BYTES="1").start()
    try:
        async with await strict.connect() as y:
            await register(y)
            await until_replica_has_replayed(strict, await write_position(redis, x_id))
            async with replay_paused(replica_db):
                await x1.call("users.update", {"name": "New Name"})
                deadline = time.monotonic() + 10
                while (await status_body(strict))["replicas"][0]["ok"]:  # the health loop sees the lag
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                served = await reads_served_by_replica(strict)
                # Served by the primary, so even another user sees the new name.
                assert (await y.call("users.get", {"user_id": x_id}))["name"] == "New Name"
                assert await reads_served_by_replica(strict) == served
    finally:
        await strict.stop()


async def test_every_read_succeeds_while_the_replica_is_down(stack, server, redis):
    async with await server.connect() as x_client, await server.connect() as y_client:
        x = await register(x_client, name="Host X")
        y = await register(y_client, name="Reader Y")
        x_id, y_id = x["user"]["id"], y["user"]["id"]
        await until_replica_has_replayed(server, await write_position(redis, x_id, y_id))
        # A process whose health loop will not look at the replica again for a
        # minute after start: its reads keep going to the dead replica and
        # must fall back to the primary.
        blind = await ServerProcess(stack, REPLICA_CHECK_INTERVAL_S="60").start()
        try:
            async with await blind.connect(access_token=y["access_token"]) as y_blind:
                served = await reads_served_by_replica(blind)  # the session check at the upgrade
                assert (await y_blind.call("users.get", {"user_id": x_id}))["name"] == "Host X"
                assert await reads_served_by_replica(blind) == served + 1

                await asyncio.to_thread(stack.stop_replica)
                try:
                    for _ in range(3):
                        assert (await y_blind.call("users.get", {"user_id": x_id}))["name"] == "Host X"
                        assert (await y_blind.call("users.me"))["id"] == y_id
                        assert (await y_client.call("users.get", {"user_id": x_id}))["name"] == "Host X"
                        assert (await y_client.call("users.me"))["id"] == y_id
                    (replica,) = (await status_body(blind))["replicas"]
                    assert replica["ok"] is False
                    # The process with a working health loop reports it down, and why.
                    deadline = time.monotonic() + 10
                    while not (replica := (await status_body(server))["replicas"][0])["error"]:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
                    assert replica["ok"] is False
                    assert replica["lag_bytes"] is None
                finally:
                    await asyncio.to_thread(stack.start_replica)
        finally:
            await blind.stop()
    deadline = time.monotonic() + 15
    while not (await status_body(server))["replicas"][0]["ok"]:
        assert time.monotonic() < deadline, "replica never came back"
        await asyncio.sleep(0.1)


async def test_a_kyc_change_is_read_by_the_user_on_another_process_while_the_replica_lags(
    x_and_y, replica_db, server, db
):
    """Read-your-writes holds for a change the user did not make through a
    call: the KYC webhook (on process 1) records its write position before it
    answers, so the user's reads on process 2 do not go to the lagging replica."""
    x1, x2, _, x_id = x_and_y
    assert (await x2.call("users.me"))["kyc_status"] == "pending"  # x2 is bound and reads the registration
    async with replay_paused(replica_db):
        assert (await post_kyc(server, x_id, "verified")).status == 200
        for client in (x1, x2):
            assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"
        # The replica process 2 would otherwise use still has the old status.
        assert await replica_db.fetchval("SELECT kyc_status FROM users WHERE id = $1", uuid.UUID(x_id)) == "pending"
        assert (await x2.call("users.me"))["kyc_status"] == "verified"
        assert (await x2.call("users.get", {"user_id": x_id}))["kyc_status"] == "verified"
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", uuid.UUID(x_id)) == "verified"


# ---- replays -----------------------------------------------------------------
# A retried call that finds its key used answers with the original outcome.
# The original may never have recorded its write position (its process died
# after the commit, or its record is still on the way): the replay's reply
# says the write happened, so it records the position itself. Each test
# makes the original call on process 1, deletes what it recorded, and
# replays on process 2 (which has no local hint either).


@pytest.fixture
async def funded_on_both(server, server2, redis):
    """A verified user with 100.00, on both processes; the replica (as
    process 2 sees it) has replayed everything up to the top-up."""
    c1, session = await verified_user(server)
    await c1.call("wallet.topup", {"amount": "100.00", "idempotency_key": key()})
    uid = session["user"]["id"]
    c2 = await server2.connect(access_token=session["access_token"])
    await until_replica_has_replayed(server2, await write_position(redis, uid))
    yield c1, c2, uid
    for c in (c1, c2):
        await c.close()


async def test_a_replayed_top_up_is_read_by_its_user_while_the_replica_lags(funded_on_both, replica_db, redis):
    c1, c2, uid = funded_on_both
    params = {"amount": "25.00", "idempotency_key": uuid.uuid4().hex}
    async with replay_paused(replica_db):
        first = await c1.call("wallet.topup", params)
        await redis.delete(f"ryw:{uid}")  # as if process 1 had died before recording
        again = await c2.call("wallet.topup", params)
        assert again["replayed"] and again["transaction"]["id"] == first["transaction"]["id"]
        newest = (await c2.call("wallet.transactions", {"limit": 1}))["transactions"]
        assert [t["id"] for t in newest] == [first["transaction"]["id"]]
        assert (await c2.call("users.me"))["balance"] == "125.00"


async def test_a_replayed_booking_is_read_by_its_booker_while_the_replica_lags(
        funded_on_both, server, replica_db, redis):
    c1, c2, uid = funded_on_both
    host_client, host_id = await host(server, price="40.00")
    start = slot(days=3)
    params = {"host_id": host_id, "start_at": start, "end_at": start + dt.timedelta(hours=1),
              "idempotency_key": uuid.uuid4().hex}
    async with replay_paused(replica_db):
        first = (await c1.call("bookings.create", params))["booking"]
        await redis.delete(f"ryw:{uid}")
        again = await c2.call("bookings.create", params)
        assert again["replayed"] and again["booking"]["id"] == first["id"]
        listed = (await c2.call("bookings.list", {"role": "booker"}))["bookings"]
        assert [b["id"] for b in listed] == [first["id"]]
        assert (await c2.call("users.me"))["balance"] == "60.00"
    await host_client.close()


async def test_a_repeated_cancel_is_read_by_its_user_while_the_replica_lags(
        funded_on_both, server, server2, replica_db, redis):
    c1, c2, uid = funded_on_both
    host_client, host_id = await host(server, price="40.00")
    booking = await book(c1, host_id, slot(days=4))
    await until_replica_has_replayed(server2, await write_position(redis, uid))
    async with replay_paused(replica_db):
        await c1.call("bookings.cancel", {"booking_id": booking["id"]})
        await redis.delete(f"ryw:{uid}")
        again = await c2.call("bookings.cancel", {"booking_id": booking["id"]})
        assert again["booking"]["status"] == "cancelled"
        listed = (await c2.call("bookings.list", {"role": "booker"}))["bookings"]
        assert [(b["id"], b["status"]) for b in listed] == [(booking["id"], "cancelled")]
        assert (await c2.call("users.me"))["balance"] == "100.00"
    await host_client.close()


async def test_a_committed_write_whose_position_cannot_be_read_is_answered_and_read_back(stack, server, replica_db):
    """After a commit the server reads the primary's WAL position for
    read-your-writes. If it cannot (the primary stopped answering just then;
    here a test-only method makes that look-up fail), the call is still
    answered with its result: the write is committed, and "unavailable"
    would invite a retry that writes twice. The user's reads then go to the
    primary until the record expires."""
    proc = await ServerProcess(stack, test_methods=True, LOG_LEVEL="ERROR").start()
    try:
        async with await proc.connect() as c:
            s = await register(c)
            await until_replica_has_replayed(proc, (await status_body(proc))["replicas"][0]["replay_lsn"])
            async with replay_paused(replica_db):
                await c.call("test.fail_position_lookups", {"fail": True})
                try:
                    result = await c.call("wallet.topup", {"amount": "5.00", "idempotency_key": uuid.uuid4().hex})
                finally:
                    await c.call("test.fail_position_lookups", {"fail": False})
                assert result["balance"] == "5.00"
                # The replica has not replayed the top-up: these reads went to the primary.
                assert (await c.call("users.me"))["balance"] == "5.00"
                assert [t["amount"] for t in (await c.call("wallet.transactions"))["transactions"]] == ["5.00"]
                async with await server.connect(access_token=s["access_token"]) as elsewhere:  # from Redis
                    assert (await elsewhere.call("users.me"))["balance"] == "5.00"
    finally:
        await proc.stop()
