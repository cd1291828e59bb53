"""Redis commands of the whole process, one pipeline per event-loop turn.

After a write commits, a call records its write position for read-your-writes
(server/db/positions.py) and publishes its events (server/rooms/hub.py).
Sent call by call, that would be two round trips per call, each a socket
write and a read on a loaded loop. ``submit`` instead queues a group of
commands; every group queued during one turn of the loop goes to Redis as
one pipeline, so concurrent calls share a round trip, and a call that queues
its position and its events in the same turn has both sent in order (the
position first, so a client that reads on an event finds the write).

The outbox has one connection of its own (one per master on a Redis Cluster,
server/outbox_cluster.py) and speaks RESP on it directly
(hiredis packs the commands and parses the replies): redis-py's pipeline
spends CPU on every argument and reply (encoding, a timeout and a callback
each), on the path of every write. Replies come back as Redis sent them
(``b"OK"``, ints, bytes), without redis-py's conversions.

At most ``max_in_flight`` pipelines are in flight; groups queued meanwhile
wait for the next one (on the same connection: Redis answers in order).
Redis errors, timeouts and a closed outbox end a group's future with the
exception; an error reply to one command is returned in its place in the
results, as a ``redis.exceptions.ResponseError``.

Redis that hangs instead of refusing: every pipeline would wait out the
socket timeout, and so would every call behind it. After a pipeline fails
on a timeout or a lost connection, the outbox is ``available = False``:
``submit`` fails at once with ``RedisUnavailable`` and nothing is sent,
until a probe (a ``PUBLISH`` to a channel nobody follows, the kind of
command the outbox sends, every ``probe_interval_s``) is answered. Before it
opens again it runs ``on_recovered`` (server/db/positions.py raises the floor of
every write position, since the ones not recorded meanwhile are lost).
Calls still commit while it is closed: PostgreSQL has every change, and
clients catch up from it (``since_seq``, lists) as they do after a Redis
restart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import unquote, urlparse

import hiredis
import redis.exceptions

log = logging.getLogger("hangout.outbox")

Command = tuple[Any, ...]


class OutboxClosed(ConnectionError):
    pass


class RedisUnavailable(redis.exceptions.ConnectionError):
    """Not sent: Redis failed recently and has not answered a probe since."""


# Failures that say Redis (or the way to it) is not answering, as opposed to
# an error reply to one command. redis-py's cluster client says so with
# errors of its own: no node reachable, or the cluster's state not ok.
CLUSTER_DOWN = (redis.exceptions.RedisClusterException, redis.exceptions.ClusterDownError)
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, asyncio.TimeoutError,
               *CLUSTER_DOWN)
PROBE_CHANNEL = "hangout:probe"


def pack(commands: Sequence[Command]) -> bytes:
    """RESP for ``commands``; arguments are bytes, str, int or float."""
    return b"".join(map(hiredis.pack_command, commands))


class RedisAddress:
    """Where ``REDIS_URL`` points, for the connections of our own (the outbox
    here, the subscriber in server/rooms/subscriber.py): host, port, the ``AUTH``
    to send first (or None) and the database to ``SELECT`` (or None)."""

    __slots__ = ("host", "port", "auth", "db")

    def __init__(self, redis_url: str) -> None:
        url = urlparse(redis_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 6379
        user, password = unquote(url.username or ""), unquote(url.password or "")
        self.auth: Command | None = ("AUTH", *([user] if user else []), password) if password else None
        self.db = int(url.path[1:]) if url.path[1:] else None


class _Batch:
    __slots__ = ("expected", "replies", "future")

    def __init__(self, expected: int, future: "asyncio.Future[list[Any]]") -> None:
        self.expected = expected
        self.replies: list[Any] = []
        self.future = future


class _Wire(asyncio.Protocol):
    """One connection to Redis; replies are matched to batches in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = hiredis.Reader(replyError=redis.exceptions.ResponseError)
        self._waiting: collections.deque[_Batch] = collections.deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, expected: int) -> "asyncio.Future[list[Any]]":
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            fut.set_exception(redis.exceptions.ConnectionError("redis connection closed"))
            return fut
        self._waiting.append(_Batch(expected, fut))
        self.transport.write(data)
        return fut

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        while True:
            try:
                reply = parser.gets()
            except hiredis.ProtocolError as exc:
                self.abort(redis.exceptions.ConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not self._waiting:
                self.abort(redis.exceptions.ConnectionError(f"unexpected reply from redis: {reply!r}"))
                return
            batch = self._waiting[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.expected:
                self._waiting.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis.exceptions.ConnectionError(f"redis connection lost: {exc!r}" if exc else "redis closed the connection"))

    def abort(self, exc: BaseException) -> None:
        """Close the connection (its replies can no longer be matched) and
        fail everything still waiting on it."""
        if self.transport is not None:
            self.transport.abort()
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        while self._waiting:
            fut = self._waiting.popleft().future
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()


class Outbox:
    def __init__(self, redis_url: str, timeout_s: float = 2.0, max_in_flight: int = 2,
                 probe_interval_s: float = 0.5) -> None:
        self._hello: list[Command] = []  # sent first on every connection
        self._address(redis_url)
        self._timeout = timeout_s
        self._wire: _Wire | None = None
        self._connecting: asyncio.Lock | None = None
        self._max = max_in_flight
        self._probe_interval_s = probe_interval_s
        self._queue: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._scheduled = False
        self._running: set[asyncio.Task] = set()
        self._closed = False
        self._probe: asyncio.Task | None = None
        self._answering = asyncio.Event()
        self._answering.set()
        self.on_recovered: Callable[[], Awaitable[None]] | None = None
        self.on_open: list[Callable[[], None]] = []  # called once it sends again
        self.pipelines = 0  # sent, for tests
        self.outages = 0  # times it closed, for tests and /readyz

    def _address(self, redis_url: str) -> None:
        address = RedisAddress(redis_url)
        self._host, self._port = address.host, address.port
        self._hello = [
            *([address.auth] if address.auth else []),
            *([("SELECT", address.db)] if address.db is not None else []),
        ]

    def submit(self, commands: Sequence[Command]) -> "asyncio.Future[list[Any]]":
        """Queue ``commands`` (each ``(name, *args)``); the future gets their
        replies, in order, once the pipeline that carries them is answered."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        if self._closed:
            fut.set_exception(OutboxClosed("redis outbox closed"))
            return fut
        if not self.available:
            fut.set_exception(RedisUnavailable("redis is not answering"))
            fut.exception()  # nobody has to look
            return fut
        self._queue.append((commands, fut))
        self._schedule(loop)
        return fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._queue and len(self._running) < self._max:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._closed or not self._queue or len(self._running) >= self._max:
            return
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch), name="redis-outbox")
        self._running.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not self._closed:
            self._schedule(asyncio.get_running_loop())

    async def _connected(self) -> _Wire:
        wire = self._wire
        if wire is not None and not wire.closed:
            return wire
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            wire = self._wire
            if wire is not None and not wire.closed:
                return wire
            self._wire = wire = await open_wire(self._host, self._port, self._hello, self._timeout)
            return wire

    async def _roundtrip(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` and wait for their replies, at most the timeout."""
        if not commands:
            return []
        return await exchange(await self._connected(), commands, self._timeout)

    async def _probe_once(self) -> None:
        await self._roundtrip([("PUBLISH", PROBE_CHANNEL, b"")])

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        try:
            results = await self._roundtrip([command for commands, _ in batch for command in commands])
        except asyncio.CancelledError:
            _fail(batch, OutboxClosed("redis outbox closed"))
            raise
        except Exception as exc:
            if isinstance(exc, UNREACHABLE):
                self.unreachable(exc)
            _fail(batch, exc)
            return
        self.pipelines += 1
        i = 0
        for commands, fut in batch:
            if not fut.done():  # the caller may have given up
                fut.set_result(results[i : i + len(commands)])
            i += len(commands)

    @property
    def available(self) -> bool:
        """False from a failure to reach Redis until a probe is answered."""
        return self._answering.is_set()

    async def wait_available(self) -> None:
        await self._answering.wait()

    def unreachable(self, exc: BaseException) -> None:
        """Redis did not answer (here or in another user of the same Redis,
        such as the read-your-writes look-ups): stop sending until a probe
        is answered."""
        if not self.available or self._closed:
            return
        self._answering.clear()
        self.outages += 1
        log.warning("redis not answering (%r): calls stop waiting for it until it answers a probe", exc)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_answered(), name="redis-probe")

    async def _probe_until_answered(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                await self._probe_once()
                if self.on_recovered is not None:
                    await self.on_recovered()
            except Exception as exc:  # still away (or PostgreSQL is): probe again
                log.debug("redis probe failed: %r", exc)
                continue
            log.warning("redis answers again")
            self._answering.set()
            for callback in self.on_open:
                callback()
            self._schedule(asyncio.get_running_loop())
            return

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self._abort_wires(OutboxClosed("redis outbox closed"))
        batch, self._queue = self._queue, []
        _fail(batch, OutboxClosed("redis outbox closed"))

    def _abort_wires(self, exc: BaseException) -> None:
        if self._wire is not None:
            self._wire.abort(exc)


async def open_wire(host: str, port: int, hello: Sequence[Command], timeout_s: float) -> _Wire:
    """A new connection to ``host:port`` that has sent ``hello`` (AUTH,
    SELECT) and had it accepted."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, wire = await loop.create_connection(_Wire, host, port)
        if hello:
            for reply in await wire.send(pack(hello), len(hello)):
                if isinstance(reply, Exception):
                    wire.abort(reply)
                    raise redis.exceptions.ConnectionError(f"redis refused the connection: {reply}")
    return wire


async def exchange(wire: _Wire, commands: Sequence[Command], timeout_s: float) -> list[Any]:
    """Send ``commands`` on ``wire`` and wait for their replies, at most
    ``timeout_s`` (then the connection is dropped: its replies could no
    longer be matched)."""
    replies = wire.send(pack(commands), len(commands))
    try:
        async with asyncio.timeout(timeout_s):
            return await replies
    except TimeoutError:
        exc = redis.exceptions.TimeoutError(f"no reply from redis within {timeout_s} s")
        wire.abort(exc)
        raise exc from None


def _fail(batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]], exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
            # Mark it retrieved: a caller that went away must not leave
            # "exception never retrieved" behind.
            fut.exception()
