"""The reconnect storm: every socket of a server process that is killed comes
back on the other processes (or the restarted one), authenticated, resumed
and re-joined, with nothing lost.

    python -m loadtests.bench_storm                      # 10,000 sockets, 3 processes
    python -m loadtests.bench_storm --sockets 1000 --restart

In one run: the dev stack and ``--processes`` hangout server processes
(WORKERS=1 each, limits raised as in loadtests/benchlib.py ``LOCAL_LIMITS``).
``--sockets`` bench users, each the booker of a confirmed booking with a
conversation (made in SQL once, reused), connect to the first process from
``--addresses`` source addresses, authenticate at the upgrade, join their
conversation and note their user-event seq (``users.me``). Their hosts, and
a second socket of ``--sample`` of the bookers, sit on a surviving process.

Then the first process is killed (SIGKILL: no goodbye to anyone). Each
client, on losing its socket, waits a random 0..``--jitter`` s (the jittered
backoff of the app's client) and reconnects to a surviving process (with
``--restart``: to any process, the killed one started again on its port),
with its access token at the upgrade, calls ``events.resume`` from the last
user event it saw, and re-joins its conversation with ``since_seq``. A
client that fails retries after a short backoff until the deadline.

Meanwhile, from the kill until a few seconds after every client is back,
hosts send ``chat.send`` into sampled conversations and the second sockets
call ``wallet.topup`` (each a ``wallet.updated`` user event), at
``--rate`` of each a second. At the end every client must have every message
sent into its conversation after its first join (from the re-join's
messages or live) and every user event after its first seq (from
``events.resume`` or live), with no gap.

Prints the time from the kill to each client being back (p50, p99, max) and
what was lost. Target: all back within 15 s, nothing lost. Exit 3 when
missed, 1 when the run was not valid. Every wait has a deadline
(``--deadline`` for the storm).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field

import asyncpg

from loadtests.bench_connections import _mask, process_status
from loadtests.bench_idle import StampedSocket, open_from, percentile, raise_nofile_to
from loadtests.benchlib import Server, Stack, access_tokens, bench_users, cpu_by_role, cpu_seconds, machine_busy
from protocol.codec import encode


async def storm_conversations(database_url: str, bookers: list[uuid.UUID], hosts: list[uuid.UUID]) -> list[tuple[str, uuid.UUID]]:
    """A conversation (and its host) for each booker: the one it has from an earlier run,
    else a confirmed booking with host ``i % len(hosts)`` at hour ``i`` (the
    booker's number), so that no two of them overlap whatever ``--hosts`` was."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("""SELECT DISTINCT ON (user_id) user_id, id FROM conversations
                                   WHERE user_id = ANY($1::uuid[]) ORDER BY user_id, id""", bookers)
        have = {r["user_id"]: r["id"] for r in rows}
        base = dt.datetime(2098, 1, 1, tzinfo=dt.timezone.utc)  # far from real bookings and bench_chat's
        for i, booker in enumerate(bookers):
            if booker in have:
                continue
            async with conn.transaction():
                # A slot taken by a booking of another bench (or scheme) is skipped.
                for attempt in range(10):
                    start = base + dt.timedelta(hours=i + attempt * 200_000)
                    booking = await conn.fetchval(
                        """INSERT INTO bookings (user_id, host_id, start_at, end_at, idempotency_key, status, amount)
                           VALUES ($1, $2, $3, $4, $5, 'confirmed', 10.00) ON CONFLICT DO NOTHING RETURNING id""",
                        booker, hosts[i % len(hosts)], start, start + dt.timedelta(hours=1), f"bench-storm-{uuid.uuid4()}")
                    if booking is not None:
                        break
                else:
                    raise RuntimeError(f"no free hour for bench booker {i}")
                have[booker] = await conn.fetchval(
                    "INSERT INTO conversations (booking_id, user_id, host_id) VALUES ($1, $2, $3) RETURNING id",
                    booking, booker, hosts[i % len(hosts)])
        hosts_of = {r["id"]: r["host_id"] for r in await conn.fetch(
            "SELECT id, host_id FROM conversations WHERE id = ANY($1::uuid[])", list(have.values()))}
    finally:
        await conn.close()
    return [(str(have[b]), hosts_of[have[b]]) for b in bookers]


class CallFailed(Exception):
    pass


class Client(StampedSocket):
    """A socket with calls matched by id and the events it received kept."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.events: list[dict] = []
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = 0
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        for frame in self.replies:
            if "event" in frame:
                self.events.append(frame)
                continue
            fut = self.pending.pop(frame.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
        self.replies.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(time.monotonic())
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("socket lost"))
        self.pending.clear()

    async def call(self, method: str, params: dict, timeout: float = 10) -> dict:  # type: ignore[override]
        if self.closed:
            raise ConnectionError("socket lost")
        self.ids += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.ids] = fut
        self.transport.write(_mask(encode({"id": self.ids, "method": method, "params": params}), 0x2))  # type: ignore[union-attr]
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise CallFailed(f"{method}: {reply['error'].get('code')}")
        return reply["result"]


