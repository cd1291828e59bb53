"""bookings.create throughput and latency against pgbench (TPC-B), same run.

    python -m loadtests.bench_bookings [--clients 50] [--seconds 10] [--rounds 2] [--workers 1] [--url WS_URL]
                                       [--timeline CSV]

Starts the dev stack and a hangout server (``--workers`` processes) on a
database of its own, ``--database`` (``hangout_bench``), dropped and made
afresh every run, so that every run starts from the same state as pgbench's
small database does (a booking costs PostgreSQL more as the tables grow; see
the README). Or uses the server at ``--url`` (its database must be
``--database-url``, the dev server's by default). Makes fresh verified hosts
with prices and bookers with money (a sandbox top-up each, through the
ledger), then measures:

- ``pgbench`` (built-in TPC-B-like script) on its own database ``pgbench``
  on the same PostgreSQL primary (made with ``pgbench -i`` on first use),
  ``-c CLIENTS -j 2 -T SECONDS``, in turns with the hangout runs, first and
  last (the median is the yardstick: the machine is shared and noisy);
- ``bookings.create`` from ``--clients`` booker sockets, each with one call
  in flight at a time (as each pgbench client has one transaction), every
  call a new confirmed booking (distinct slots: no refusals), while every
  host is connected too and receives its ``booking.created`` events.

After each round, prints its rate, p50/p99 and CPU per booking by role
(the machine's speed drifts between rounds: every role's CPU per booking
rises and falls together). At the end, prints bookings/s (median of the
rounds), p50/p99 latency over all rounds (and pgbench's, from its
per-transaction log), the ratio of the medians, and where the machine's CPU
went: per booking for PostgreSQL (primary and replica), Redis, the server
and this load generator, and per TPC-B transaction for PostgreSQL and
pgbench. With every client keeping one call in flight, latency is clients /
throughput, so that CPU cost per booking sets the lowest p50 this machine
allows.
Then (``--paced``, 0.5 by default) one more round with the same clients
paced to half that rate, each call due at its time, for the latency of a
server that is busy but not saturated. The targets are judged on the
saturated rounds.
Targets: ratio >= 0.6, p99 < 50 ms. Exits 3 when a target is missed or a
call failed.
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
import statistics
import sys
import time
import uuid
from urllib.parse import urlsplit
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from loadtests import benchlib
from loadtests.benchlib import Server, Stack, access_tokens, bench_users, cpu_by_role, machine_busy
from protocol.codec import decode, encode

PGBENCH_DB = "pgbench"
# The cost of a booking grows with the tables (inserts into indexes of
# random UUIDs touch pages all over them): each run starts from the same
# empty database, beside pgbench's equally small one.
BENCH_DB = "hangout_bench"
HOUR = dt.timedelta(hours=1)
MAX_HOURS_AHEAD = 89 * 24  # bookings may start at most 90 days ahead


# ---- pgbench ------------------------------------------------------------------------


async def ensure_pgbench_db(database_url: str) -> None:
    await benchlib.ensure_pgbench_db(database_url, PGBENCH_DB)


def pgbench_tpcb(database_url: str, clients: int, seconds: int, latencies: list[float]) -> tuple[float, float]:
    """(tps, mean latency in ms) of the built-in TPC-B-like script; each
    transaction's latency is appended to ``latencies``."""
    return benchlib.run_pgbench(database_url, PGBENCH_DB, clients, seconds, jobs=2, latencies=latencies)


# ---- people ---------------------------------------------------------------------------


