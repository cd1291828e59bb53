"""The process's single Redis pub/sub connection.

It speaks RESP directly over one asyncio stream: subscribing is then a
non-blocking write, and reconnecting (which subscribes every followed
channel again) is entirely in our hands. On a Redis Cluster one such
connection goes to each master, speaking sharded pub/sub (``sharded``; see
server/rooms/sharded.py). What arrives goes to the hub
through three callbacks: a message, a channel whose subscriptions are all
confirmed, and the link lost (whatever was published meanwhile is missed).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable, Iterable

import hiredis

from server.outbox import RedisAddress, pack

log = logging.getLogger("hangout.rooms")

KEEPALIVE_S = 5.0  # the subscriber pings Redis this often; silent for 3 intervals = dead link
CONNECT_TIMEOUT_S = 2.0
SUBSCRIBE_CHUNK = 1000  # channels per SUBSCRIBE when subscribing again


def _cmd(*parts: bytes) -> bytes:
    return pack([parts])


class Subscriber:
    def __init__(
        self,
        redis_url: str,
        channels: Callable[[], Iterable[str]],
        on_message: Callable[[str, bytes], None],
        on_confirmed: Callable[[str], None],
        on_lost: Callable[[], None],
        *,
        node: tuple[str, int, tuple | None] | None = None,
        sharded: bool = False,
    ) -> None:
        if node is None:
            address = RedisAddress(redis_url)  # pub/sub ignores the database
            node = (address.host, address.port, address.auth)
        self._host, self._port, self._auth = node
        # Sharded pub/sub has commands and pushes of its own; one SSUBSCRIBE
        # may name only channels of one slot, so each goes alone.
        self._verbs = (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        self._kinds = (b"smessage", b"ssubscribe", b"sunsubscribe") if sharded else (b"message", b"subscribe", None)
        self._chunk = 1 if sharded else SUBSCRIBE_CHUNK
        self.on_link: Callable[[], None] | None = None  # told when ``connected`` changes
        # Sharded: told of a channel Redis unsubscribed (its slot moved to
        # another master; ours too, once unfollowed), or None for an error
        # reply (a subscription sent to a master that no longer owns it).
        self.on_dropped: Callable[[str | None], None] | None = None
        self._channels = channels  # every channel to subscribe on (re)connecting
        self._on_message = on_message
        self._on_confirmed = on_confirmed
        self._on_lost = on_lost
        self._pending: dict[str, collections.deque[asyncio.Future]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._last_rx = 0.0
        self.connected = asyncio.Event()
        self._may_connect = asyncio.Event()  # cleared by ``stay_away``
        self._may_connect.set()
        self._held: list[str] | None = None  # confirmations held by ``hold_confirmations``
        self._held_seen = asyncio.Event()

    # ---- subscriptions ---------------------------------------------------

    def subscribe(self, channel: str) -> asyncio.Future | None:
        """Returns a future that resolves True once Redis has confirmed the
        subscription (False if the link is lost first), or None when there
        is no link: the channel is subscribed on reconnect."""
        if self._writer is None:
            return None
        fut = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, collections.deque()).append(fut)
        self._write(_cmd(self._verbs[0], channel.encode()))
        return fut

    def unsubscribe(self, channel: str) -> None:
        self._write(_cmd(self._verbs[1], channel.encode()))

    def pending(self, channel: str) -> asyncio.Future | None:
        """The future of the newest unconfirmed subscription of ``channel``."""
        futs = self._pending.get(channel)
        return futs[-1] if futs else None

    def confirmed(self, channel: str) -> bool:
        """Linked, and no subscription of ``channel`` is waiting for Redis."""
        return self._writer is not None and channel not in self._pending

    def _write(self, data: bytes) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(data)
        return True

    # ---- lifecycle -------------------------------------------------------

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
        if self.on_link is not None:
            self.on_link()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._on_lost()
        for futs in self._pending.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(False)
        self._pending.clear()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            await self._may_connect.wait()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self._host, self._port), timeout=CONNECT_TIMEOUT_S
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("redis subscriber connect failed: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if not self._may_connect.is_set():  # told to stay away while connecting
                writer.close()
                continue
            backoff = 0.05
            try:
                await self._session(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                log.warning("redis subscriber connection lost: %r", exc)
            except Exception:
                # Never let live delivery die silently: log and reconnect.
                log.exception("redis subscriber failed")
                await asyncio.sleep(backoff)
            finally:
                if self._writer is writer:
                    self._drop_connection()
                else:
                    writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._auth is not None:
            writer.write(pack([self._auth]))
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                raise ConnectionError(f"redis AUTH failed: {line!r}")
        self._writer = writer
        loop = asyncio.get_running_loop()
        channels = list(self._channels())
        for channel in channels:
            fut = loop.create_future()
            self._pending.setdefault(channel, collections.deque()).append(fut)
        verb, chunk = self._verbs[0], self._chunk
        for i in range(0, len(channels), chunk):
            writer.write(_cmd(verb, *(c.encode() for c in channels[i : i + chunk])))
        self.connected.set()
        if self.on_link is not None:
            self.on_link()
        log.info("redis subscriber connected, %d channels", len(channels))
        self._last_rx = loop.time()
        pinger = asyncio.create_task(self._keepalive(writer), name="rooms-subscriber-ping")
        try:
            await self._read_pushes(reader)
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)

    async def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        """A Redis that vanished without closing the TCP connection would
        leave us subscribed to nothing, forever: ping it, and drop the link
        when it stays silent."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            if loop.time() - self._last_rx > 3 * KEEPALIVE_S:
                log.warning("redis subscriber silent for %.0f s, reconnecting", loop.time() - self._last_rx)
                writer.transport.abort()
                return
            if not writer.is_closing():
                writer.write(_cmd(b"PING"))

    async def _read_pushes(self, reader: asyncio.StreamReader) -> None:
        # hiredis parses: reading RESP line by line in Python costs more than
        # delivering the messages.
        parser = hiredis.Reader()
        read = reader.read
        deliver = self._on_message
        loop = asyncio.get_running_loop()
        message, subscribed, unsubscribed = self._kinds
        dropped = self.on_dropped
        while True:
            data = await read(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self._last_rx = loop.time()
            parser.feed(data)
            while (push := parser.gets()) is not False:
                if not isinstance(push, list):
                    if isinstance(push, hiredis.ReplyError):
                        log.error("redis subscriber error: %r", push)
                        if dropped is not None:
                            dropped(None)
                    continue
                kind = push[0]
                if kind == message:
                    deliver(push[1].decode(), push[2])
                elif kind == subscribed:
                    self._confirmed(push[1].decode())
                elif kind == unsubscribed and dropped is not None:
                    dropped(push[1].decode())

    def _confirmed(self, channel: str) -> None:
        if self._held is not None:
            self._held.append(channel)
            self._held_seen.set()
            return
        futs = self._pending.get(channel)
        if futs:
            fut = futs.popleft()
            if not fut.done():
                fut.set_result(True)
            if not futs:
                del self._pending[channel]
        if channel not in self._pending:
            self._on_confirmed(channel)

    # ---- fault injection -------------------------------------------------
    # Seams for tests that need Redis slow or away for this process alone.

    def hold_confirmations(self) -> list[str]:
        """From now on, Redis's confirmations of subscriptions are held
        back, as if Redis were slow to answer SUBSCRIBE. Returns the
        channels held so far."""
        if self._held is None:
            self._held = []
        return list(self._held)

    def release_confirmations(self) -> list[str]:
        """Pass the held confirmations on, in the order they came, and stop
        holding. Returns their channels."""
        held, self._held = self._held or [], None
        for channel in held:
            self._confirmed(channel)
        return held

    async def confirmation_held(self, channel: str) -> list[str]:
        """Returns, with the channels held, once a confirmation of
        ``channel`` is held."""
        while self._held is None or channel not in self._held:
            self._held_seen.clear()
            await self._held_seen.wait()
        return list(self._held)

    def stay_away(self, away: bool) -> None:
        """With ``away``, drop the link and make no other until called
        without: Redis is away for this process's subscriptions alone
        (publishing goes through the outbox, unaffected). ``connected``
        clears once the link is down."""
        if not away:
            self._may_connect.set()
            return
        self._may_connect.clear()
        if self._writer is not None:
            self._writer.transport.abort()