@dataclass
class Device:
    """One booker's phone: its sockets over time and what it has seen."""

    token: str
    conversation: str
    address: str
    socks: list[Client] = field(default_factory=list)
    first_msg: int = 0  # the conversation's last_seq at the first join
    first_event: int = 0  # the user's event_seq at the start
    msg_seqs: set[int] = field(default_factory=set)
    event_seqs: set[int] = field(default_factory=set)
    back_after: float | None = None  # seconds from the kill
    attempts: int = 0
    failures: list[str] = field(default_factory=list)  # why each failed attempt failed
    error: str = ""

    def take_live(self) -> None:
        for sock in self.socks:
            for frame in sock.events:
                if frame["event"] == "chat.message":
                    self.msg_seqs.add(frame["data"]["message"]["seq"])
                elif isinstance(frame.get("seq"), int):
                    self.event_seqs.add(frame["seq"])
            sock.events.clear()

    def msg_through(self) -> int:
        """The last message seq seen with none missing before it."""
        seq = self.first_msg
        while seq + 1 in self.msg_seqs:
            seq += 1
        return seq

    def event_through(self) -> int:
        seq = self.first_event
        while seq + 1 in self.event_seqs:
            seq += 1
        return seq


async def first_connect(devices: list[Device], port: int, concurrency: int, deadline: float) -> None:
    by_address: dict[str, list[Device]] = {}
    for d in devices:
        by_address.setdefault(d.address, []).append(d)
    for address, group in by_address.items():
        socks = await open_from(address, port, [d.token for d in group], concurrency, deadline, factory=Client)
        for d, s in zip(group, socks):
            d.socks.append(s)  # type: ignore[arg-type]
    sem = asyncio.Semaphore(concurrency)

    async def prime(d: Device) -> None:
        async with sem:
            sock = d.socks[-1]
            joined = await sock.call("chat.join", {"conversation_id": d.conversation})
            d.first_msg = joined["last_seq"]
            d.first_event = (await sock.call("users.me", {}))["event_seq"]

    await asyncio.gather(*(prime(d) for d in devices))


async def come_back(d: Device, ports: list[int], jitter: float, killed_at: float, deadline: float) -> None:
    """What the app does when its socket drops: backoff with jitter, a new
    socket, the missed user events, the room from the last message seen."""
    await d.socks[-1].lost
    await asyncio.sleep(random.uniform(0, jitter))
    while time.monotonic() < deadline:
        d.attempts += 1
        port = random.choice(ports)
        try:
            (sock,) = await open_from(d.address, port, [d.token], 1, deadline, factory=Client)
            d.socks.append(sock)  # type: ignore[arg-type]
            d.take_live()
            since = d.event_through()
            for _page in range(10):
                got = await sock.call("events.resume", {"since_seq": since})
                d.event_seqs.update(e["seq"] for e in got["events"])
                if not got["has_more"]:
                    break
                since = got["events"][-1]["seq"]
            joined = await sock.call("chat.join", {"conversation_id": d.conversation, "since_seq": d.msg_through()})
            d.msg_seqs.update(m["seq"] for m in joined["messages"])
            d.back_after = time.monotonic() - killed_at
            d.error = ""
            return
        except (OSError, ConnectionError, RuntimeError, asyncio.TimeoutError, CallFailed) as exc:
            d.error = repr(exc)
            d.failures.append(str(exc)[:60] if isinstance(exc, CallFailed) else type(exc).__name__)
            await asyncio.sleep(min(2.0, 0.2 * d.attempts) * random.uniform(0.5, 1.0))


@dataclass
class Sent:
    messages: dict[str, set[int]] = field(default_factory=dict)  # conversation -> seqs sent into it
    topups: dict[int, int] = field(default_factory=dict)  # device index -> topups committed
    failed: int = 0