async def make_people(database_url: str, hosts: int, bookers: int) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Fresh users for this run (earlier runs' slots stay booked): verified
    hosts priced 10.00-59.00, and bookers each topped up with 100,000.00
    through the ledger (top-up, transaction and balance, as wallet.topup does)."""
    run = uuid.uuid4().hex[:8]
    host_ids = await bench_users(database_url, hosts, f"bench-book-{run}-host-")
    booker_ids = await bench_users(database_url, bookers, f"bench-book-{run}-booker-")
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "UPDATE users SET price_per_hour = 10 + abs(hashtext(id::text)) % 50 WHERE id = ANY($1::uuid[])", host_ids
            )
            await conn.execute(
                """WITH t AS (
                     INSERT INTO topups (user_id, amount, idempotency_key, request_hash)
                     SELECT u, 100000, 'bench-' || u, '\\x00' FROM unnest($1::uuid[]) AS u
                     RETURNING id, user_id, amount)
                   , ledger AS (
                     INSERT INTO transactions (user_id, amount, type, reference_id)
                     SELECT user_id, amount, 'topup', id FROM t)
                   UPDATE users SET balance = balance + t.amount FROM t WHERE users.id = t.user_id""",
                booker_ids,
            )
    finally:
        await conn.close()
    return host_ids, booker_ids


# ---- the load -----------------------------------------------------------------------------


@dataclass
class Tally:
    counting: bool = False
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # time.perf_counter() when each call was sent (or due)
    events: int = 0
    exhausted: int = 0


async def drive_booker(ws: aiohttp.ClientWebSocketResponse, client: int, hosts: list[str], start: dt.datetime,
                       tally: Tally, stop: asyncio.Event, interval: float | None = None) -> None:
    """One booker, one call in flight: book hour h of host (client + h) % H,
    for h = 0, 1, 2... Within an hour every client has its own host, so no
    booking ever overlaps another.

    As fast as replies come, or with ``interval``, one call every
    ``interval`` seconds from a random phase: its latency then counts from
    when the call was due, so a call held up behind a slow one is charged
    for the wait (no coordinated omission)."""
    clock = time.perf_counter
    due = clock() + random.uniform(0, interval) if interval else 0.0
    for h in range(MAX_HOURS_AHEAD):
        if stop.is_set():
            return
        if interval:
            if (wait := due - clock()) > 0:
                await asyncio.sleep(wait)
        begin = start + h * HOUR
        frame = encode({"id": h + 1, "method": "bookings.create", "params": {
            "host_id": hosts[(client + h) % len(hosts)], "start_at": begin, "end_at": begin + HOUR,
            "idempotency_key": uuid.uuid4().hex,
        }})
        sent = min(clock(), due) if interval else clock()
        due += interval or 0.0
        await ws.send_bytes(frame)
        while True:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                raise RuntimeError(f"socket closed: {msg}")
            reply = decode(msg.data)
            if "event" in reply:
                continue  # booking.created and wallet.updated for this booker
            break
        if tally.counting:
            tally.calls += 1
            tally.latencies_ms.append((clock() - sent) * 1000.0)
            tally.sent_at.append(sent)
            if "error" in reply:
                code = reply["error"]["code"]
                tally.errors[code] = tally.errors.get(code, 0) + 1
    tally.exhausted += 1


async def listen(ws: aiohttp.ClientWebSocketResponse, tally: Tally) -> None:
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY and tally.counting:
            tally.events += 1


@dataclass
class Run:
    tally: Tally
    rate: float  # bookings per second
    machine: float  # share of the whole machine's CPU that was busy
    cpu_ms: dict[str, float]  # CPU milliseconds per booking, by role (benchlib.cpu_by_role)


async def run_bookings(url: str, server_pid: int | None, redis_port: int | None, booker_tokens: list[str],
                       host_tokens: list[str], hosts: list[str], seconds: float, warmup: float = 2.0,
                       rate: float | None = None) -> Run:
    """The bookers as fast as they can, or at ``rate`` bookings/s in all."""
    tally, stop = Tally(), asyncio.Event()
    start = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def connect(token: str) -> aiohttp.ClientWebSocketResponse:
            return await session.ws_connect(url, protocols=("hangout.v1",), headers={"Authorization": f"Bearer {token}"},
                                            max_msg_size=0)

        host_sockets = await asyncio.gather(*(connect(t) for t in host_tokens))
        booker_sockets = await asyncio.gather(*(connect(t) for t in booker_tokens))
        listeners = [asyncio.create_task(listen(ws, tally)) for ws in host_sockets]
        drivers = [asyncio.create_task(drive_booker(ws, i, hosts, start, tally, stop,
                                                    len(booker_tokens) / rate if rate else None))
                   for i, ws in enumerate(booker_sockets)]
        await asyncio.sleep(warmup)
        cpu0 = cpu_by_role(server_pid, redis_port)
        busy0, total0 = machine_busy()
        t0 = time.perf_counter()
        tally.counting = True
        await asyncio.sleep(seconds)
        tally.counting = False
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_by_role(server_pid, redis_port)
        busy1, total1 = machine_busy()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*drivers), 60)
        for ws in booker_sockets + host_sockets:
            await ws.close()
        await asyncio.gather(*listeners, return_exceptions=True)
    machine = (busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan")
    per_booking = {role: (cpu1[role] - cpu0[role]) * 1000.0 / max(tally.calls, 1) for role in cpu0}
    return Run(tally, tally.calls / elapsed, machine, per_booking)


def _children_cpu() -> float:
    """CPU seconds of this process's ended children (pgbench, once it exits)."""
    t = os.times()
    return t.children_user + t.children_system


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def percentiles(values: list[float], qs: tuple[float, ...]) -> str:
    """``p50 12.3  p99 45.6`` (ms) for each of ``qs``."""
    return "  ".join(f"p{q * 100:g} {pct(values, q):.1f}" for q in qs)


def cpu_line(cpu_ms: dict[str, float]) -> str:
    """CPU milliseconds per booking, by role."""
    return ", ".join(f"{role} {ms:.2f} ms" for role, ms in cpu_ms.items())


async def amain(args: argparse.Namespace) -> int:
    if args.database_url:
        stack = Stack(args.database_url, [], "")
    elif args.url:
        stack = await asyncio.to_thread(Stack.dev)  # where the dev server is
    else:
        stack = await asyncio.to_thread(Stack.dev, args.database)
    await ensure_pgbench_db(stack.database_url)
    server = None
    if args.url:
        url, pid = args.url, None
    else:
        server = await asyncio.to_thread(Server(stack, env={"WORKERS": str(args.workers)}).start)
        url, pid = server.ws_url, server.pid
    pg_runs: list[float] = []
    pg_latencies: list[float] = []
    pg_each: list[float] = []  # every TPC-B transaction's latency, ms
    pg_cpu: list[tuple[float, float]] = []  # CPU ms per transaction: (postgres, pgbench)
    runs: list[Run] = []
    redis_port = urlsplit(stack.redis_url).port if stack.redis_url else None
    try:
        # pgbench and the hangout run in turns, pgbench first and last: the
        # machine is shared, and its load drifts within a minute.
        for round_no in range(args.rounds + 1):
            print(f"pgbench (TPC-B), -c {args.clients} -j 2 -T {args.seconds} ...", flush=True)
            # pgbench's backends end with it, so PostgreSQL's share is the
            # machine's busy time less pgbench's own (an idle server's is noise).
            busy0, client0 = machine_busy()[0], _children_cpu()
            tps, latency = await asyncio.to_thread(pgbench_tpcb, stack.database_url, args.clients, args.seconds,
                                                   pg_each)
            txns = max(tps * args.seconds, 1.0)
            client = _children_cpu() - client0
            pg_cpu.append(((machine_busy()[0] - busy0 - client) * 1000 / txns, client * 1000 / txns))
            pg_runs.append(tps)
            pg_latencies.append(latency)
            print(f"  {tps:,.0f} tps, mean latency {latency:.1f} ms", flush=True)
            if round_no == args.rounds:
                break
            host_ids, booker_ids = await make_people(stack.database_url, args.hosts, args.clients)
            host_tokens = await access_tokens(stack.database_url, host_ids)
            booker_tokens = await access_tokens(stack.database_url, booker_ids)
            print(f"bookings.create, {args.clients} bookers one call each in flight, {len(host_ids)} hosts "
                  f"listening, {args.seconds}s ...", flush=True)
            runs.append(await run_bookings(url, pid, redis_port, booker_tokens, host_tokens,
                                           [str(h) for h in host_ids], args.seconds))
            last = runs[-1]
            print(f"  {last.rate:,.0f} bookings/s, {percentiles(last.tally.latencies_ms, (0.5, 0.99))} ms; "
                  f"machine CPU {last.machine:.0%}; per booking: {cpu_line(last.cpu_ms)}", flush=True)
        if args.paced:
            paced_rate = args.paced * statistics.median(r.rate for r in runs)
            host_ids, booker_ids = await make_people(stack.database_url, args.hosts, args.clients)
            print(f"bookings.create paced: {args.clients} bookers, {paced_rate:,.0f} bookings/s in all "
                  f"({args.paced:g} of the rate above), {args.seconds}s ...", flush=True)
            paced = await run_bookings(url, pid, redis_port, await access_tokens(stack.database_url, booker_ids),
                                       await access_tokens(stack.database_url, host_ids),
                                       [str(h) for h in host_ids], args.seconds, rate=paced_rate)
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
    counted = runs + ([paced] if args.paced else [])
    if args.timeline:
        with open(args.timeline, "w") as out:
            out.write("round,sent,latency_ms\n")  # sent: time.perf_counter(), the machine's monotonic clock
            for round_no, r in enumerate(counted, 1):
                for sent, ms in zip(r.tally.sent_at, r.tally.latencies_ms):
                    out.write(f"{round_no},{sent:.6f},{ms:.3f}\n")
    pg = statistics.median(pg_runs)
    rate = statistics.median(r.rate for r in runs)
    latencies = [ms for r in runs for ms in r.tally.latencies_ms]
    errors: dict[str, int] = {}
    for r in counted:
        for code, n in r.tally.errors.items():
            errors[code] = errors.get(code, 0) + n
    ratio = rate / pg
    p50, p99 = pct(latencies, 0.5), pct(latencies, 0.99)
    print(f"\npgbench TPC-B (-c {args.clients} -j 2): " + " / ".join(f"{x:,.0f}" for x in pg_runs)
          + f" tps, median {pg:,.0f}; mean latency {statistics.median(pg_latencies):.1f} ms, "
          + f"p50 {pct(pg_each, 0.5):.1f} ms, p99 {pct(pg_each, 0.99):.1f} ms")
    print(f"CPU per TPC-B transaction: postgres {statistics.mean(c[0] for c in pg_cpu):.2f} ms, "
          f"pgbench {statistics.mean(c[1] for c in pg_cpu):.2f} ms (machine busy time less pgbench's)")
    print("bookings.create: " + " / ".join(f"{r.rate:,.0f}" for r in runs) + f" per s, median {rate:,.0f}")
    print(f"bookings.create p50 {p50:.1f} ms  p99 {p99:.1f} ms  machine CPU "
          f"{statistics.mean(r.machine for r in runs):4.0%}  host events "
          f"{sum(r.tally.events for r in runs) / (args.seconds * len(runs)):,.0f}/s")
    print("bookings.create latency ms: " + percentiles(latencies, (0.1, 0.5, 0.9, 0.95, 0.99, 0.999))
          + f"  max {max(latencies, default=float('nan')):.1f}")
    # Where the machine's CPU goes: with every client keeping one call in
    # flight, latency is clients / throughput, and throughput is capped by
    # the CPU that one booking costs all the processes on this machine.
    cpu = {role: statistics.mean(r.cpu_ms[role] for r in runs) for role in runs[0].cpu_ms}
    total = sum(cpu.values())
    cores = os.cpu_count() or 1
    print(f"CPU per booking: {cpu_line(cpu)}"
          + f"; {total:.2f} ms in all: {cores} cores at most {cores * 1000 / total:,.0f} bookings/s, "
          f"so p50 >= {args.clients * total / cores:.1f} ms at {args.clients} clients")
    if args.paced:
        print(f"bookings.create paced at {paced.rate:,.0f}/s ({args.paced:g} of {rate:,.0f}), {args.clients} clients: "
              + percentiles(paced.tally.latencies_ms, (0.5, 0.9, 0.99))
              + f"  max {max(paced.tally.latencies_ms, default=float('nan')):.1f} ms (from when each call was due)")
    print(f"ratio {ratio:.2f} (target >= 0.60), p99 {p99:.1f} ms (target < 50)")
    if errors:
        print(f"errors: {errors}")
    if any(r.tally.exhausted for r in runs):
        print("some bookers ran out of future hours: shorten --seconds")
    return 0 if ratio >= 0.6 and p99 < 50 and not errors else 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_bookings", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50, help="bookers with a call in flight = pgbench clients")
    ap.add_argument("--paced", type=float, default=0.5,
                    help="then one round at this fraction of the measured rate, for latency below saturation "
                         "(0: none)")
    ap.add_argument("--hosts", type=int, default=100, help="hosts booked (at least --clients)")
    ap.add_argument("--seconds", type=int, default=10, help="length of each measurement")
    ap.add_argument("--rounds", type=int, default=2, help="hangout runs, each between two pgbench runs")
    ap.add_argument("--workers", type=int, default=1, help="server processes (WORKERS)")
    ap.add_argument("--url", help="use this running server (ws://.../ws) instead of starting one")
    ap.add_argument("--database-url", help="the server's primary [the dev stack]")
    ap.add_argument("--timeline", metavar="CSV",
                    help="write every counted call here: round, when it was sent, its latency")
    ap.add_argument("--database", default=BENCH_DB,
                    help="database on the dev stack, made afresh for the run [%(default)s]")
    args = ap.parse_args(argv)
    if args.paced < 0:
        ap.error("--paced must be 0 (no paced round) or a fraction above it")
    if args.hosts < args.clients:
        ap.error("--hosts must be at least --clients")
    return benchlib.run(amain(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
