"""Chat test helpers: a conversation between two fresh users, and collecting
``chat.message`` events by seq.

A conversation exists for every confirmed booking. ``open_room`` books
through the API when ``bookings.create`` is served (verified booker with a
top-up, verified host with a price); before it landed it inserted a confirmed
booking and its conversation directly. Both paths give the same ``Room``.
"""

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

import asyncpg

from protocol.client import Client
from protocol.codec import decode, encode
from protocol.errors import ErrorCode, RpcError
from tests.conftest import ServerProcess, register, verified_user

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


_booking_api: bool | None = None  # learnt on first use


def _next_slot() -> dt.datetime:
    """A whole hour in the coming weeks that no earlier room of this run used
    (a booker may book several hosts)."""
    start = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    return start + dt.timedelta(hours=2 + next(_hours) % 2000)


_hours = itertools.count(int.from_bytes(os.urandom(2), "big") % 2000)


async def _book_through_api(booker_server: ServerProcess, host_server: ServerProcess, booker: Party | None) -> Room | None:
    """None when this server has no bookings.create yet."""
    host_client, host_session = await verified_user(host_server, price=PRICE, name="Host")
    if booker is None:
        booker_client, booker_session = await verified_user(booker_server, name="Booker")
        booker = Party(booker_client, booker_session["user"]["id"], booker_session["access_token"])
        await booker_client.call("wallet.topup", {"amount": "100.00", "idempotency_key": uuid.uuid4().hex})
    try:
        start = _next_slot()
        result = await booker.client.call("bookings.create", {
            "host_id": host_session["user"]["id"], "start_at": start.isoformat(),
            "end_at": (start + dt.timedelta(hours=1)).isoformat(), "idempotency_key": uuid.uuid4().hex,
        })
    except RpcError as err:
        if err.code in (ErrorCode.UNKNOWN_METHOD,):
            await booker.close()
            await host_client.close()
            return None
        raise
    booking = result["booking"]
    return Room(
        conversation_id=booking["conversation_id"],
        booking_id=booking["id"],
        booker=booker,
        host=Party(host_client, host_session["user"]["id"], host_session["access_token"]),
    )


async def _book_in_database(db: asyncpg.Pool, booker_server: ServerProcess, host_server: ServerProcess, booker: Party | None) -> Room:
    if booker is None:
        booker_client = await booker_server.connect()
        session = await register(booker_client, name="Booker")
        booker = Party(booker_client, session["user"]["id"], session["access_token"])
    host_client = await host_server.connect()
    host = await register(host_client, name="Host")
    start = _next_slot()
    async with db.acquire() as conn, conn.transaction():
        booking_id = await conn.fetchval(
            """INSERT INTO bookings (user_id, host_id, start_at, end_at, idempotency_key, status, amount)
               VALUES ($1, $2, $3, $4, $5, 'confirmed', 10.00) RETURNING id""",
            uuid.UUID(booker.user_id), uuid.UUID(host["user"]["id"]), start,
            start + dt.timedelta(hours=1), uuid.uuid4().hex,
        )
        conversation_id = await conn.fetchval(
            "INSERT INTO conversations (booking_id, user_id, host_id) VALUES ($1, $2, $3) RETURNING id",
            booking_id, uuid.UUID(booker.user_id), uuid.UUID(host["user"]["id"]),
        )
    return Room(
        conversation_id=str(conversation_id),
        booking_id=str(booking_id),
        booker=booker,
        host=Party(host_client, host["user"]["id"], host["access_token"]),
    )


async def open_room(
    db: asyncpg.Pool, booker_server: ServerProcess, host_server: ServerProcess | None = None, booker: Party | None = None
) -> Room:
    """A confirmed booking's conversation between a booker (fresh, with a
    socket on ``booker_server``, unless given) and a fresh host (on
    ``host_server``)."""
    global _booking_api
    host_server = host_server or booker_server
    if _booking_api is not False:
        room = await _book_through_api(booker_server, host_server, booker)
        _booking_api = room is not None
        if room is not None:
            return room
    return await _book_in_database(db, booker_server, host_server, booker)


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
    seqs: list[int] = []

    async def run() -> None:
        while True:
            name, data = await client.events.get()
            if name == "chat.message":
                seqs.append(data["message"]["seq"])
                if data["message"]["seq"] == seq:
                    return

    await asyncio.wait_for(run(), timeout)
    return seqs


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