async def traffic(hosts: dict[str, Client], payers: dict[int, Client], devices: list[Device], rate: float,
                  stop: asyncio.Event, sent: Sent) -> None:
    """Messages into sampled conversations and topups of sampled users, at
    ``rate`` of each a second, until ``stop``."""
    convs = list(hosts)
    payer_ids = list(payers)

    async def message(conv: str) -> None:
        try:
            reply = await hosts[conv].call("chat.send", {"conversation_id": conv, "content": "storm"})
            sent.messages.setdefault(conv, set()).add(reply["message"]["seq"])
        except (CallFailed, ConnectionError, asyncio.TimeoutError):
            sent.failed += 1

    async def topup(i: int) -> None:
        try:
            await payers[i].call("wallet.topup", {"amount": "1.00", "idempotency_key": uuid.uuid4().hex})
            sent.topups[i] = sent.topups.get(i, 0) + 1
        except (CallFailed, ConnectionError, asyncio.TimeoutError):
            sent.failed += 1

    tasks: set[asyncio.Task] = set()
    while not stop.is_set():
        for coro in (message(random.choice(convs)), topup(random.choice(payer_ids))):
            t = asyncio.create_task(coro)
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        try:
            await asyncio.wait_for(stop.wait(), 1.0 / rate)
        except asyncio.TimeoutError:
            pass
    await asyncio.gather(*tasks)


def lost_items(devices: list[Device], sent: Sent) -> tuple[int, int]:
    """Messages and user events some client never received."""
    lost_msgs = lost_events = 0
    by_conv = {d.conversation: d for d in devices}
    for conv, seqs in sent.messages.items():
        d = by_conv[conv]
        d.take_live()
        lost_msgs += len({s for s in seqs if s > d.first_msg} - d.msg_seqs)
    for i, n in sent.topups.items():
        d = devices[i]
        d.take_live()
        want = set(range(d.first_event + 1, d.first_event + n + 1))
        lost_events += len(want - d.event_seqs)
    return lost_msgs, lost_events


def cpu_now(servers: list[Server], redis_url: str) -> dict[str, float]:
    """CPU seconds so far: the surviving servers, PostgreSQL, Redis, this
    load generator, and the whole machine (busy, of all its cores)."""
    from urllib.parse import urlparse

    roles = cpu_by_role(None, urlparse(redis_url).port)
    roles["server"] = sum(cpu_seconds(s.pid) for s in servers)
    roles["machine"] = machine_busy()[0]
    return roles


def reads_now(servers: list[Server]) -> dict[str, int]:
    """Reads the servers have sent so far: to the primary, to the replicas."""
    reads = {"primary": 0, "replicas": 0}
    for server in servers:
        status = process_status(server.metrics)
        reads["primary"] += status["primary"]["reads"]
        reads["replicas"] += sum(r["reads_served"] for r in status["replicas"])
    return reads


def _restart(server: Server) -> None:
    server.proc.wait()  # type: ignore[union-attr]
    server.start()


