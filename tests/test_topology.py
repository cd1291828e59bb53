"""The multi-host topology (deploy/topology/): three server hosts with two
processes each behind nginx, PgBouncer, a primary with two replicas and
Redis, each host a network namespace. Under a scripted load of bookers and
hosts chatting, topping up, booking and cancelling through nginx, a
server host is lost (every process SIGKILLed and its namespace deleted;
in the second case its link goes down first, so it vanishes without a
word). Its clients reconnect through nginx and resume (``ResumingClient``),
retrying a call answered ``unavailable`` as the contract asks:

- every acknowledged message is stored once and seen once by both parties;
- every acknowledged top-up, booking and cancel is seen as its user event
  by each party it concerns, and each client took its user's whole event
  stream;
- the ledger invariants of tests/test_ledger.py hold.

A transaction left open by a host that vanished is rolled back by
PgBouncer (deploy/pgbouncer/). Each client connects from an address of its
own and the servers keep their default per-address limits, which they
apply to the address nginx passes in X-Forwarded-For (TRUSTED_PROXIES),
never to one the client wrote.

Needs root, iproute2 and nginx: run by ``make test-topology`` only
(``HANGOUT_TOPOLOGY=1``), never by ``make test``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import random
import ssl
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest

from deploy.topology import CLIENT_ADDRESSES, Topology
from deploy.topology.datahost import PGBOUNCER_INI
from loadtests.accounts import kyc_signature
from protocol.client import Client
from protocol.codec import SUBPROTOCOL
from protocol.errors import ErrorCode, RpcError
from protocol.reconnect import ResumingClient
from protocol.resume import Backoff
from tests.conftest import PASSWORD
from tests.test_ledger import check_ledger

pytestmark = pytest.mark.skipif(
    os.environ.get("HANGOUT_TOPOLOGY") != "1" or os.geteuid() != 0,
    reason="needs root and network namespaces: make test-topology",
)

PAIRS = 20  # a booker and a host each, 40 sockets through nginx, each from its own address
LOAD_S = 25.0  # how long the scripted load runs
KILL_AT_S = 8.0  # when the server host dies, into the load
# The clients' pings: what finds a socket whose host vanished without a word.
HEARTBEAT_S = 5.0
# How long a call answered ``unavailable`` is retried, as the contract asks:
# a host that vanished mid-transaction holds its row locks until PgBouncer
# drops its connection (idle_transaction_timeout in deploy/pgbouncer/).
RETRY_FOR_S = 60.0
PROBE_ADDRESS = "10.77.0.30"  # a host of the test's own, not one of the topology's
SETTLE_S = 60.0  # how long the parties may take to see everything once the load stops
# Answers that are business outcomes of the random load, not failures.
EXPECTED_REFUSALS = {"slot_unavailable", "insufficient_funds", "invalid_state"}

_hours = itertools.count(2)


def next_slot() -> dt.datetime:
    """A whole hour no other booking of this run uses."""
    now = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    return now + dt.timedelta(hours=next(_hours))


@pytest.fixture(scope="module")
def topology():
    with Topology() as topo:
        yield topo


@dataclass
class Party:
    rc: ResumingClient
    user_id: str
    seen: list[tuple[str, Any]] = field(default_factory=list)

    def drain(self) -> None:
        while not self.rc.events.empty():
            self.seen.append(self.rc.events.get_nowait())

    def seen_of(self, name: str) -> list[Any]:
        return [data for event, data in self.seen if event == name]


@dataclass
class Pair:
    booker: Party
    host: Party
    conversation_id: str
    messages: dict[int, str] = field(default_factory=dict)  # acknowledged: seq -> content
    balances: list[str] = field(default_factory=list)  # acknowledged top-ups' balances
    booked: list[str] = field(default_factory=list)  # confirmed bookings
    cancelled: list[str] = field(default_factory=list)
    refusals: Counter = field(default_factory=Counter)
    retries: int = 0  # calls answered ``unavailable`` and made again

    async def call(self, party: Party, method: str, params: dict) -> Any:
        """``party``'s call, made again with the same params (and so the
        same idempotency key or ``client_msg_id``) while it answers
        ``unavailable``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_FOR_S
        while True:
            try:
                return await party.rc.call(method, params)
            except RpcError as exc:
                if exc.code is not ErrorCode.UNAVAILABLE or loop.time() > deadline:
                    raise
            self.retries += 1
            await asyncio.sleep(0.5)  # the app's pause before retrying: nothing to await


