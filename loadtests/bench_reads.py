"""Read throughput of one server process against ``pgbench -S``, same run.

    python -m loadtests.bench_reads [--concurrency 16] [--sockets 4] [--seconds 10]

Starts the dev stack and one hangout server process (WORKERS=1). Measures:
- ``pgbench -S`` (select-only) on its own database ``pgbench_reads`` on the
  dev stack primary (made with ``pgbench -i`` on first use), with
  ``--concurrency`` clients, in turns with the hangout runs, ``--rounds``
  times (the mean is the yardstick: the machine is shared and noisy);
- ``users.get`` (another user's public profile) and ``hosts.search``
  (default filters, 20 hosts a page) calls per second (``--methods`` can
  add ``users.me``, whose routing looks up the caller's write position), ``--concurrency``
  calls in flight at all times, pipelined over ``--sockets`` authenticated
  sockets, from this process.

Prints calls/s, p50/p99 latency, CPU use (the server process, this load
generator, the whole 2-core machine), and each ratio to pgbench -S. Target: users.get >= 0.2 x pgbench -S.

To compare two checkouts in one run on a noisy machine:
``--baseline DIR`` runs a second server from another checkout (e.g.
``git archive HEAD | tar -x -C DIR``) and measures the two in turns,
``--rounds`` times each; ``--profile DIR`` records py-spy flame graphs.
Its clients all come from 127.0.0.1: the server starts with the per-address
and total socket limits, the sign-up and login limit per address and
AUTH_DEADLINE_S raised (loadtests/benchlib.py ``LOCAL_LIMITS``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from loadtests import benchlib
from loadtests.benchlib import ROOT, Server, Stack, access_tokens, bench_users, cpu_seconds, machine_busy
from protocol.codec import decode, encode

PGBENCH_DB = "pgbench_reads"


# ---- pgbench -S ------------------------------------------------------------------


async def ensure_pgbench_db(stack: Stack) -> None:
    await benchlib.ensure_pgbench_db(stack.database_url, PGBENCH_DB)


def pgbench_select_only(stack: Stack, clients: int, seconds: int) -> float:
    return benchlib.run_pgbench(stack.database_url, PGBENCH_DB, clients, seconds, "-S", "-n")[0]


# ---- the hangout load ---------------------------------------------------------------


@dataclass
class Tally:
    replies: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    counting: bool = False
    client_cpu: float = 0.0  # share of a core this load generator used
    machine_cpu: float = 0.0  # share of the whole machine in use (all processes)


async def drive_socket(ws: aiohttp.ClientWebSocketResponse, frames: list[list[bytes]], tally: Tally,
                       stop: asyncio.Event) -> None:
    """Keep len(frames) calls in flight on one socket: when the reply to slot
    ``i`` (request id i+1) arrives, send the next pre-encoded request of slot i."""
    depth = len(frames)
    sent_at = [0.0] * depth
    cursor = [0] * depth
    clock = time.perf_counter
    for i in range(depth):
        sent_at[i] = clock()
        await ws.send_bytes(frames[i][0])
    outstanding = depth
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.BINARY:
            break
        reply = decode(msg.data)
        slot = reply["id"] - 1
        now = clock()
        if tally.counting:
            tally.replies += 1
            if "error" in reply:
                code = reply["error"]["code"]
                tally.errors[code] = tally.errors.get(code, 0) + 1
            if tally.replies % 16 == 0:  # a sample is enough for percentiles
                tally.latencies_ms.append((now - sent_at[slot]) * 1000.0)
        if stop.is_set():
            outstanding -= 1
            if outstanding == 0:
                return
            continue
        c = cursor[slot] = (cursor[slot] + 1) % len(frames[slot])
        sent_at[slot] = now
        await ws.send_bytes(frames[slot][c])


def start_profiler(pid: int, seconds: float, out: str) -> subprocess.Popen:
    """py-spy (``pip install py-spy``) sampling the server without pausing it."""
    fmt = "raw" if out.endswith(".txt") else "flamegraph"
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen([py_spy, "record", "--nonblocking", "-r", "250", "-d", str(int(seconds)), "-f", fmt,
                             "-o", out, "--pid", str(pid)], stdout=subprocess.DEVNULL)


async def run_calls(server: Server, tokens: list[str], make_params, method: str, concurrency: int,
                    sockets: int, seconds: float, warmup: float = 2.0,
                    profile: str | None = None) -> tuple[Tally, float, float]:
    """Returns (tally, calls per second, server CPU share over the window)."""
    depth = [concurrency // sockets + (1 if i < concurrency % sockets else 0) for i in range(sockets)]
    async with aiohttp.ClientSession() as session:
        conns = [
            await session.ws_connect(server.ws_url, protocols=("hangout.v1",),
                                     headers={"Authorization": f"Bearer {tokens[i]}"}, max_msg_size=0)
            for i in range(sockets)
        ]
        tally, stop = Tally(), asyncio.Event()
        frames = [
            [[encode({"id": slot + 1, "method": method, "params": make_params()}) for _ in range(64)]
             for slot in range(depth[i])]
            for i in range(sockets)
        ]
        tasks = [asyncio.create_task(drive_socket(ws, frames[i], tally, stop)) for i, ws in enumerate(conns) if depth[i]]
        await asyncio.sleep(warmup)
        profiler = start_profiler(server.pid, seconds, profile) if profile else None
        cpu0, t0, own0, (busy0, all0) = cpu_seconds(server.pid), time.perf_counter(), time.process_time(), machine_busy()
        tally.counting = True
        await asyncio.sleep(seconds)
        tally.counting = False
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server.pid) - cpu0
        busy1, all1 = machine_busy()
        tally.client_cpu = (time.process_time() - own0) / elapsed
        tally.machine_cpu = (busy1 - busy0) / max(all1 - all0, 1e-9)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for ws in conns:
            await ws.close()
        if profiler is not None:
            await asyncio.to_thread(profiler.wait)
            print(f"  profile: {profile}", flush=True)
    return tally, tally.replies / elapsed, cpu / elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Figures:
    """What the rounds of one method on one server add up to."""

    replies: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, tally: Tally, rate: float, cpu_share: float) -> None:
        seconds = tally.replies / rate if rate else 0.0
        self.replies += tally.replies
        self.seconds += seconds
        self.cpu += cpu_share * seconds
        self.client_cpu += tally.client_cpu * seconds
        self.machine_cpu += tally.machine_cpu * seconds
        for code, n in tally.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.latencies_ms += tally.latencies_ms

    @property
    def rate(self) -> float:
        return self.replies / self.seconds if self.seconds else 0.0

    def line(self, label: str) -> str:
        n = self.seconds or 1.0
        errors = f", errors {self.errors}" if self.errors else ""
        return (f"{label:<24} {self.rate:9,.0f} calls/s  p50 {pct(self.latencies_ms, 0.5):5.1f} ms  "
                f"p99 {pct(self.latencies_ms, 0.99):5.1f} ms  CPU: server {self.cpu / n:4.0%} "
                f"client {self.client_cpu / n:4.0%} machine {self.machine_cpu / n:4.0%}{errors}")


async def amain(args: argparse.Namespace) -> int:
    stack = await asyncio.to_thread(Stack.dev)
    await ensure_pgbench_db(stack)
    users = await bench_users(stack.database_url, 2000, "bench-reads-")
    hosts = users[:200]
    conn = await asyncpg.connect(stack.database_url)
    try:  # 200 of them are bookable hosts, so a search has pages to fill
        await conn.execute(
            """UPDATE users SET price_per_hour = 10 + (abs(hashtext(id::text)) % 190)
               WHERE id = ANY($1::uuid[]) AND price_per_hour IS NULL""", hosts)
    finally:
        await conn.close()
    callers = users[-args.sockets:]
    tokens = await access_tokens(stack.database_url, callers)
    servers = {"hangout": Server(stack, root=Path(args.root).resolve() if args.root else ROOT)}
    if args.baseline:
        servers["baseline"] = Server(stack, root=Path(args.baseline).resolve())
    for server in servers.values():
        await asyncio.to_thread(server.start)
    others = users[200:-args.sockets]
    loads = {
        "users.get": lambda: {"user_id": str(random.choice(others))},
        "hosts.search": lambda: {},
        "users.me": lambda: {},  # the caller's own row: read-your-writes routing (a Redis look-up) every call
    }
    figures = {(m, name): Figures() for m in args.methods for name in servers}
    pg_runs: list[float] = []
    try:
        # In turns, round after round, so that a burst of someone else's load
        # on this shared machine falls on both sides of the ratio alike.
        for rnd in range(args.rounds):
            if not args.skip_pgbench:
                pg_runs.append(await asyncio.to_thread(pgbench_select_only, stack, args.concurrency, args.seconds))
                print(f"pgbench -S, {args.concurrency} clients: {pg_runs[-1]:,.0f} tps", flush=True)
            for method in args.methods:
                for name, server in servers.items():
                    profile = None
                    if args.profile and name == "hangout" and rnd == 0:
                        profile = f"{args.profile}/profile_{method}.{'txt' if args.profile_raw else 'svg'}"
                    tally, rate, cpu = await run_calls(server, tokens, loads[method], method, args.concurrency,
                                                       args.sockets, args.seconds, profile=profile)
                    figures[method, name].add(tally, rate, cpu)
                    print(f"{method} on {name}, {args.concurrency} in flight over {args.sockets} sockets: "
                          f"{rate:,.0f} calls/s (server CPU {cpu:.0%}, machine {tally.machine_cpu:.0%})", flush=True)
    finally:
        for server in servers.values():
            await asyncio.to_thread(server.stop)
    pg = statistics.mean(pg_runs) if pg_runs else float("nan")
    if pg_runs:
        print(f"\npgbench -S ({args.concurrency} clients): {' / '.join(f'{v:,.0f}' for v in pg_runs)} tps, mean {pg:,.0f}")
    ok = True
    for method in args.methods:
        for name in servers:
            f = figures[method, name]
            ratio = f" ratio to pgbench -S {f.rate / pg:.3f}" if not args.skip_pgbench else ""
            target = " (target >= 0.20)" if method == "users.get" and ratio else ""
            print(f.line(f"{method} ({name})") + ratio + target)
            if f.errors:
                ok = False
            if name == "hangout" and method == "users.get" and not args.skip_pgbench and f.rate / pg < 0.2:
                ok = False
        if "baseline" in servers:
            base = figures[method, "baseline"].rate
            print(f"{method}: this checkout / baseline = {figures[method, 'hangout'].rate / base:.2f}" if base else "")
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_reads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight = pgbench clients")
    ap.add_argument("--sockets", type=int, default=4, help="sockets the calls are pipelined over")
    ap.add_argument("--seconds", type=int, default=10, help="length of each measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of pgbench and each method (per server), in turns")
    ap.add_argument("--methods", nargs="+", default=["users.get", "hosts.search"], choices=["users.get", "hosts.search", "users.me"])
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run a server from this checkout (e.g. a git worktree of main), in turns with "
                         "this one, and print the ratio: before/after figures from one run")
    ap.add_argument("--root", metavar="DIR", help="run the server from this checkout instead of this one")
    ap.add_argument("--profile", metavar="DIR", help="record a py-spy profile of the server per method into DIR")
    ap.add_argument("--profile-raw", action="store_true", help="collapsed stacks (.txt) instead of a flame graph")
    ap.add_argument("--skip-pgbench", action="store_true", help="only the hangout calls (when profiling)")
    args = ap.parse_args(argv)
    return benchlib.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
