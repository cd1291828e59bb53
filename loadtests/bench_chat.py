"""chat.send across two server processes against ``pgbench`` (TPC-B-like), same run.

    python -m loadtests.bench_chat [--concurrency 16] [--conversations 100] [--seconds 10] [--rounds 3]

Starts the dev stack and two hangout server processes (WORKERS=1 each).
``--conversations`` two-party conversations (confirmed bookings between bench
users, made in SQL once and reused): the booker's socket is on one process,
the host's on the other, and both have joined the room, so every message
crosses Redis and is delivered to both sockets (the sender's included).

Measures, from this process:
- max rate, ``--rounds`` times: ``--concurrency`` senders in a closed loop
  (one chat.send in flight each, on random conversations and sides):
  messages committed per second (replies), delivered per second
  (``chat.message`` at the other party's socket), and send-to-receive
  latency at the other party;
- ``pgbench`` (built-in TPC-B-like script) with ``--concurrency`` clients on
  its own database ``pgbench_chat`` on the dev stack primary (``pgbench -i``
  on first use), before the first round and after each: a round's
  yardstick is the mean of the runs on either side of it;
- half rate: messages sent open-loop at half the median max committed
  rate, and their send-to-receive p50/p99 (target p99 < 50 ms).

Prints the figures, each round's ratio of the committed and delivered rates
to pgbench tps, and the median ratio (target >= 1.0): this machine's speed
drifts within minutes, and pgbench's own rate with it. Exit status 3 when a
target is missed.
Its clients all come from 127.0.0.1: the server starts with the per-address
and total socket limits, the sign-up and login limit per address and
AUTH_DEADLINE_S raised (loadtests/benchlib.py ``LOCAL_LIMITS``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import msgpack

from loadtests import benchlib
from loadtests.bench_connections import IdleSocket, _handshake, _mask
from loadtests.benchlib import OPS_TOKEN, Server, Stack, access_tokens, bench_users, cpu_by_role, cpu_seconds
from protocol.codec import encode

PGBENCH_DB = "pgbench_chat"


# ---- pgbench (TPC-B-like) ----------------------------------------------------------


async def ensure_pgbench_db(stack: Stack) -> None:
    await benchlib.ensure_pgbench_db(stack.database_url, PGBENCH_DB)


def pgbench_tpcb(stack: Stack, clients: int, seconds: int) -> tuple[float, float]:
    """(tps, PostgreSQL CPU ms a transaction) of pgbench's TPC-B-like run,
    its tables vacuumed first (as by default). pgbench's backends end with
    it, so PostgreSQL's share is the whole machine's CPU over the run less
    pgbench's own (the idle server processes' little counts too)."""
    busy0, child0 = benchlib.machine_busy()[0], _children_cpu()
    tps = benchlib.run_pgbench(stack.database_url, PGBENCH_DB, clients, seconds)[0]
    used = benchlib.machine_busy()[0] - busy0 - (_children_cpu() - child0)
    # Over the transactions of its measured seconds; the vacuum and the
    # connecting before them count too (a little high).
    return tps, 1000 * used / (tps * seconds) if tps else float("nan")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu(stack: Stack) -> float:
    """CPU seconds so far of this stack's PostgreSQL (primary and replica)."""
    from urllib.parse import urlparse

    ports = [urlparse(u).port for u in (stack.database_url, *stack.replica_urls)]
    return cpu_by_role(None, None, [p for p in ports if p])["postgres"]


# ---- conversations -------------------------------------------------------------------


async def bench_conversations(database_url: str, pairs: list[tuple[uuid.UUID, uuid.UUID]]) -> list[uuid.UUID]:
    """A conversation of a confirmed booking for each (booker, host) pair;
    made once in SQL and reused by later runs."""
    conn = await asyncpg.connect(database_url)
    try:
        ids = []
        base = dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc)  # far from any real booking
        for i, (booker, host) in enumerate(pairs):
            cid = await conn.fetchval("SELECT id FROM conversations WHERE user_id = $1 AND host_id = $2", booker, host)
            if cid is None:
                async with conn.transaction():
                    start = base + dt.timedelta(hours=i)
                    booking = await conn.fetchval(
                        """INSERT INTO bookings (user_id, host_id, start_at, end_at, idempotency_key, status, amount)
                           VALUES ($1, $2, $3, $4, $5, 'confirmed', 10.00) RETURNING id""",
                        booker, host, start, start + dt.timedelta(hours=1), f"bench-chat-{uuid.uuid4()}",
                    )
                    cid = await conn.fetchval(
                        "INSERT INTO conversations (booking_id, user_id, host_id) VALUES ($1, $2, $3) RETURNING id",
                        booking, booker, host,
                    )
            ids.append(cid)
        return ids
    finally:
        await conn.close()


