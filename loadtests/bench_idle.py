"""Many authenticated idle sockets across several server processes and client
addresses, their memory against bare aiohttp, and user events reaching a
sample of them.

    python -m loadtests.bench_idle                       # 100,000 sockets, 6 processes, 4 addresses
    python -m loadtests.bench_idle --sockets 5000 --processes 2 --addresses 2

In one run: the dev stack, ``--processes`` hangout server processes
(WORKERS=1 each, on ports of their own, limits raised as in
loadtests/benchlib.py ``LOCAL_LIMITS``) and a bare aiohttp WebSocket server
(loadtests/bench_connections.py ``--bare-server``). The sockets are spread
evenly over the processes; each comes from one of ``--addresses`` client
source addresses (127.0.0.2, 127.0.0.3, ...: one address has about 28,000
ephemeral ports), and authenticates at the upgrade as a user of its own, so
it follows its user channel. The sockets are held by client worker
processes (this file with ``--client-worker``, at most ``--per-worker``
sockets each), so that no process needs more open files than the hard
limit allows (20,000 here, and raising it needs ``CAP_SYS_RESOURCE``); a
server process likewise holds sockets / processes, which must stay under it.

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
- RLIMIT_NOFILE above the sockets of each server process and each client
  worker: the soft limit is raised here to the hard one (``resource.setrlimit``;
  the hard one too where the process has ``CAP_SYS_RESOURCE``, up to
  ``fs.nr_open``); otherwise use more ``--processes``;
- ``fs.file-max`` above twice the socket count (both ends are on this machine);
- ``net.ipv4.ip_local_port_range`` wide enough that sockets / addresses fit
  in it (default 32768-60999: 28,231 ports a source address);
- ``net.core.somaxconn`` and ``net.ipv4.tcp_max_syn_backlog`` at 4096 or more,
  so that the connect bursts are not dropped and retried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


class WatchSocket(IdleSocket):
    """A client worker's idle socket: when it is watched, the arrival of each
    ``wallet.updated`` is written to stdout with the monotonic clock, which
    every process on the machine shares."""

    watch: int | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.replies:
            if self.watch is not None and any(f.get("event") == "wallet.updated" for f in self.replies):
                print(json.dumps({"event": self.watch, "at": time.perf_counter()}), flush=True)
            self.replies.clear()


async def client_worker() -> int:
    """``--client-worker``: opens the sockets of one JSON line on stdin
    (``{"jobs": [[address, port, [token|null, ...], [watch id|null, ...]], ...],
    "concurrency": n, "max_seconds": s}``), says ``{"opened": n}``, reports
    watched events as they come, answers ``count`` with how many are still
    open, and closes everything on ``quit`` (or end of input)."""
    raise_nofile_to(1 << 20)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    deadline = time.monotonic() + spec["max_seconds"]
    socks: list[IdleSocket] = []

    async def job(address: str, port: int, tokens: list, watches: list) -> None:
        opened = await open_from(address, port, tokens, spec["concurrency"], deadline, factory=WatchSocket)
        for sk, w in zip(opened, watches):
            sk.watch = w  # type: ignore[attr-defined]
        socks.extend(opened)

    await asyncio.gather(*(job(*j) for j in spec["jobs"]))
    print(json.dumps({"opened": len(socks)}), flush=True)
    while True:
        line = (await reader.readline()).strip()
        if line == b"count":
            print(json.dumps({"open": sum(not sk.closed for sk in socks)}), flush=True)
        else:
            break
    for sk in socks:
        sk.close()
    return 0


class Clients:
    """Client worker processes (each under the per-process descriptor limit),
    holding the idle sockets; the arrivals of watched events are collected."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.arrivals: dict[int, float] = {}
        self.arrived = asyncio.Event()
        self.replies: list[asyncio.Queue] = []
        self.readers: list[asyncio.Task] = []

    async def start(self, jobs_per_worker: list[list], concurrency: int, max_seconds: float) -> int:
        for jobs in jobs_per_worker:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtests.bench_idle", "--client-worker", cwd=ROOT,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20)
            proc.stdin.write(json.dumps({"jobs": jobs, "concurrency": concurrency, "max_seconds": max_seconds}).encode() + b"\n")  # type: ignore[union-attr]
            queue: asyncio.Queue = asyncio.Queue()
            self.procs.append(proc)
            self.replies.append(queue)
            self.readers.append(asyncio.create_task(self._read(proc, queue)))
        opened = 0
        for queue in self.replies:
            got = await asyncio.wait_for(queue.get(), max_seconds + 60)
            if "opened" not in got:
                raise RuntimeError(f"a client worker failed: {got}")
            opened += got["opened"]
        return opened

    async def _read(self, proc: asyncio.subprocess.Process, queue: asyncio.Queue) -> None:
        async for line in proc.stdout:  # type: ignore[union-attr]
            msg = json.loads(line)
            if "event" in msg:
                self.arrivals[msg["event"]] = msg["at"]
                self.arrived.set()
            else:
                await queue.put(msg)
        await queue.put({"exited": proc.returncode})

    async def still_open(self) -> int:
        for proc in self.procs:
            proc.stdin.write(b"count\n")  # type: ignore[union-attr]
        counts = [await asyncio.wait_for(q.get(), 60) for q in self.replies]
        return sum(c.get("open", 0) for c in counts)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    proc.stdin.write(b"quit\n")  # type: ignore[union-attr]
                    proc.stdin.close()  # type: ignore[union-attr]
                except (BrokenPipeError, ConnectionResetError):
                    pass
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


