"""Chat test helpers: a conversation between two fresh users (a confirmed
booking made through the API: a conversation exists for every one; the
``room`` fixture), sending and collecting ``chat.message`` events by seq,
Redis subscriber counts, an error a call must answer, and a raw WebSocket
that can stop reading."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import os
import socket
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from protocol.client import Client
from protocol.codec import decode, encode
from protocol.errors import ErrorCode, RpcError
from tests.conftest import ServerProcess, verified_user

PRICE = "10.00"


@dataclass
class Party:
    client: Client
    user_id: str
    access_token: str
    extra: list[Client] = field(default_factory=list)

    async def socket(self, server: ServerProcess) -> Client:
        """Another socket of the same user, on ``server``."""
        c = await server.connect(access_token=self.access_token)
        self.extra.append(c)
        return c

    async def close(self) -> None:
        for c in [self.client, *self.extra]:
            await c.close()


@dataclass
class Room:
    conversation_id: str
    booking_id: str
    booker: Party
    host: Party

    async def close(self) -> None:
        await self.booker.close()
        await self.host.close()


def _next_slot() -> dt.datetime:
    """A whole hour in the coming weeks that no earlier room of this run used
    (a booker may book several hosts)."""
    start = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    return start + dt.timedelta(hours=2 + next(_hours) % 2000)


_hours = itertools.count(int.from_bytes(os.urandom(2), "big") % 2000)


async def open_room(booker_server: ServerProcess, host_server: ServerProcess | None = None, booker: Party | None = None) -> Room:
    """A confirmed booking's conversation, booked through the API: a fresh
    verified host with a price (socket on ``host_server``) booked by
    ``booker`` or a fresh verified booker with a top-up (on ``booker_server``)."""
    host_client, host_session = await verified_user(host_server or booker_server, price=PRICE, name="Host")
    if booker is None:
        booker_client, booker_session = await verified_user(booker_server, name="Booker")
        booker = Party(booker_client, booker_session["user"]["id"], booker_session["access_token"])
        await booker_client.call("wallet.topup", {"amount": "100.00", "idempotency_key": uuid.uuid4().hex})
    start = _next_slot()
    result = await booker.client.call("bookings.create", {
        "host_id": host_session["user"]["id"], "start_at": start.isoformat(),
        "end_at": (start + dt.timedelta(hours=1)).isoformat(), "idempotency_key": uuid.uuid4().hex,
    })
    booking = result["booking"]
    assert booking["status"] == "confirmed" and booking["conversation_id"], booking
    return Room(
        conversation_id=booking["conversation_id"],
        booking_id=booking["id"],
        booker=booker,
        host=Party(host_client, host_session["user"]["id"], host_session["access_token"]),
    )


@pytest.fixture
async def room(server):
    """A conversation between a fresh booker and host, both on ``server``."""
    r = await open_room(server)
    yield r
    await r.close()


async def expect_error(code: ErrorCode, call) -> RpcError:
    """The error ``call`` (an awaitable) must answer."""
    with pytest.raises(RpcError) as info:
        await call
    assert info.value.code is code, info.value
    return info.value


# ---- events ----------------------------------------------------------------


async def collect_messages(client: Client, count: int, *, timeout: float = 30.0) -> list[int]:
    """Seqs of the next ``count`` chat.message events, in arrival order
    (other events are skipped)."""
    seqs: list[int] = []

    async def run() -> None:
        while len(seqs) < count:
            name, data = await client.events.get()
            if name == "chat.message":
                seqs.append(data["message"]["seq"])

    await asyncio.wait_for(run(), timeout)
    return seqs


async def messages_until(client: Client, seq: int, *, timeout: float = 30.0) -> list[int]:
    """Seqs of chat.message events up to and including the one with ``seq``."""
    return [data["message"]["seq"] for name, data in await events_until_message(client, seq, timeout=timeout)
            if name == "chat.message"]


async def events_until_message(client: Client, seq: int, *, timeout: float = 30.0) -> list[tuple[str, dict]]:
    """Every event (name, data) up to and including the chat.message with ``seq``."""
    events: list[tuple[str, dict]] = []

    async def run() -> None:
        while True:
            name, data = await client.events.get()
            events.append((name, data))
            if name == "chat.message" and data["message"]["seq"] == seq:
                return

    await asyncio.wait_for(run(), timeout)
    return events


async def send_many(
    client: Client, conversation_id: str, count: int, *, prefix: str = "m", in_flight: int = 32, size: int = 0, fill: str = "."
) -> list[dict]:
    """``count`` chat.send calls pipelined on one socket (at most
    ``in_flight`` at once, the server's limit); returns the messages. With
    ``size``, each content is padded to that many characters of ``fill``."""
    gate = asyncio.Semaphore(in_flight)

    async def one(i: int) -> dict:
        async with gate:
            content = f"{prefix}{i}".ljust(size, fill) if size else f"{prefix}{i}"
            return (await client.call("chat.send", {"conversation_id": conversation_id, "content": content}))["message"]

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def subscriber_count(redis: Any, channel: str) -> int:
    if isinstance(redis, RedisCluster):  # sharded channels, counted on their master
        await redis.initialize()
        reply = await redis.execute_command("PUBSUB", "SHARDNUMSUB", channel,
                                            target_nodes=redis.get_node_from_key(channel))
        return dict(zip(reply[::2], reply[1::2])).get(channel.encode(), 0)
    return dict(await redis.pubsub_numsub(channel)).get(channel.encode(), 0)


async def wait_subscribers(redis: Any, channel: str, expected: int, *, timeout: float = 5.0) -> None:
    """Redis applies (UN)SUBSCRIBE after the call that caused it answered;
    poll its count, bounded (there is no event to await outside the server)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (n := await subscriber_count(redis, channel)) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{channel}: {n} subscribers, expected {expected}")
        await asyncio.sleep(0.01)


# ---- a raw WebSocket client that can stop reading ----------------------------


class RawSocket:
    """A WebSocket spoken by hand over a TCP socket with a tiny receive
    buffer, so that when it stops reading the server's sends really block
    (a library client would keep reading into its own buffers)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self._ids = 0

    @classmethod
    async def connect(cls, server: ServerProcess, access_token: str, rcvbuf: int = 4096) -> "RawSocket":
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        # Each write leaves at once: with Nagle, a small frame written while an
        # earlier one is unacknowledged waits for the server's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: hangout.v1\r\n"
            f"Authorization: Bearer {access_token}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        raw = cls(sock)
        while b"\r\n\r\n" not in raw.buf:
            raw.buf += await raw._recv()
        head, raw.buf = raw.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        return raw

    async def _recv(self) -> bytes:
        chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), 10)
        if not chunk:
            raise ConnectionError("eof")
        return chunk

    async def send_frames(self, frames: list[tuple[int, bytes]]) -> None:
        """Write client frames ``(opcode, payload)`` in one TCP write, so that
        the server reads them together."""
        out = b""
        for opcode, payload in frames:
            mask = os.urandom(4)
            size = len(payload)
            length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size)
            out += bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await asyncio.get_running_loop().sock_sendall(self.sock, out)

    async def call(self, method: str, params: dict) -> dict:
        self._ids += 1
        payload = encode({"id": self._ids, "method": method, "params": params})
        mask = os.urandom(4)
        header = bytes([0x82]) + (bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + struct.pack("!H", len(payload)))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await asyncio.get_running_loop().sock_sendall(self.sock, header + mask + masked)
        while True:
            opcode, data = await self.frame()
            if opcode == 2:
                frame = decode(data)
                if frame.get("id") == self._ids:
                    return frame

    async def frame(self) -> tuple[int, bytes]:
        """The next frame (opcode, payload)."""
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            self.buf += await self._recv()

    def _parse(self) -> tuple[int, bytes] | None:
        b = self.buf
        if len(b) < 2:
            return None
        opcode, size, at = b[0] & 0x0F, b[1] & 0x7F, 2
        if size == 126:
            if len(b) < 4:
                return None
            size, at = struct.unpack("!H", b[2:4])[0], 4
        elif size == 127:
            if len(b) < 10:
                return None
            size, at = struct.unpack("!Q", b[2:10])[0], 10
        if len(b) < at + size:
            return None
        self.buf = b[at + size:]
        return opcode, b[at:at + size]

    async def close_code(self) -> int | None:
        """Read everything that is left; the code of the close frame at its
        end, or None if the stream ended without one."""
        try:
            while True:
                opcode, data = await self.frame()
                if opcode == 8:
                    return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
        except (ConnectionError, OSError):
            return None

    def close(self) -> None:
        self.sock.close()