async def merged_writes(session: aiohttp.ClientSession, server: Server) -> tuple[int, int]:
    """(batches, calls in them) of the server's merged writes so far."""
    async with session.get(f"{server.metrics}/status", headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as r:
        stats = (await r.json())["processes"][0]["primary"]["merged_writes"]
    return stats["batches"], stats["calls"]


# ---- sockets ---------------------------------------------------------------------------


@dataclass
class Tally:
    committed: int = 0
    delivered: int = 0  # at the other party's socket
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # send -> other party received
    counting: bool = False


class Sock(IdleSocket):
    """One authenticated socket: calls matched by id, chat.message events
    timed against the send time carried in their content.

    A raw asyncio protocol (bench_connections.IdleSocket), frames handled in
    the callback that reads them and decoded without protocol.codec's
    timestamp conversion: the load generator shares the two cores with what
    it measures, so the less CPU it takes a send, the less it weighs on the
    figures (pgbench's C client takes almost none)."""

    def __init__(self, request: bytes, tally: Tally, user: str) -> None:
        super().__init__(request)
        self.tally = tally
        self.user = user
        self._ids = 0
        self._pending: dict[int, asyncio.Future] = {}

    def call(self, method: str, params: dict) -> "asyncio.Future[dict]":
        self._ids += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = fut
        self.transport.write(_mask(encode({"id": self._ids, "method": method, "params": params}), 0x2))  # type: ignore[union-attr]
        return fut

    def on_frame(self, payload: bytes) -> None:
        frame = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if "event" in frame:
            tally = self.tally
            if frame["event"] == "chat.message" and tally.counting:
                message = frame["data"]["message"]
                if message["sender_id"] != self.user:
                    tally.delivered += 1
                    sent = float(message["content"].split(" ", 1)[0])
                    tally.latencies_ms.append((time.perf_counter() - sent) * 1000.0)
            return
        fut = self._pending.pop(frame["id"], None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"socket lost: {exc!r}"))
        self._pending.clear()


async def open_sock(server: Server, token: str, tally: Tally, user: str) -> Sock:
    _t, sock = await asyncio.get_running_loop().create_connection(
        lambda: Sock(_handshake(server.port, token), tally, user), "127.0.0.1", server.port)
    await asyncio.wait_for(sock.upgraded, 30)
    return sock


async def send(sock: Sock, conversation: str, tally: Tally) -> None:
    reply = await sock.call("chat.send", {"conversation_id": conversation, "content": f"{time.perf_counter():.6f} bench"})
    if tally.counting:
        if "error" in reply:
            code = reply["error"]["code"]
            tally.errors[code] = tally.errors.get(code, 0) + 1
        else:
            tally.committed += 1