def plan(tokens: list, ports: list[int], addresses: list[str], per_worker: int, watch: dict[int, int]) -> tuple[list[list], list[int]]:
    """Spread the sockets evenly over the server ports, each port's share
    over every address, and cut the jobs into workers of ``per_worker``
    sockets at most. Returns the jobs per worker and each port's count."""
    per_port = -(-len(tokens) // len(ports))
    pieces: list[tuple[str, int, list, list]] = []
    counts = []
    for i, port in enumerate(ports):
        idx = list(range(i * per_port, min(len(tokens), (i + 1) * per_port)))
        counts.append(len(idx))
        for a, address in enumerate(addresses):
            part = idx[a::len(addresses)]
            for k in range(0, len(part), per_worker):
                chunk = part[k:k + per_worker]
                pieces.append((address, port, [tokens[j] for j in chunk], [watch.get(j) for j in chunk]))
    workers: list[list] = [[]]
    room = per_worker
    for address, port, toks, watches in pieces:
        while toks:
            if room == 0:
                workers.append([])
                room = per_worker
            take = min(room, len(toks))
            workers[-1].append([address, port, toks[:take], watches[:take]])
            toks, watches, room = toks[take:], watches[take:], room - take
    return workers, counts


async def event_latencies(clients: Clients, targets: list[tuple[int, str]], port: int, rate: float) -> tuple[list[float], int]:
    """For each (watch id, its user's token): a topup from a second socket of
    that user, timed until the worker holding the idle socket reports
    ``wallet.updated``. Returns the latencies (ms) and how many never
    arrived (within 5 s)."""
    drivers = await open_from("127.0.0.1", port, [t for _w, t in targets], 20, time.monotonic() + 120)
    latencies, missed = [], 0
    try:
        for (watch, _token), driver in zip(targets, drivers):
            await asyncio.sleep(1.0 / rate)
            clients.arrivals.pop(watch, None)
            t0 = time.perf_counter()
            driver.transport.write(_mask(encode({"id": 1, "method": "wallet.topup", "params": {  # type: ignore[union-attr]
                "amount": "1.00", "idempotency_key": uuid.uuid4().hex}}), 0x2))
            end = time.monotonic() + 5
            while watch not in clients.arrivals and time.monotonic() < end:
                clients.arrived.clear()
                try:
                    await asyncio.wait_for(clients.arrived.wait(), end - time.monotonic())
                except asyncio.TimeoutError:
                    break
            if watch in clients.arrivals:
                latencies.append((clients.arrivals[watch] - t0) * 1000.0)
            else:
                missed += 1
    finally:
        for d in drivers:
            d.close()
    return latencies, missed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def hold(label: str, pids: list[int], ports: list[int], tokens: list, addresses: list[str], args: argparse.Namespace,
               watch: dict[int, int]) -> tuple[Clients, list[int], list[int], list[int], float]:
    """Warm each server up, take its baseline, open the sockets through the
    client workers and let the memory settle: (clients, per-process counts,
    baselines, settled RSS, seconds to open)."""
    warm = Clients()
    await warm.start([[[addresses[0], port, tokens[:20], [None] * 20] for port in ports]], 20, 60)
    await asyncio.sleep(0.5)
    await warm.stop()
    await asyncio.sleep(1.0)
    bases = [await settle(pid, 5) for pid in pids]
    jobs, counts = plan(tokens, ports, addresses, args.per_worker, watch)
    clients = Clients()
    t0 = time.monotonic()
    opened = await clients.start(jobs, args.concurrency, args.max_seconds)
    took = time.monotonic() - t0
    afters = [await settle(pid, args.settle) for pid in pids]
    print(f"{label}: opened {opened} sockets in {took:.0f}s ({opened / max(took, 0.001):.0f}/s) from {len(addresses)} "
          f"addresses by {len(jobs)} client processes onto {len(ports)} server processes", flush=True)
    for n, (b, a, c) in enumerate(zip(bases, afters, counts)):
        print(f"  process {n}: {b / 1024:.0f} -> {a / 1024:.0f} MiB for {c} sockets: {(a - b) / c:.2f} KiB a socket", flush=True)
    return clients, counts, bases, afters, took


async def amain(args: argparse.Namespace) -> int:
    per_process = -(-args.sockets // args.processes)
    limit = raise_nofile_to(per_process + 1_000)
    if limit < per_process + 500 or limit < args.per_worker + 500:
        print(f"RLIMIT_NOFILE is {limit}: not enough for {per_process} sockets a server process; "
              f"use more --processes (and a smaller --per-worker)", file=sys.stderr)
        return 2
    for line in check_sysctls(args.sockets, args.addresses):
        print(f"sysctl short of what this run needs: {line}", file=sys.stderr)
    addresses = [f"127.0.0.{2 + i}" for i in range(args.addresses)]
    started = time.monotonic()

    stack = await asyncio.to_thread(Stack.dev)
    users = (await bench_users(stack.database_url, args.sockets, "bench-conn-"))[: args.sockets]
    tokens: list[str | None] = list(await access_tokens(stack.database_url, users))
    print(f"{len(tokens)} users and tokens ready in {time.monotonic() - started:.0f}s", flush=True)
    sample = random.sample(range(len(tokens)), min(args.sample, len(tokens)))
    watch = {j: w for w, j in enumerate(sample)}

    servers = [Server(stack, {"PING_INTERVAL_S": str(args.heartbeat)}) for _ in range(args.processes)]
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, "-m", "loadtests.bench_connections", "--bare-server", str(bare_port),
         "--heartbeat", str(args.heartbeat), "--bare-loop", "uvloop"], cwd=ROOT)
    clients: Clients | None = None
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{bare_port}/healthz", bare)
        clients, counts, bases, afters, _took = await hold(
            "hangout", [s.pid for s in servers], [s.port for s in servers], tokens, addresses, args, watch)
        pers = [(a - b) / c for a, b, c in zip(afters, bases, counts)]
        statuses = [process_status(s.metrics)["sockets"] for s in servers]
        print(f"  /status counts {statuses}", flush=True)
        latencies, missed = await event_latencies(clients, [(watch[j], tokens[j]) for j in sample],  # type: ignore[misc]
                                                  servers[0].port, args.event_rate)
        still = await clients.still_open()
        lost = args.sockets - still
        print(f"wallet.updated on {len(latencies)}/{len(sample)} sampled idle sockets: p50 {percentile(latencies, 0.5):.1f} ms, "
              f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies or [0]):.1f} ms; {missed} missed; "
              f"{lost} sockets closed since opening", flush=True)
        await clients.stop()
        # The reference: one bare process with as many sockets as one hangout process.
        clients, bare_counts, bare_bases, bare_afters, _took = await hold(
            "bare aiohttp", [bare.pid], [bare_port], [None] * max(counts), addresses, args, {})
        bare_per = (bare_afters[0] - bare_bases[0]) / bare_counts[0]
        await clients.stop()
        clients = None
    finally:
        if clients is not None:
            await clients.stop()
        stop_process(bare)
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
    hangout_per = statistics.mean(pers)
    ratio = hangout_per / bare_per if bare_per > 0 else float("inf")
    p99 = percentile(latencies, 0.99)
    print(f"\n{args.sockets} idle sockets on {args.processes} processes: hangout {hangout_per:.2f} KiB a socket, "
          f"bare aiohttp {bare_per:.2f} KiB ({max(counts)} sockets), ratio {ratio:.2f} (target <= 1.5); "
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
    ap.add_argument("--processes", type=int, default=6, help="hangout server processes")
    ap.add_argument("--addresses", type=int, default=4, help="client source addresses (127.0.0.2 on)")
    ap.add_argument("--sample", type=int, default=200, help="idle sockets that each get one user event")
    ap.add_argument("--event-rate", type=float, default=50.0, help="sampled events a second")
    ap.add_argument("--concurrency", type=int, default=100, help="handshakes in flight per (process, address)")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="deadline for opening all the sockets")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds to wait for each RSS to settle")
    ap.add_argument("--heartbeat", type=float, default=20.0, help="ping interval of every server")
    ap.add_argument("--per-worker", type=int, default=15_000, help="sockets a client process holds at most")
    ap.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from loadtests.benchlib import run

    return run(client_worker() if args.client_worker else amain(args))


if __name__ == "__main__":
    sys.exit(main())