async def sign_up(topo, http: aiohttp.ClientSession, name: str, address: str) -> Party:
    """A verified user whose client connects from ``address``."""
    rc = await ResumingClient(topo.ws_url, backoff=Backoff(0.05, 1.0), local_address=address,
                              heartbeat=HEARTBEAT_S).start()
    try:
        session = await rc.call("auth.register", {"email": f"topo-{uuid.uuid4().hex[:16]}@example.com",
                                                  "password": PASSWORD, "name": name, "gender": "female"})
        user_id = session["user"]["id"]
        body = json.dumps({"event_id": f"topo-{uuid.uuid4().hex}", "user_id": user_id, "status": "verified"}).encode()
        async with http.post(f"{topo.http_url}/webhooks/kyc", data=body,
                             headers={"X-Signature": kyc_signature(body, topo.kyc_secret)}) as r:
            assert r.status == 200, await r.text()
        await rc.next_event("user.updated", timeout=15)
    except BaseException:
        await rc.close()
        raise
    return Party(rc, user_id)


async def make_pair(topo, http: aiohttp.ClientSession, addresses: tuple[str, str]) -> Pair:
    host = await sign_up(topo, http, "Host", addresses[0])
    await host.rc.call("users.update", {"price_per_hour": "10.00"})
    booker = await sign_up(topo, http, "Booker", addresses[1])
    await booker.rc.call("wallet.topup", {"amount": "200.00", "idempotency_key": uuid.uuid4().hex})
    start = next_slot()
    booking = (await booker.rc.call("bookings.create", {
        "host_id": host.user_id, "start_at": start, "end_at": start + dt.timedelta(hours=1),
        "idempotency_key": uuid.uuid4().hex}))["booking"]
    assert booking["status"] == "confirmed", booking
    conv = booking["conversation_id"]
    for party in (booker, host):
        await party.rc.call("chat.join", {"conversation_id": conv})
    return Pair(booker, host, conv)


async def load(pair: Pair, index: int, until: float) -> None:
    """One pair's share of the load: mostly chat, some money, until ``until``."""
    loop = asyncio.get_running_loop()
    rng = random.Random(index)
    n = 0
    while loop.time() < until:
        n += 1
        roll = rng.random()
        try:
            if roll < 0.6:
                sender = pair.booker if rng.random() < 0.5 else pair.host
                content = f"pair {index} message {n}"
                message = (await pair.call(sender, "chat.send", {
                    "conversation_id": pair.conversation_id, "content": content,
                    "client_msg_id": str(uuid.uuid4())}))["message"]
                pair.messages[message["seq"]] = content
            elif roll < 0.75:
                result = await pair.call(pair.booker, "wallet.topup", {"amount": f"{rng.randint(1, 20)}.00",
                                                                       "idempotency_key": uuid.uuid4().hex})
                pair.balances.append(result["balance"])
            elif roll < 0.92 or not pair.booked:
                start = next_slot()
                booking = (await pair.call(pair.booker, "bookings.create", {
                    "host_id": pair.host.user_id, "start_at": start, "end_at": start + dt.timedelta(hours=1),
                    "idempotency_key": uuid.uuid4().hex}))["booking"]
                if booking["status"] == "confirmed":
                    pair.booked.append(booking["id"])
            else:
                booking_id = pair.booked.pop(rng.randrange(len(pair.booked)))
                await pair.call(pair.booker, "bookings.cancel", {"booking_id": booking_id})
                pair.cancelled.append(booking_id)
        except RpcError as exc:
            if exc.code.value not in EXPECTED_REFUSALS:
                raise
            pair.refusals[exc.code.value] += 1
        # Pacing, so that 2 cores carry the whole topology: no event to await.
        await asyncio.sleep(rng.uniform(0.05, 0.25))


def missing(pair: Pair) -> list[str]:
    """What a party has not seen yet of what was acknowledged to the pair."""
    gaps = []
    for role, party in (("booker", pair.booker), ("host", pair.host)):
        party.drain()
        got = Counter((m["message"]["seq"], m["message"]["content"]) for m in party.seen_of("chat.message")
                      if m["message"]["conversation_id"] == pair.conversation_id)
        gaps += [f"{role} lacks message {seq}" for seq, content in pair.messages.items() if (seq, content) not in got]
        gaps += [f"{role} saw message {key} {n} times" for key, n in got.items() if n > 1]
        created = {e["booking"]["id"] for e in party.seen_of("booking.created")}
        gaps += [f"{role} lacks booking.created {b}" for b in pair.booked + pair.cancelled if b not in created]
        cancelled = {e["booking"]["id"] for e in party.seen_of("booking.cancelled")}
        gaps += [f"{role} lacks booking.cancelled {b}" for b in pair.cancelled if b not in cancelled]
    balances = {e["balance"] for e in pair.booker.seen_of("wallet.updated")}
    gaps += [f"booker lacks wallet.updated {b}" for b in pair.balances if b not in balances]
    return gaps