async def closed_loop(sides: list[tuple[Sock, str]], tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        sock, conversation = random.choice(sides)
        await send(sock, conversation, tally)


async def open_loop(sides: list[tuple[Sock, str]], tally: Tally, rate: float, seconds: float) -> None:
    """Send at ``rate`` per second whatever the replies do (at most 32 in
    flight per socket, the server's limit, is far above what this needs)."""
    loop = asyncio.get_running_loop()
    start, n, tasks = loop.time(), 0, set()
    while (now := loop.time()) - start < seconds:
        due = int((now - start) * rate) + 1
        while n < due:
            sock, conversation = random.choice(sides)
            t = asyncio.create_task(send(sock, conversation, tally))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            n += 1
        await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
    await asyncio.gather(*tasks)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def drain(tally: Tally, expected: int, timeout: float = 10.0) -> None:
    """Wait until the messages committed in the window have been delivered."""
    deadline = time.monotonic() + timeout
    while tally.delivered < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@dataclass
class MaxRate:
    committed: float  # a second
    delivered: float
    latencies_ms: list[float]
    server_cpu: list[float]  # share of a core, each process
    own_cpu: float  # the load generator's
    pg_ms_send: float
    batches: int
    batched: int
    errors: dict[str, int]


async def max_rate(args: argparse.Namespace, stack: Stack, servers: list[Server], session: aiohttp.ClientSession,
                   sides: list[tuple[Sock, str]], tally: Tally, profile: str | None) -> MaxRate:
    """Closed loop, --concurrency sends in flight: warm-up, then measured."""
    tally.committed = tally.delivered = 0
    tally.latencies_ms, tally.errors = [], {}
    stop = asyncio.Event()
    loops = [asyncio.create_task(closed_loop(sides, tally, stop)) for _ in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    profiler = None
    if profile:  # py-spy (pip install py-spy) on the first process, without pausing it
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        profiler = subprocess.Popen([py_spy, "record", "--nonblocking", "-r", "250", "-d", str(args.seconds),
                                     "-f", "raw", "-o", profile, "--pid", str(servers[0].pid)],
                                    stdout=subprocess.DEVNULL)
    merged0 = [await merged_writes(session, s) for s in servers]
    cpu0 = [cpu_seconds(s.pid) for s in servers]
    pg_cpu0 = postgres_cpu(stack)
    own0 = time.process_time()
    t0 = time.perf_counter()
    tally.counting = True
    await asyncio.sleep(args.seconds)
    elapsed = time.perf_counter() - t0
    committed, delivered, latencies = tally.committed, tally.delivered, list(tally.latencies_ms)
    tally.counting = False
    cpu = [(cpu_seconds(s.pid) - c) / elapsed for s, c in zip(servers, cpu0)]
    own = (time.process_time() - own0) / elapsed
    pg_ms_send = 1000 * (postgres_cpu(stack) - pg_cpu0) / max(committed, 1)
    merged = [await merged_writes(session, s) for s in servers]
    stop.set()
    await asyncio.gather(*loops)
    if profiler is not None:
        await asyncio.to_thread(profiler.wait)
        print(f"  profile of the first process: {profile}", flush=True)
    r = MaxRate(committed / elapsed, delivered / elapsed, latencies, cpu, own, pg_ms_send,
                sum(b[0] for b in merged) - sum(b[0] for b in merged0),
                sum(b[1] for b in merged) - sum(b[1] for b in merged0), dict(tally.errors))
    print(f"max rate, {args.concurrency} in flight: {r.committed:,.0f} committed/s, "
          f"{r.delivered:,.0f} delivered/s, p50 {pct(latencies, 0.5):.1f} ms p99 {pct(latencies, 0.99):.1f} ms, "
          f"server CPU {cpu[0]:.0%} + {cpu[1]:.0%}, load generator {own:.0%}", flush=True)
    print(f"  CPU a send: servers {1000 * sum(cpu) / max(r.committed, 1):.2f} ms, "
          f"PostgreSQL {pg_ms_send:.2f} ms", flush=True)
    print(f"  merged: {r.batched:,} sends in {r.batches:,} batches of two or more "
          f"({r.batched / max(r.batches, 1):.1f} a batch), {committed - r.batched:,} alone", flush=True)
    return r


async def amain(args: argparse.Namespace) -> int:
    stack = await asyncio.to_thread(Stack.dev)
    await ensure_pgbench_db(stack)
    users = await bench_users(stack.database_url, 2 * args.conversations, "bench-chat-")
    pairs = list(zip(users[0::2], users[1::2]))
    conversations = [str(c) for c in await bench_conversations(stack.database_url, pairs)]
    tokens = await access_tokens(stack.database_url, users)
    token_of = dict(zip(users, tokens))
    servers = [Server(stack), Server(stack)]
    for s in servers:
        await asyncio.to_thread(s.start)
    tally = Tally()
    socks: list[Sock] = []
    pgbench: list[tuple[float, float]] = []  # (tps, PostgreSQL ms a transaction), before and after each round
    rounds: list[MaxRate] = []

    async def run_pgbench() -> None:
        if args.skip_pgbench:
            return
        print(f"pgbench (TPC-B-like), {args.concurrency} clients, {args.seconds}s ...", flush=True)
        tps, ms = await asyncio.to_thread(pgbench_tpcb, stack, args.concurrency, args.seconds)
        pgbench.append((tps, ms))
        print(f"  {tps:,.0f} tps, PostgreSQL {ms:.2f} ms CPU a transaction", flush=True)

    try:
        await run_pgbench()
        async with aiohttp.ClientSession() as session:  # the /status requests
            sides: list[tuple[Sock, str]] = []
            for (booker, host), conversation in zip(pairs, conversations):
                for user, server in ((booker, servers[0]), (host, servers[1])):
                    sock = await open_sock(server, token_of[user], tally, str(user))
                    socks.append(sock)
                    reply = await sock.call("chat.join", {"conversation_id": conversation})
                    assert "result" in reply, reply
                    sides.append((sock, conversation))
            print(f"{len(conversations)} conversations, {len(socks)} sockets joined over 2 processes", flush=True)

            # Rounds in turns with pgbench (the sockets stay open and idle
            # during its runs): each round's ratio is to the mean of the
            # pgbench runs on either side of it, so the machine's drift
            # weighs on both sides of a ratio alike.
            for i in range(args.rounds):
                rounds.append(await max_rate(args, stack, servers, session, sides, tally,
                                             args.profile if i == 0 else None))
                await run_pgbench()

            # Half the (median) max rate, open loop: the delivery latency target.
            half = statistics.median(r.committed for r in rounds) / 2
            await asyncio.sleep(0.5)
            tally.committed = tally.delivered = 0
            tally.latencies_ms, tally.errors = [], {}
            tally.counting = True
            await open_loop(sides, tally, half, args.seconds)
            await drain(tally, tally.committed)
            tally.counting = False
            half_latencies = list(tally.latencies_ms)
            half_missing = tally.committed - tally.delivered
            errors: dict[str, int] = {}
            for r in rounds:
                for k, v in r.errors.items():
                    errors[k] = errors.get(k, 0) + v
            errors.update({f"half:{k}": v for k, v in tally.errors.items()})
            print(f"half rate {half:,.0f}/s: {tally.committed:,} committed, {tally.delivered:,} delivered, "
                  f"p50 {pct(half_latencies, 0.5):.1f} ms p99 {pct(half_latencies, 0.99):.1f} ms", flush=True)
            for sock in socks:
                sock.close()
    finally:
        for s in servers:
            await asyncio.to_thread(s.stop)

    p99_half = pct(half_latencies, 0.99)
    print(f"\nmachine load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    ratios: list[tuple[float, float]] = []  # committed, delivered
    for i, r in enumerate(rounds):
        line = f"round {i + 1}: chat.send {r.committed:8,.0f} committed/s {r.delivered:8,.0f} delivered/s"
        if pgbench:
            pg = statistics.mean([pgbench[i][0], pgbench[i + 1][0]])
            ratios.append((r.committed / pg, r.delivered / pg))
            line += (f"   pgbench {pgbench[i][0]:,.0f} / {pgbench[i + 1][0]:,.0f} tps"
                     f"   ratio {ratios[-1][0]:.2f} / {ratios[-1][1]:.2f}")
        print(line)
    if ratios:
        committed_ratio = statistics.median(c for c, _ in ratios)
        delivered_ratio = statistics.median(d for _, d in ratios)
        print(f"chat.send committed: ratio {committed_ratio:.2f} (median of {len(ratios)}; target >= 1.0)")
        print(f"chat.send delivered: ratio {delivered_ratio:.2f} (median of {len(ratios)}; target >= 1.0)")
        print(f"PostgreSQL CPU: {statistics.median(r.pg_ms_send for r in rounds):.2f} ms a send, "
              f"{statistics.median(ms for _, ms in pgbench):.2f} ms a pgbench transaction (medians)")
    latencies = [x for r in rounds for x in r.latencies_ms]
    print(f"send-to-receive at max rate     p50 {pct(latencies, 0.5):6.1f} ms  p99 {pct(latencies, 0.99):6.1f} ms")
    print(f"send-to-receive at half ({half:,.0f}/s) p50 {pct(half_latencies, 0.5):6.1f} ms  p99 {p99_half:6.1f} ms  (target p99 < 50)")
    if errors:
        print(f"errors: {errors}")
    if half_missing:
        print(f"not delivered within 10 s at half rate: {half_missing}")
    ok = not errors and not half_missing and p99_half < 50
    if ratios:
        ok = ok and committed_ratio >= 1.0 and delivered_ratio >= 1.0
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16, help="sends in flight = pgbench clients")
    ap.add_argument("--conversations", type=int, default=100, help="two-party conversations")
    ap.add_argument("--seconds", type=int, default=10, help="length of each measurement")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    ap.add_argument("--rounds", type=int, default=3, help="max-rate rounds, each between two pgbench runs")
    ap.add_argument("--skip-pgbench", action="store_true", help="only the chat load")
    ap.add_argument("--profile", metavar="FILE", help="py-spy collapsed stacks of the first process in the first round")
    args = ap.parse_args(argv)
    return benchlib.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
