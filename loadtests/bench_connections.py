"""Memory per idle authenticated socket: hangout vs a bare aiohttp server.

    python -m loadtests.bench_connections [--sockets 10000]

In one run: starts the dev stack, one hangout server process (WORKERS=1) and
a bare aiohttp WebSocket server (this file with ``--bare-server``: one /ws
route that only awaits messages, same heartbeat, frame limit, subprotocol
and event loop as hangout's: uvloop; ``--bare-loop asyncio`` for the
standard one). For each server in turn, opens ``--sockets`` WebSockets from
this process (raw asyncio sockets: a handshake, then only answering pings),
waits for the server to settle, and takes the VmRSS delta over its baseline
(measured after a warm-up of a few sockets opened and closed). The hangout
sockets authenticate at the upgrade with an access token each, for as many
distinct users, so each one is bound and follows its user channel.

Prints KiB per socket for both and the ratio. Target: at most 1.5.

``--compare-root PATH`` also measures the hangout code of another checkout
(e.g. ``git worktree add /tmp/main main``) in the same run, and
``--rounds N`` repeats everything N times, each hangout measurement on a
fresh process, in turns (this checkout, the other one, bare): the machine's
drift then weighs on all of them alike.
RLIMIT_NOFILE is raised to the hard limit (20,000 here); the sockets of the
two servers are open one server at a time, so neither side needs more.
All of them come from 127.0.0.1: the hangout server starts with the limits
on sockets per address and in all raised, and a long AUTH_DEADLINE_S
(loadtests/benchlib.py ``LOCAL_LIMITS``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
import json
from pathlib import Path

from loadtests.benchlib import OPS_TOKEN, ROOT, Server, Stack, access_tokens, bench_users, free_port, raise_nofile, rss_kib, stop_process, wait_http
from protocol.codec import decode, encode

SUBPROTOCOL = "hangout.v1"


# ---- the bare server --------------------------------------------------------


def run_bare_server(port: int, heartbeat: float, max_msg_size: int, loop: str) -> None:
    from aiohttp import web

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), heartbeat=heartbeat, max_msg_size=max_msg_size, compress=False)
        await ws.prepare(request)
        async for _msg in ws:
            pass
        return ws

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    kwargs = {}
    if loop == "uvloop":  # as the hangout server runs (server/__main__.py)
        import uvloop

        kwargs["loop"] = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096, **kwargs)


# ---- a minimal WebSocket client: handshake, pongs, nothing else ------------------


def _mask(payload: bytes, opcode: int) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    # The XOR of the whole payload at once, as one big integer: a loop over
    # its bytes would cost the load generator more than the frame does.
    keys = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ keys).to_bytes(n, "big")
    return head + key + masked


class IdleSocket(asyncio.Protocol):
    """One client WebSocket that stays idle: answers pings, records replies."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = asyncio.get_running_loop().create_future()
        self.replies: list = []
        self.reply_waiter: asyncio.Future | None = None
        self.closed = False
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self.upgraded.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            self.upgraded.set_result(True)
        self._frames()

    def _frames(self) -> None:
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, off = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < off + n:
                return
            payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping
                self.transport.write(_mask(payload, 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed = True
            elif opcode == 0x2:
                self.on_frame(payload)

    def on_frame(self, payload: bytes) -> None:
        """A binary frame: kept in ``replies``, and ``call`` woken."""
        self.replies.append(decode(payload))
        if self.reply_waiter is not None and not self.reply_waiter.done():
            self.reply_waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"lost before upgrade: {exc!r}"))

    async def call(self, method: str, params: dict, timeout: float = 10) -> dict:
        self.reply_waiter = asyncio.get_running_loop().create_future()
        self.transport.write(_mask(encode({"id": 1, "method": method, "params": params}), 0x2))  # type: ignore[union-attr]
        await asyncio.wait_for(self.reply_waiter, timeout)
        return self.replies.pop(0)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _handshake(port: int, token: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Protocol: {SUBPROTOCOL}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_sockets(port: int, tokens: list[str | None], concurrency: int = 100) -> list[IdleSocket]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)

    async def one(token: str | None) -> IdleSocket:
        async with sem:
            for attempt in range(5):
                try:
                    _t, proto = await loop.create_connection(lambda: IdleSocket(_handshake(port, token)), "127.0.0.1", port)
                    await asyncio.wait_for(proto.upgraded, 30)
                    return proto
                except (OSError, asyncio.TimeoutError) as exc:
                    if attempt == 4:
                        raise RuntimeError(f"could not open a socket: {exc!r}") from exc
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one(t) for t in tokens)))


async def settle(pid: int, seconds: float) -> int:
    """Wait until the RSS stops moving (or ``seconds``), return it."""
    deadline = time.monotonic() + seconds
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = rss_kib(pid)
        if abs(now - last) < 64:
            return now
        last = now
    return rss_kib(pid)


