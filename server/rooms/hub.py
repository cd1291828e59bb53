"""Channel registry and the process's single Redis pub/sub connection.

Channels: ``u:<user id>`` for events about a user, ``c:<conversation id>``
for a chat room. Local sockets follow channels; the process subscribes on a
channel's first local follower and unsubscribes after its last. A published
payload is a 16-byte envelope (the user to skip, or zeros) followed by the
already-encoded event frame, so receiving processes forward bytes as they are.

The subscriber speaks RESP directly over one asyncio stream: subscribing is
then a non-blocking write, and reconnecting (which re-subscribes every
channel) is entirely in our hands.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

import redis.asyncio as aioredis
import redis.exceptions

if TYPE_CHECKING:
    pass

log = logging.getLogger("hangout.rooms")

NO_ONE = bytes(16)


class Follower(Protocol):
    user_id: uuid.UUID | None

    def send_event(self, frame: bytes) -> None: ...


def _cmd(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class Hub:
    def __init__(self, redis_url: str, publisher: aioredis.Redis) -> None:
        url = urlparse(redis_url)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or 6379
        self._password = url.password
        self._username = url.username
        self.publisher = publisher
        self._followers: dict[str, set[Follower]] = {}
        self._channels_of: dict[Follower, set[str]] = {}
        self._pending: dict[str, collections.deque[asyncio.Future]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.delivered = 0

    # ---- naming ----------------------------------------------------------

    @staticmethod
    def user_channel(user_id: uuid.UUID) -> str:
        return f"u:{user_id}"

    @staticmethod
    def conversation_channel(conversation_id: uuid.UUID) -> str:
        return f"c:{conversation_id}"

    # ---- local registry --------------------------------------------------

    def follow(self, follower: Follower, channel: str) -> asyncio.Future | None:
        """Add a follower. Returns a future that resolves once Redis has
        confirmed the subscription (None when it already was in effect)."""
        self._channels_of.setdefault(follower, set()).add(channel)
        followers = self._followers.get(channel)
        if followers is not None:
            followers.add(follower)
            pending = self._pending.get(channel)
            return pending[-1] if pending else None
        self._followers[channel] = {follower}
        return self._send_subscribe(channel)

    def unfollow(self, follower: Follower, channel: str) -> None:
        chans = self._channels_of.get(follower)
        if chans is not None:
            chans.discard(channel)
            if not chans:
                del self._channels_of[follower]
        followers = self._followers.get(channel)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            del self._followers[channel]
            self._write(_cmd(b"UNSUBSCRIBE", channel.encode()))

    def unfollow_all(self, follower: Follower) -> None:
        for channel in list(self._channels_of.get(follower, ())):
            self.unfollow(follower, channel)

    forget = unfollow_all

    def follows(self, follower: Follower, channel: str) -> bool:
        return channel in self._channels_of.get(follower, ())

    @property
    def channel_count(self) -> int:
        return len(self._followers)

    # ---- publishing ------------------------------------------------------

    async def publish(self, channel: str, frame: bytes, skip_user: uuid.UUID | None = None) -> bool:
        """Publish after commit. Never raises: with Redis down the change is
        already durable and clients recover it from PostgreSQL."""
        envelope = (skip_user.bytes if skip_user is not None else NO_ONE) + frame
        try:
            await self.publisher.publish(channel, envelope)
            return True
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("publish to %s failed: %r", channel, exc)
            return False

    # ---- subscriber connection -------------------------------------------

    def _write(self, data: bytes) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(data)
        return True

    def _send_subscribe(self, channel: str) -> asyncio.Future | None:
        if self._writer is None:
            return None  # subscribed on (re)connect
        fut = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, collections.deque()).append(fut)
        self._write(_cmd(b"SUBSCRIBE", channel.encode()))
        return fut

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rooms-subscriber")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._drop_connection()

    def _drop_connection(self) -> None:
        self.connected.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for futs in self._pending.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(False)
        self._pending.clear()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self._host, self._port), timeout=2.0
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("redis subscriber connect failed: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            try:
                await self._session(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                log.warning("redis subscriber connection lost: %r", exc)
            finally:
                if self._writer is writer:
                    self._drop_connection()
                else:
                    writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._password:
            auth = [b"AUTH"] + ([self._username.encode()] if self._username else []) + [self._password.encode()]
            writer.write(_cmd(*auth))
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                raise ConnectionError(f"redis AUTH failed: {line!r}")
        self._writer = writer
        loop = asyncio.get_running_loop()
        channels = list(self._followers)
        for channel in channels:
            fut = loop.create_future()
            self._pending.setdefault(channel, collections.deque()).append(fut)
        # Even with no channels, a PING proves the link before we call it up.
        if channels:
            for i in range(0, len(channels), 1000):
                writer.write(_cmd(b"SUBSCRIBE", *(c.encode() for c in channels[i : i + 1000])))
        self.connected.set()
        log.info("redis subscriber connected, %d channels", len(channels))
        await self._read_pushes(reader)

    async def _read_pushes(self, reader: asyncio.StreamReader) -> None:
        readline = reader.readline
        readexactly = reader.readexactly
        while True:
            header = await readline()
            if not header:
                raise ConnectionError("redis closed the connection")
            if header[:1] != b"*":
                if header[:1] == b"-":
                    log.error("redis subscriber error: %r", header)
                continue
            count = int(header[1:])
            parts: list[bytes | int] = []
            for _ in range(count):
                line = await readline()
                kind = line[:1]
                if kind == b"$":
                    size = int(line[1:])
                    parts.append((await readexactly(size + 2))[:-2])
                elif kind == b":":
                    parts.append(int(line[1:]))
                else:
                    raise ValueError(f"unexpected RESP line {line!r}")
            kind = parts[0]
            if kind == b"message":
                self._deliver(parts[1].decode(), parts[2])  # type: ignore[union-attr,arg-type]
            elif kind == b"subscribe":
                futs = self._pending.get(parts[1].decode())  # type: ignore[union-attr]
                if futs:
                    fut = futs.popleft()
                    if not fut.done():
                        fut.set_result(True)
                    if not futs:
                        del self._pending[parts[1].decode()]  # type: ignore[union-attr]

    def _deliver(self, channel: str, payload: bytes) -> None:
        followers = self._followers.get(channel)
        if not followers:
            return
        skip = payload[:16]
        frame = payload[16:]
        if skip == NO_ONE:
            for f in list(followers):
                f.send_event(frame)
        else:
            skip_user = uuid.UUID(bytes=skip)
            for f in list(followers):
                if f.user_id != skip_user:
                    f.send_event(frame)
        self.delivered += 1