async def amain(args: argparse.Namespace) -> int:
    need = args.sockets + 2 * args.sample + 500  # a lost socket's descriptor is closed before its new one opens
    if raise_nofile_to(need) < need:
        print(f"RLIMIT_NOFILE below {need}: fewer --sockets, or a higher hard limit", file=sys.stderr)
        return 2
    stack = await asyncio.to_thread(Stack.dev)
    t0 = time.monotonic()
    bookers = (await bench_users(stack.database_url, args.sockets, "bench-storm-booker-"))[: args.sockets]
    host_ids = (await bench_users(stack.database_url, args.hosts, "bench-storm-hosts-"))[: args.hosts]
    conv_hosts = await storm_conversations(stack.database_url, bookers, host_ids)
    conversations = [c for c, _h in conv_hosts]
    host_of = [h for _c, h in conv_hosts]
    tokens = await access_tokens(stack.database_url, bookers)
    all_hosts = sorted(set(host_of))
    host_token = dict(zip(all_hosts, await access_tokens(stack.database_url, all_hosts)))
    print(f"{len(bookers)} bookers with conversations ready in {time.monotonic() - t0:.0f}s", flush=True)
    addresses = [f"127.0.0.{2 + i}" for i in range(args.addresses)]
    devices = [Device(tok, conv, addresses[i % len(addresses)]) for i, (tok, conv) in enumerate(zip(tokens, conversations))]

    servers = [Server(stack, {"PING_INTERVAL_S": "20"}) for _ in range(args.processes)]
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
    victim, survivors = servers[0], servers[1:]
    helpers: list[Client] = []
    try:
        await first_connect(devices, victim.port, args.concurrency, time.monotonic() + args.deadline * 10)
        sample = random.sample(range(len(devices)), min(args.sample, len(devices)))
        host_socks = await open_from("127.0.0.1", survivors[0].port,
                                     [host_token[host_of[i]] for i in sample], 50, time.monotonic() + 60, factory=Client)
        payer_socks = await open_from("127.0.0.1", survivors[-1].port, [devices[i].token for i in sample], 50,
                                      time.monotonic() + 60, factory=Client)
        helpers = host_socks + payer_socks  # type: ignore[operator]
        hosts = {devices[i].conversation: s for i, s in zip(sample, host_socks)}
        payers = dict(zip(sample, payer_socks))
        print(f"{len(devices)} clients joined on process 0 (pid {victim.pid}); killing it", flush=True)

        stop, sent = asyncio.Event(), Sent()
        cpu0 = cpu_now(survivors, stack.redis_url)
        reads0 = await asyncio.to_thread(reads_now, survivors)
        killed_at = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        traffic_task = asyncio.create_task(traffic(hosts, payers, devices, args.rate, stop, sent))
        # With --restart the killed process's port is tried from the start:
        # until it is up again, those attempts are refused and retried.
        ports = [s.port for s in (servers if args.restart else survivors)]
        deadline = killed_at + args.deadline
        restart = asyncio.create_task(asyncio.to_thread(_restart, victim) if args.restart else asyncio.sleep(0))
        await asyncio.gather(*(come_back(d, ports, args.jitter, killed_at, deadline) for d in devices))
        await restart
        back = sorted(d.back_after for d in devices if d.back_after is not None)
        cpu1 = cpu_now(survivors, stack.redis_url)
        reads = {k: v - reads0[k] for k, v in (await asyncio.to_thread(reads_now, survivors)).items()}
        storm_s = max(back or [1.0])
        cpu = {k: (cpu1[k] - cpu0[k]) / storm_s for k in cpu0}
        await asyncio.sleep(args.after)  # live traffic after every re-join
        stop.set()
        await traffic_task
        # Deliveries of the last sends: bounded wait until nothing is missing.
        end = time.monotonic() + 5
        while time.monotonic() < end and any(lost_items(devices, sent)):
            await asyncio.sleep(0.1)
        lost_msgs, lost_events = lost_items(devices, sent)
    finally:
        for d in devices:
            for s in d.socks:
                s.close()
        for s in helpers:
            s.close()
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
    missing = len(devices) - len(back)
    within = sum(1 for b in back if b <= 15.0)
    messages = sum(len(v) for v in sent.messages.values())
    events = sum(sent.topups.values())
    print(f"\nstorm of {len(devices)} sockets onto {len(ports)} processes{' (one restarted)' if args.restart else ''}: "
          f"back p50 {percentile(back, 0.5):.2f}s, p99 {percentile(back, 0.99):.2f}s, max {max(back or [0]):.2f}s; "
          f"{within} back within 15 s, {missing} never back; "
          f"{messages} messages and {events} user events sent meanwhile ({sent.failed} sends failed): "
          f"{lost_msgs} messages and {lost_events} events lost; "
          f"{sum(d.attempts for d in devices) - len(back)} retried attempts")
    why = collections.Counter(f for d in devices for f in d.failures)
    if why:
        print("  failed attempts: " + ", ".join(f"{n} {what}" for what, n in why.most_common()))
    print(f"CPU during the storm ({storm_s:.1f}s; cores busy): surviving servers {cpu['server']:.2f}, "
          f"PostgreSQL {cpu['postgres']:.2f}, Redis {cpu['redis']:.2f}, load generator {cpu['load']:.2f}, "
          f"whole machine {cpu['machine']:.2f}")
    # Merged reads (many clients' in one statement) count once.
    print(f"read statements meanwhile: {reads['primary']:,} on the primary, {reads['replicas']:,} on replicas")
    errors = sorted({d.error for d in devices if d.back_after is None})[:5]
    if errors:
        print(f"never back, e.g.: {errors}", file=sys.stderr)
    if missing or not messages or not events:
        return 1 if not back else 3
    return 0 if within == len(devices) and not lost_msgs and not lost_events else 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_storm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=10_000)
    ap.add_argument("--processes", type=int, default=3, help="server processes; the first is killed")
    ap.add_argument("--addresses", type=int, default=2, help="client source addresses (127.0.0.2 on)")
    ap.add_argument("--hosts", type=int, default=100, help="hosts of the bookers' conversations")
    ap.add_argument("--sample", type=int, default=100, help="conversations and users that get traffic meanwhile")
    ap.add_argument("--rate", type=float, default=20.0, help="messages and topups a second, each")
    ap.add_argument("--jitter", type=float, default=3.0, help="a client's random wait before reconnecting")
    ap.add_argument("--concurrency", type=int, default=200, help="first connects and joins in flight")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds after the kill before giving up")
    ap.add_argument("--after", type=float, default=2.0, help="seconds of traffic after every client is back")
    ap.add_argument("--restart", action="store_true", help="start the killed process again and use it too")
    args = ap.parse_args(argv)
    from loadtests.benchlib import run

    return run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