@pytest.mark.parametrize("victim, vanish", [("app2", False), ("app3", True)], ids=["killed", "vanished"])
async def test_a_server_host_lost_under_load_loses_nothing(topology, victim, vanish):
    """``killed``: its processes die and its kernel closes their connections;
    ``vanished``: its link goes down first, so nobody hears of it again and
    the clients' pings must find out. Each case loses another host."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        # A few sign-ups at a time: each is an argon2 hash on a 2-core machine.
        gate = asyncio.Semaphore(4)

        async def gated(i: int) -> Pair:
            async with gate:
                return await make_pair(topology, http, (CLIENT_ADDRESSES[2 * i], CLIENT_ADDRESSES[2 * i + 1]))

        pairs = await asyncio.wait_for(asyncio.gather(*(gated(i) for i in range(PAIRS))), 180)
    parties = [p for pair in pairs for p in (pair.booker, pair.host)]
    try:
        for party in parties:
            party.drain()
            party.seen.clear()  # the set-up's events; the load's are checked
        start = loop.time()
        loads = asyncio.gather(*(load(pair, i, start + LOAD_S) for i, pair in enumerate(pairs)))
        await asyncio.sleep(KILL_AT_S)  # into the load: a moment, not an event
        assert not loads.done(), loads.exception() if loads.done() else None
        await asyncio.to_thread(topology.kill_host, victim, vanish)
        await asyncio.wait_for(loads, LOAD_S + 120)

        db = await asyncpg.create_pool(topology.primary_url, min_size=1, max_size=2)
        try:
            last_seqs = await last_event_seqs(db, parties)
            deadline = loop.time() + SETTLE_S
            while gaps := [g for pair in pairs for g in missing(pair)] + [
                    f"{p.user_id} took user events through {p.rc.user_events and p.rc.user_events.through}, "
                    f"not {last_seqs[p.user_id]}"
                    for p in parties if p.rc.user_events is None or p.rc.user_events.through != last_seqs[p.user_id]]:
                assert loop.time() < deadline, gaps[:20]
                await asyncio.sleep(0.2)  # deliveries in flight from other processes: bounded poll
            await check_stored(db, pairs)
        finally:
            await db.close()

        reconnected = [p for p in parties if p.rc.sockets > 1]
        # About a third of the sockets were on the killed host's two processes.
        assert reconnected, "no client was on the killed host"
        assert all(p.seen_of("client.reconnected") for p in reconnected)
        assert sum(len(pair.messages) for pair in pairs) > 100
        assert sum(len(pair.booked) + len(pair.cancelled) for pair in pairs) > 10
        print(f"\n{len(reconnected)}/{len(parties)} clients reconnected; acknowledged: "
              f"{sum(len(pair.messages) for pair in pairs)} messages, {sum(len(pair.balances) for pair in pairs)} "
              f"top-ups, {sum(len(pair.booked) + len(pair.cancelled) for pair in pairs)} bookings, "
              f"{sum(len(pair.cancelled) for pair in pairs)} cancels; refused: "
              f"{dict(sum((pair.refusals for pair in pairs), Counter()))}; "
              f"retried after unavailable: {sum(pair.retries for pair in pairs)}")
    finally:
        await asyncio.gather(*(p.rc.close() for p in parties))


async def last_event_seqs(db: asyncpg.Pool, parties: list[Party]) -> dict[str, int]:
    """Each user's last event once the load has stopped: what its client
    must have taken, every seq up to it."""
    rows = await db.fetch("SELECT user_id, last_seq FROM user_event_seqs WHERE user_id = ANY($1)",
                          [uuid.UUID(p.user_id) for p in parties])
    return {str(r["user_id"]): r["last_seq"] for r in rows}


async def check_stored(db: asyncpg.Pool, pairs: list[Pair]) -> None:
    """In the database: each acknowledged message stored once; the ledger
    invariants."""
    for pair in pairs:
        rows = await db.fetch("SELECT content, count(*) AS n FROM messages WHERE conversation_id = $1 GROUP BY content",
                              uuid.UUID(pair.conversation_id))
        stored = {r["content"]: r["n"] for r in rows}
        for content in pair.messages.values():
            assert stored.get(content) == 1, (content, stored.get(content))
    users = [uuid.UUID(p.user_id) for pair in pairs for p in (pair.booker, pair.host)]
    await check_ledger(db, users)


async def connect_from(topo, address: str, forwarded_for: str | None = None) -> Client:
    """A socket through nginx from ``address``, claiming ``forwarded_for``."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    try:
        ws = await session.ws_connect(topo.ws_url, protocols=(SUBPROTOCOL,), headers=headers)
    except BaseException:
        await session.close()
        raise
    return Client(session, ws, True)


async def failed_login(client: Client) -> ErrorCode:
    try:
        await client.call("auth.login", {"email": f"nobody-{uuid.uuid4().hex[:12]}@example.com", "password": PASSWORD})
    except RpcError as exc:
        return exc.code
    raise AssertionError("a login of nobody succeeded")


