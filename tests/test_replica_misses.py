"""Ids that do not exist are answered by the replica: anyone can ask for
them, and each must not cost the primary a query. A replica that may be
behind still sends the read to the primary, so a user created a moment ago
is found (tests/test_replicas.py has that case with replay paused)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

from protocol.errors import RpcError
from tests.conftest import (ServerProcess, ops_status, register, replay_paused, replica_caught_up,
                            until_replica_has_replayed)

MISSES = 1000
AT_ONCE = 25  # under MAX_IN_FLIGHT
# Reads the primary answers while the misses run: the process's own periodic
# work (the session check) and the few misses that find the replica behind
# what some process has written meanwhile. Were the misses asked of the
# primary, the replica would serve few of them and the primary hundreds.
PRIMARY_BUDGET = 50


async def reads(server: ServerProcess) -> tuple[int, int]:
    """(reads the primary answered, reads the replica served) by ``server``,
    from its /status. Counted by the process itself: the primary's own table
    statistics also count every other process of the session (settlement
    reads users on every pass)."""
    body = await ops_status(server)
    (replica,) = body["replicas"]
    return body["primary"]["reads"], replica["reads_served"]


async def assert_misses_on_replica(server: ServerProcess, db, replica_db, client, method: str, params) -> None:
    # The misses start with the replica current, and the process knowing it
    # (its health loop polls the replay position): the caller's own
    # registration is then no reason to ask the primary.
    await until_replica_has_replayed(server, await replica_caught_up(db, replica_db))
    primary_before, replica_before = await reads(server)
    await misses(client, method, params)
    primary_after, replica_after = await reads(server)
    on_primary, on_replica = primary_after - primary_before, replica_after - replica_before
    assert on_primary < PRIMARY_BUDGET, (on_primary, on_replica)
    assert on_replica > 3 * on_primary, (on_primary, on_replica)
    print(f"{method}: {on_primary} reads on the primary, {on_replica} on the replica")


async def misses(client, method: str, params, count: int = MISSES) -> None:
    async def one() -> None:
        try:
            await client.call(method, params(uuid.uuid4()))
        except RpcError as err:
            assert err.code.value == "not_found"
        else:
            raise AssertionError("a random id was found")

    for _ in range(count // AT_ONCE):
        await asyncio.gather(*(one() for _ in range(AT_ONCE)))


async def test_a_thousand_unknown_users_cost_the_primary_a_handful_of_transactions(server, db, replica_db):
    async with await server.connect() as c:
        await register(c)
        # A few misses first: a replica connection that an earlier test's
        # replica restart left broken fails once, and sends reads to the
        # primary until the next health check.
        await misses(c, "users.get", lambda u: {"user_id": u}, count=4 * AT_ONCE)
        await assert_misses_on_replica(server, db, replica_db, c, "users.get", lambda u: {"user_id": u})


async def test_a_thousand_unknown_hosts_cost_the_primary_a_handful_of_transactions(server, db, replica_db):
    now = dt.datetime.now(dt.timezone.utc)
    async with await server.connect() as c:
        await register(c)
        busy = lambda u: {"host_id": u, "from": now, "to": now + dt.timedelta(days=1)}  # noqa: E731
        await misses(c, "hosts.availability", busy, count=4 * AT_ONCE)  # as in the test above
        await assert_misses_on_replica(server, db, replica_db, c, "hosts.availability", busy)


async def test_while_the_replica_lags_an_unknown_id_is_asked_of_the_primary(server, db, replica_db):
    """The replica may lack a user that exists: the primary answers."""
    async with await server.connect() as c:
        await register(c)
        async with replay_paused(replica_db):
            async with await server.connect() as z:
                z_id = (await register(z, name="Made While Paused"))["user"]["id"]
            assert (await c.call("users.get", {"user_id": z_id}))["name"] == "Made While Paused"
            try:
                await c.call("users.get", {"user_id": str(uuid.uuid4())})
            except RpcError as err:
                assert err.code.value == "not_found"