async def measure(label: str, pid: int, port: int, tokens: list[str | None], settle_s: float) -> tuple[float, list[IdleSocket]]:
    # Warm-up: the first sockets allocate lazily built state (imports,
    # caches, pools) that belongs to the process, not to each socket.
    warm = await open_sockets(port, tokens[:50])
    await asyncio.sleep(0.5)
    for s in warm:
        s.close()
    await asyncio.sleep(1.0)
    base = await settle(pid, 5)
    t0 = time.monotonic()
    socks = await open_sockets(port, tokens)
    took = time.monotonic() - t0
    after = await settle(pid, settle_s)
    lost = sum(s.closed for s in socks)
    per = (after - base) / len(socks)
    print(f"{label:<8} baseline {base / 1024:7.1f} MiB, with {len(socks)} sockets {after / 1024:7.1f} MiB "
          f"-> {per:6.2f} KiB a socket (opened in {took:.1f}s, {lost} closed since)", flush=True)
    return per, socks


def process_status(metrics: str) -> dict:
    """The bench server's /status (the socket count), with its OPS_TOKEN."""
    request = urllib.request.Request(metrics + "/status", headers={"Authorization": f"Bearer {OPS_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        (process,) = json.loads(r.read())["processes"]
        return process


async def measure_hangout(label: str, stack: Stack, root: Path, tokens: list[str | None],
                          args: argparse.Namespace) -> tuple[float, bool]:
    """One fresh hangout process from ``root``: KiB a socket, and whether
    every socket was open and authenticated."""
    server = await asyncio.to_thread(Server(stack, {"PING_INTERVAL_S": str(args.heartbeat)}, root=root).start)
    try:
        per, socks = await measure(label, server.pid, server.port, tokens, args.settle)
        ready = process_status(server.metrics)
        # Are they really authenticated? A few calls on random sockets say so.
        sample = random.sample(socks, 10)
        replies = [await s.call("users.me", {}) for s in sample]
        authed = sum("result" in r for r in replies)
        print(f"{label:<8} /status counts {ready['sockets']} sockets; users.me answered on {authed}/10 sampled sockets",
              flush=True)
        for s in socks:
            s.close()
        return per, authed == len(sample) and ready["sockets"] >= len(tokens)
    finally:
        await asyncio.to_thread(server.stop)


async def amain(args: argparse.Namespace) -> int:
    limit = raise_nofile()
    if limit < args.sockets + 200:
        print(f"RLIMIT_NOFILE is {limit}: not enough for {args.sockets} sockets", file=sys.stderr)
        return 2
    stack = await asyncio.to_thread(Stack.dev)
    users = await bench_users(stack.database_url, args.sockets + 50, "bench-conn-")
    tokens: list[str | None] = list(await access_tokens(stack.database_url, users))
    random.shuffle(tokens)
    roots = {"hangout": ROOT}
    if args.compare_root:
        roots["compared"] = Path(args.compare_root).resolve()
    results: dict[str, list[float]] = {label: [] for label in [*roots, "bare"]}
    valid = True
    for _ in range(args.rounds):
        for label, root in roots.items():
            per, ok = await measure_hangout(label, stack, root, tokens[: args.sockets], args)
            results[label].append(per)
            valid = valid and ok
        bare_port = free_port()
        bare = subprocess.Popen(
            [sys.executable, "-m", "loadtests.bench_connections", "--bare-server", str(bare_port),
             "--heartbeat", str(args.heartbeat), "--bare-loop", args.bare_loop],
            cwd=ROOT,
        )
        try:
            await asyncio.to_thread(wait_http, f"http://127.0.0.1:{bare_port}/healthz", bare)
            per, socks = await measure("bare", bare.pid, bare_port, [None] * args.sockets, args.settle)
            results["bare"].append(per)
            for s in socks:
                s.close()
        finally:
            stop_process(bare)
    bare_per = statistics.median(results["bare"])
    print()
    ratio = float("inf")
    for label in roots:
        per = statistics.median(results[label])
        ratio_of = per / bare_per if bare_per > 0 else float("inf")
        if label == "hangout":
            ratio = ratio_of
        where = "" if label == "hangout" else f" ({roots[label]})"
        rounds = f"; medians of {args.rounds} rounds" if args.rounds > 1 else ""
        print(f"memory per idle socket: {label}{where} {per:.2f} KiB, "
              f"bare aiohttp ({args.bare_loop}) {bare_per:.2f} KiB, ratio {ratio_of:.2f} (target <= 1.5){rounds}")
    if not valid:
        print("some hangout sockets were not open and authenticated: the figure is not valid", file=sys.stderr)
        return 1
    return 0 if ratio <= 1.5 else 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_connections", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=10_000)
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to wait for the RSS to settle")
    ap.add_argument("--heartbeat", type=float, default=20.0, help="ping interval of both servers")
    ap.add_argument("--bare-loop", choices=["asyncio", "uvloop"], default="uvloop",
                    help="event loop of the bare server (hangout serves on uvloop)")
    ap.add_argument("--compare-root", metavar="PATH",
                    help="also measure the hangout code of this checkout, in the same run")
    ap.add_argument("--rounds", type=int, default=1, help="measure everything this many times, in turns")
    ap.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_server:
        raise_nofile()
        run_bare_server(args.bare_server, args.heartbeat, 65536, args.bare_loop)
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