async def test_the_servers_count_each_client_address_that_nginx_passes_and_no_claimed_one(topology):
    """Password checks are limited per client address (AUTH_MAX_PER_ADDRESS,
    20 a minute) across all processes. Behind nginx, with TRUSTED_PROXIES
    naming it, the address is the client's own: one client's budget running
    out leaves another's whole, and an X-Forwarded-For the client wrote
    itself buys nothing. (The load test above signs up 40 users through the
    same nginx within the minute, which the limit allows only because each
    comes from its own address.)"""
    spent, other, claimed = CLIENT_ADDRESSES[-1], CLIENT_ADDRESSES[-2], CLIENT_ADDRESSES[-3]
    client = await connect_from(topology, spent)
    try:
        codes = [await failed_login(client) for _ in range(21)]
        assert codes == [ErrorCode.INVALID_CREDENTIALS] * 20 + [ErrorCode.RATE_LIMITED], codes
    finally:
        await client.close()
    forging = await connect_from(topology, spent, forwarded_for=claimed)
    elsewhere = await connect_from(topology, other)
    try:
        assert await failed_login(forging) is ErrorCode.RATE_LIMITED
        assert await failed_login(elsewhere) is ErrorCode.INVALID_CREDENTIALS
    finally:
        await forging.close()
        await elsewhere.close()


async def test_apps_reach_the_servers_over_tls_through_nginx(topology):
    """The shipped site ends TLS for the apps (wss://, https://) with the
    certificate at its paths, here a self-signed one for nginx's address.
    A client that trusts it registers and calls on a wss:// socket and reads
    /healthz over https://; one that does not trust it gets no socket."""
    address = CLIENT_ADDRESSES[-4]
    trusted = ssl.create_default_context(cafile=str(topology.tls_certificate))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), ssl=trusted)) as http:
        async with http.get(f"{topology.https_url}/healthz") as r:
            assert r.status == 200, await r.text()
        client = Client(http, await http.ws_connect(topology.wss_url, protocols=(SUBPROTOCOL,)), False)
        try:
            assert client.ws.protocol == SUBPROTOCOL
            session = await client.call("auth.register", {"email": f"tls-{uuid.uuid4().hex[:16]}@example.com",
                                                          "password": PASSWORD, "name": "Tls", "gender": "female"})
            me = await client.call("users.me")
            assert me["id"] == session["user"]["id"]
        finally:
            await client.close()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0))) as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.ws_connect(topology.wss_url, protocols=(SUBPROTOCOL,))


# Holds an advisory lock in an open transaction through PgBouncer, as a
# server process does with row locks in the middle of a call, and then waits.
HOLDER = """
import asyncio, sys
import asyncpg

async def main():
    conn = await asyncpg.connect(sys.argv[1], statement_cache_size=0)
    await conn.execute("BEGIN")
    await conn.execute("SELECT pg_advisory_xact_lock(%d)")
    await asyncio.sleep(3600)

asyncio.run(main())
"""
LOCK_KEY = 774_201


def idle_transaction_timeout() -> float:
    """The shipped PgBouncer config's setting (the topology runs that file)."""
    for line in PGBOUNCER_INI.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "idle_transaction_timeout":
            return float(value)
    raise AssertionError(f"{PGBOUNCER_INI} sets no idle_transaction_timeout")


async def test_the_transaction_of_a_host_that_vanished_is_rolled_back_by_pgbouncer(topology):
    """A host that vanishes mid-transaction never closes its connection, so
    the transaction's locks would stay until TCP gave up on it, hours later;
    deploy/pgbouncer/ ends such a transaction after idle_transaction_timeout."""
    loop = asyncio.get_running_loop()
    topology.add_host("probe", PROBE_ADDRESS)
    topology.spawn("probe", "probe", [sys.executable, "-c", HOLDER % LOCK_KEY, topology.server_env()["DATABASE_URL"]])
    db = await asyncpg.connect(topology.primary_url)
    try:
        async def held() -> bool:
            return await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1",
                                     LOCK_KEY) > 0

        deadline = loop.time() + 30
        while not await held():  # another process takes it: bounded poll
            assert loop.time() < deadline, "the probe never took the lock"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(topology.kill_host, "probe", True)
        vanished = loop.time()
        await asyncio.sleep(2)  # long enough for a closed connection to be seen: nothing to await
        assert await held(), "the lock went at once: the host did not vanish without a word"
        deadline = vanished + idle_transaction_timeout() + 15
        while await held():  # PgBouncer's timer, in another process: bounded poll
            assert loop.time() < deadline, "the vanished host's transaction still holds its lock"
            await asyncio.sleep(0.2)
    finally:
        await db.close()
