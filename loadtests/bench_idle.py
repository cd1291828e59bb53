"""Many authenticated idle sockets across several server processes and client
addresses, their memory against bare aiohttp, and user events reaching a
sample of them.

    python -m loadtests.bench_idle                       # 100,000 sockets, 4 processes, 4 addresses
    python -m loadtests.bench_idle --sockets 5000 --processes 2 --addresses 2

In one run: the dev stack, ``--processes`` hangout server processes
(WORKERS=1 each, on ports of their own, limits raised as in
loadtests/benchlib.py ``LOCAL_LIMITS``) and a bare aiohttp WebSocket server
(loadtests/bench_connections.py ``--bare-server``). The sockets are spread
evenly over the processes; each comes from one of ``--addresses`` client
source addresses (127.0.0.2, 127.0.0.3, ...: one address has about 28,000
ephemeral ports), and authenticates at the upgrade as a user of its own, so
it follows its user channel.

Memory per socket is measured as bench_connections does it, per process: the
VmRSS delta of each hangout process over its warmed-up baseline, divided by
its sockets; then the bare server holds as many sockets as one hangout
process did, measured the same way. Target: at most 1.5 x bare aiohttp.

While all of them are open, ``--sample`` sockets (spread over the processes)
each get one ``wallet.updated``: a second socket of the same user calls
``wallet.topup``, paced at ``--event-rate`` a second, and the time from the
call to the event's arrival on the idle socket is recorded. Target: p99
under 100 ms. Exit 3 when a target is missed, 1 when sockets were lost or
the run was not valid.

Bounds: every phase has a deadline (``--max-seconds`` for opening the
sockets), and the run refuses counts its file descriptors cannot hold.

What the machine needs (the script checks and says what is short):
- RLIMIT_NOFILE above the socket count for this process and each server:
  raised here (``resource.setrlimit``, which needs root or a hard limit
  already high enough; ``fs.nr_open`` caps it);
- ``fs.file-max`` above twice the socket count (both ends are on this machine);
- ``net.ipv4.ip_local_port_range`` wide enough that sockets / addresses fit
  in it (default 32768-60999: 28,231 ports a source address);
- ``net.core.somaxconn`` and ``net.ipv4.tcp_max_syn_backlog`` at 4096 or more,
  so that the connect bursts are not dropped and retried.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
import uuid

from loadtests.bench_connections import IdleSocket, _handshake, _mask, process_status, settle
from loadtests.benchlib import ROOT, Server, Stack, access_tokens, bench_users, free_port, rss_kib, stop_process, wait_http
from protocol.codec import decode, encode

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: choose the port at connect, so one address serves many destinations


class StampedSocket(IdleSocket):
    """An idle socket that notes when the frame a waiter waited for came in."""

    frame_at = 0.0

    def data_received(self, data: bytes) -> None:
        waiter = self.reply_waiter
        pending = waiter is not None and not waiter.done()
        super().data_received(data)
        if pending and waiter.done():
            self.frame_at = time.perf_counter()


def raise_nofile_to(want: int) -> int:
    """Soft (and, as root, hard) RLIMIT_NOFILE up to ``want``; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < want:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                cap = int(f.read())
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, cap), min(want, cap)))
        except (OSError, ValueError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(want, hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_sysctls(sockets: int, addresses: int) -> list[str]:
    def read(name: str) -> list[int]:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return [int(v) for v in f.read().split()]

    short = []
    if read("fs.file-max")[0] < 2 * sockets + 10_000:
        short.append(f"fs.file-max >= {2 * sockets + 10_000}")
    low, high = read("net.ipv4.ip_local_port_range")
    if (high - low) * addresses < sockets * 1.05:
        short.append(f"net.ipv4.ip_local_port_range wider than {sockets // addresses} ports (or more --addresses)")
    for name in ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"):
        if read(name)[0] < 4096:
            short.append(f"{name} >= 4096")
    return short


async def open_from(address: str, port: int, tokens: list[str | None], concurrency: int, deadline: float,
                    factory: type[StampedSocket] = StampedSocket) -> list[StampedSocket]:
    """``open_sockets`` of bench_connections, from a given source address."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)

    async def one(token: str | None) -> StampedSocket:
        async with sem:
            for attempt in range(5):
                if time.monotonic() > deadline:
                    raise RuntimeError("out of time opening sockets")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((address, 0))
                    sock.setblocking(False)
                    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 30)
                    _t, proto = await loop.create_connection(lambda: factory(_handshake(port, token)), sock=sock)
                    await asyncio.wait_for(proto.upgraded, 30)
                    return proto
                except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                    sock.close()
                    if attempt == 4:
                        raise RuntimeError(f"could not open a socket from {address}: {exc!r}") from exc
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one(t) for t in tokens)))


async def event_latencies(targets: list[tuple[StampedSocket, str]], port: int, rate: float) -> tuple[list[float], int]:
    """For each (idle socket, its user's token): a topup from a second socket
    of that user, timed until ``wallet.updated`` reaches the idle socket.
    Returns the latencies (ms) and how many never arrived (within 5 s)."""
    drivers = await open_from("127.0.0.1", port, [t for _s, t in targets], 20, time.monotonic() + 120)
    latencies, missed = [], 0
    try:
        for (idle, _token), driver in zip(targets, drivers):
            await asyncio.sleep(1.0 / rate)
            loop = asyncio.get_running_loop()
            idle.replies.clear()
            idle.reply_waiter = loop.create_future()
            t0 = time.perf_counter()
            driver.transport.write(_mask(encode({"id": 1, "method": "wallet.topup", "params": {  # type: ignore[union-attr]
                "amount": "1.00", "idempotency_key": uuid.uuid4().hex}}), 0x2))
            got = None
            end = time.monotonic() + 5
            while got is None and time.monotonic() < end:
                try:
                    await asyncio.wait_for(asyncio.shield(idle.reply_waiter), end - time.monotonic())
                except asyncio.TimeoutError:
                    break
                frames = [f for f in idle.replies if isinstance(f, dict) and f.get("event") == "wallet.updated"]
                if frames:
                    got = idle.frame_at
                else:  # another push came first: wait on
                    idle.replies.clear()
                    idle.reply_waiter = loop.create_future()
            idle.reply_waiter = None
            if got is None:
                missed += 1
            else:
                latencies.append((got - t0) * 1000.0)
    finally:
        for d in drivers:
            d.close()
    return latencies, missed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def amain(args: argparse.Namespace) -> int:
    per_process = -(-args.sockets // args.processes)
    limit = raise_nofile_to(args.sockets + args.sample + 2_000)
    if limit < args.sockets + args.sample + 500:
        print(f"RLIMIT_NOFILE is {limit}: not enough for {args.sockets} sockets (run as root, or raise the hard limit)",
              file=sys.stderr)
        return 2
    for line in check_sysctls(args.sockets, args.addresses):
        print(f"sysctl short of what this run needs: {line}", file=sys.stderr)
    addresses = [f"127.0.0.{2 + i}" for i in range(args.addresses)]
    started = time.monotonic()

    stack = await asyncio.to_thread(Stack.dev)
    users = await bench_users(stack.database_url, args.sockets + 50, "bench-conn-")
    users = users[: args.sockets]
    tokens: list[str | None] = list(await access_tokens(stack.database_url, users))
    print(f"{len(tokens)} users and tokens ready in {time.monotonic() - started:.0f}s", flush=True)

    servers = [Server(stack, {"PING_INTERVAL_S": str(args.heartbeat)}) for _ in range(args.processes)]
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, "-m", "loadtests.bench_connections", "--bare-server", str(bare_port),
         "--heartbeat", str(args.heartbeat), "--bare-loop", "uvloop"], cwd=ROOT)
    socks: list[StampedSocket] = []
    placed: list[tuple[StampedSocket, str, int]] = []  # socket, token, process index
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{bare_port}/healthz", bare)
        # Warm-up of every process, then its baseline (as bench_connections).
        for i, s in enumerate(servers):
            warm = await open_from(addresses[0], s.port, tokens[:20], 20, time.monotonic() + 60)
            await asyncio.sleep(0.5)
            for w in warm:
                w.close()
        await asyncio.sleep(1.0)
        bases = [await settle(s.pid, 5) for s in servers]
        deadline = time.monotonic() + args.max_seconds
        t0 = time.monotonic()
        jobs = []
        for i, s in enumerate(servers):
            share = tokens[i * per_process:(i + 1) * per_process]
            for a, address in enumerate(addresses):  # each process's share from every address
                part = share[a::len(addresses)]
                jobs.append((i, part, open_from(address, s.port, part, args.concurrency, deadline)))
        results = await asyncio.gather(*(j[2] for j in jobs))
        for (i, part, _coro), opened in zip(jobs, results):
            socks += opened
            placed += [(sk, tk, i) for sk, tk in zip(opened, part)]  # type: ignore[misc]
        took = time.monotonic() - t0
        afters = [await settle(s.pid, args.settle) for s in servers]
        counts = [sum(1 for _sk, _tk, i in placed if i == n) for n in range(len(servers))]
        pers = [(a - b) / c for a, b, c in zip(afters, bases, counts)]
        statuses = [process_status(s.metrics)["sockets"] for s in servers]
        print(f"opened {len(socks)} sockets in {took:.0f}s ({len(socks) / took:.0f}/s) from {len(addresses)} addresses "
              f"onto {len(servers)} processes; /status counts {statuses}", flush=True)
        for n, (b, a, c, per) in enumerate(zip(bases, afters, counts, pers)):
            print(f"  process {n}: {b / 1024:.0f} -> {a / 1024:.0f} MiB for {c} sockets: {per:.2f} KiB a socket", flush=True)

        sample = random.sample(placed, min(args.sample, len(placed)))
        latencies, missed = await event_latencies([(sk, tk) for sk, tk, _i in sample], servers[0].port, args.event_rate)
        lost = sum(sk.closed for sk in socks)
        print(f"wallet.updated on {len(latencies)}/{len(sample)} sampled idle sockets: p50 {percentile(latencies, 0.5):.1f} ms, "
              f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies or [0]):.1f} ms; {missed} missed; "
              f"{lost} sockets closed since opening", flush=True)
        for sk in socks:
            sk.close()
        socks = []
        placed = []
        # The reference: one bare process with as many sockets as one hangout process.
        bare_socks = []
        warm = await open_from(addresses[0], bare_port, [None] * 20, 20, time.monotonic() + 60)
        await asyncio.sleep(0.5)
        for w in warm:
            w.close()
        await asyncio.sleep(1.0)
        bare_base = await settle(bare.pid, 5)
        bare_n = max(counts)
        for a, address in enumerate(addresses):
            bare_socks += await open_from(address, bare_port, [None] * len(range(a, bare_n, len(addresses))),
                                          args.concurrency, time.monotonic() + args.max_seconds)
        bare_after = await settle(bare.pid, args.settle)
        bare_per = (bare_after - bare_base) / len(bare_socks)
        print(f"  bare aiohttp: {bare_base / 1024:.0f} -> {bare_after / 1024:.0f} MiB for {len(bare_socks)} sockets: "
              f"{bare_per:.2f} KiB a socket", flush=True)
        for sk in bare_socks:
            sk.close()
    finally:
        for sk in socks:
            sk.close()
        stop_process(bare)
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
    hangout_per = statistics.mean(pers)
    ratio = hangout_per / bare_per if bare_per > 0 else float("inf")
    p99 = percentile(latencies, 0.99)
    print(f"\n{args.sockets} idle sockets on {args.processes} processes: hangout {hangout_per:.2f} KiB a socket, "
          f"bare aiohttp {bare_per:.2f} KiB, ratio {ratio:.2f} (target <= 1.5); "
          f"user event p99 {p99:.1f} ms on {len(latencies)} sampled sockets (target < 100 ms); "
          f"run took {time.monotonic() - started:.0f}s")
    if missed or lost or min(statuses) < min(counts):
        print("sockets were lost or events missed: the figures are not valid", file=sys.stderr)
        return 1
    return 0 if ratio <= 1.5 and p99 < 100 else 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_idle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--processes", type=int, default=4, help="hangout server processes")
    ap.add_argument("--addresses", type=int, default=4, help="client source addresses (127.0.0.2 on)")
    ap.add_argument("--sample", type=int, default=200, help="idle sockets that each get one user event")
    ap.add_argument("--event-rate", type=float, default=50.0, help="sampled events a second")
    ap.add_argument("--concurrency", type=int, default=100, help="handshakes in flight per (process, address)")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="deadline for opening all the sockets")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds to wait for each RSS to settle")
    ap.add_argument("--heartbeat", type=float, default=20.0, help="ping interval of every server")
    args = ap.parse_args(argv)
    from loadtests.benchlib import run

    return run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
