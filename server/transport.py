"""A WebSocket's transport: the aiohttp socket set up as the contract wants
(``websocket_response``), then reading frames, writing them, closing with a code.

The transport owns one task, the writer, for the life of the socket; it is
cancelled and awaited in ``finish``. Replies and events share one outgoing
queue drained by the writer; only event bytes count toward
``OUTGOING_QUEUE_MAX_BYTES``, since replies are bounded by the in-flight
limit instead: with that many replies queued, the socket's frames are not
read until the peer takes some (a client that sends without reading cannot
queue replies without bound, and replies are never dropped).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Any, Callable, Coroutine

from aiohttp import WSCloseCode, WSMsgType, web

from protocol.codec import SUBPROTOCOL
from server.config import Config
from server.metrics import TALLY

log = logging.getLogger("hangout.socket")

SLOW_PEER_CLOSE_S = 10.0  # how long a 1013 close frame may wait for a stalled peer

Spawn = Callable[[Coroutine[Any, Any, Any]], asyncio.Task]


def websocket_response(config: Config) -> web.WebSocketResponse:
    """aiohttp's side of a new socket, set up as the contract wants it."""
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        # Pings are the transport's own (``Transport._ping_due``): aiohttp's
        # heartbeat gives a client half an interval to answer, the contract a
        # whole one. So the reader sees pings and pongs, and answers pings.
        autoping=False,
        # aiohttp refuses a message of max_msg_size bytes or more; the
        # contract accepts one of exactly MAX_FRAME_BYTES.
        max_msg_size=config.max_frame_bytes + 1,
        compress=False,
        # A text frame closes with 1003 whatever it holds; decoded, one that
        # is not UTF-8 would be closed by aiohttp with 1007 first.
        decode_text=False,
    )
    return ws


class Transport:
    def __init__(self, ws: web.WebSocketResponse, request: web.Request, config: Config, *,
                 spawn: Spawn, on_stop: Callable[[], None]) -> None:
        self.ws = ws
        self.request = request
        self.id = uuid.uuid4()
        self._max_replies = config.max_in_flight
        self._max_event_bytes = config.outgoing_queue_max_bytes
        self._ping_interval = config.ping_interval_s
        self._heard = False  # the peer sent something since the last ping check
        self._pinged = False  # a ping went out and nothing came back since
        self._ping_due = False  # the writer sends a ping before its queue
        self._ping_timer: asyncio.TimerHandle | None = None
        self._spawn = spawn  # runs a close frame's send when the caller cannot wait
        self._on_stop = on_stop  # nothing more is queued from now on (see _stop_output)
        self.closing = False
        self._out: collections.deque[tuple[bytes, bool]] = collections.deque()  # (frame, is_event)
        self._out_event_bytes = 0
        self._out_replies = 0  # replies queued and not yet handed to the transport
        self.replies = 0  # replies queued over the socket's life
        self._replies_room = asyncio.Event()
        self._replies_room.set()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._close_code: int | None = None
        self._flushed: asyncio.Future | None = None  # see flush
        self._close_task: asyncio.Task | None = None  # sends the close frame, after the queued replies
        self._serve_task: asyncio.Task | None = None  # runs the reader, then the socket's teardown
        self._sending = False  # the writer is inside send_bytes

    # ---- reading ---------------------------------------------------------

    async def serve(self, on_frame: Callable[[bytes], None]) -> None:
        """Start the writer and hand every binary frame to ``on_frame`` until
        the peer goes or the socket closes. The caller then tears the socket
        down, ending with ``finish``."""
        self._serve_task = asyncio.current_task()
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")
        self._ping_timer = asyncio.get_running_loop().call_later(self._ping_interval, self._check_peer)
        ws = self.ws
        async for msg in ws:
            self._heard = True  # any frame counts as an answer to a ping
            if msg.type is WSMsgType.BINARY:
                on_frame(msg.data)
            elif msg.type is WSMsgType.PING:
                try:
                    await ws.pong(msg.data)
                except (ConnectionError, RuntimeError):
                    return
            elif msg.type is WSMsgType.PONG:
                pass
            elif msg.type is WSMsgType.TEXT:
                await self.close(WSCloseCode.UNSUPPORTED_DATA, "binary frames only")
                return
            elif msg.type is WSMsgType.ERROR:
                exc = ws.exception()
                if getattr(exc, "code", None) == WSCloseCode.MESSAGE_TOO_BIG or "too big" in str(exc).lower():
                    await self.close(WSCloseCode.MESSAGE_TOO_BIG, "frame too large")
                return
            if self.closing:
                return
            if not self._replies_room.is_set():
                await self._replies_room.wait()
            if self.closing or self._writer_stopped:
                return  # (a writer that stopped means the peer is gone)

    def _check_peer(self) -> None:
        """Every ping interval: a peer silent for a whole interval is pinged,
        and one still silent an interval after its ping is gone (the
        connection is cut, as a dead peer cannot take a close frame)."""
        if self.closing:
            return
        if self._heard:
            self._heard = self._pinged = False
        elif not self._pinged:
            self._pinged = self._ping_due = True
            self._wake.set()
        else:
            log.info("socket %s: no answer to a ping within %.0fs, dropping it", self.id, self._ping_interval)
            if self.request.transport is not None:
                self.request.transport.abort()
            return
        self._ping_timer = asyncio.get_running_loop().call_later(self._ping_interval, self._check_peer)

    @property
    def reading_paused(self) -> bool:
        """The socket's frames are not read until the peer takes replies."""
        return not self._replies_room.is_set()

    # ---- writing ---------------------------------------------------------

    @property
    def _writer_stopped(self) -> bool:
        """Nothing more can be written (the peer is gone): nobody may wait for the writer."""
        return self._writer is not None and self._writer.done()

    @property
    def queued_replies(self) -> int:
        """Replies queued and not yet handed to the transport."""
        return self._out_replies

    def send_reply(self, frame: bytes) -> None:
        if self.closing:
            return
        self._out.append((frame, False))
        self.replies += 1
        self._out_replies += 1
        if self._out_replies >= self._max_replies and not self._writer_stopped:
            self._replies_room.clear()
        self._wake.set()

    def send_event(self, frame: bytes) -> None:
        """Queue an encoded event; never waits. Overflow closes with 1013."""
        if self.closing:
            return
        self._out_event_bytes += len(frame)
        # Over the bound while the writer waits for the peer to take bytes: the
        # peer is not reading. (A burst delivered within one loop turn, before
        # the writer has run at all, is not the peer's doing.)
        if self._sending and self._out_event_bytes > self._max_event_bytes:
            log.info("socket %s: outgoing queue over bound, closing 1013", self.id)
            TALLY.slow_closes += 1
            self.close_soon(WSCloseCode.TRY_AGAIN_LATER, "outgoing queue full")  # a burst must not queue more
            return
        self._out.append((frame, True))
        TALLY.events_out += 1
        self._wake.set()

    async def _write_loop(self) -> None:
        out = self._out
        ws = self.ws
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._ping_due:
                    self._ping_due = False
                    try:
                        await ws.ping()
                    except (ConnectionError, RuntimeError):
                        return
                while out:
                    frame, is_event = out.popleft()
                    if is_event:
                        self._out_event_bytes -= len(frame)
                    # Only observable by others while send_bytes is suspended,
                    # i.e. waiting for the transport to drain.
                    self._sending = True
                    try:
                        await ws.send_bytes(frame)
                    except (ConnectionError, RuntimeError):
                        return
                    finally:
                        self._sending = False
                    if not is_event:
                        self._out_replies -= 1
                        if self._out_replies < self._max_replies:
                            self._replies_room.set()
                if self._flushed is not None and not self._flushed.done():
                    self._flushed.set_result(None)
        finally:
            # Stopped (the peer is gone): nothing more will be written, so
            # neither the reader nor a flush may wait for it.
            self._replies_room.set()
            if self._flushed is not None and not self._flushed.done():
                self._flushed.set_result(None)

    async def flush(self, timeout: float) -> None:
        """Until the writer has handed every queued frame to the transport
        (or has stopped), at most ``timeout`` seconds."""
        if not (self._out or self._sending) or self._writer is None or self._writer_stopped:
            return
        if self._flushed is None or self._flushed.done():
            self._flushed = asyncio.get_running_loop().create_future()
        await asyncio.wait({self._flushed}, timeout=timeout)

    # ---- closing ---------------------------------------------------------

    async def close(self, code: int, message: str = "") -> None:
        """Close with ``code``; safe to call from any task, any number of times."""
        if self._close_code is not None:
            return
        self._stop_output(code)
        if asyncio.current_task() is not self._serve_task:
            # Closed from elsewhere (shutdown): ``finish`` waits for it
            # rather than stop the writer under the flush.
            self._close_task = asyncio.current_task()
        await self._send_close(code, message)

    def close_soon(self, code: int, message: str) -> None:
        """``close`` from code that cannot wait: the socket is closing from
        this moment, and the close frame goes out from a task."""
        self._stop_output(code)
        self._close_task = self._spawn(self._send_close(code, message))

    def _stop_output(self, code: int) -> None:
        """From now on nothing more is queued for this socket (``on_stop``:
        it leaves every channel at once, rather than when its reader
        notices). Queued events are dropped; queued replies still go out,
        before the close frame (a reply may tell of a committed change)."""
        self._close_code = code
        self.closing = True
        replies = [item for item in self._out if not item[1]]
        self._out.clear()
        self._out.extend(replies)
        self._out_event_bytes = 0
        self._replies_room.set()  # the reader stops now, whatever is queued
        self._on_stop()

    async def _send_close(self, code: int, message: str) -> None:
        # The close frame goes behind the queued replies, and behind what the
        # transport and the kernel already hold. A peer that stopped reading
        # sees it only once it reads all that, so it gets longer before the
        # connection is cut.
        timeout = SLOW_PEER_CLOSE_S if code == WSCloseCode.TRY_AGAIN_LATER else 2.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.flush(timeout)
            await asyncio.wait_for(self.ws.close(code=code, message=message.encode()), max(0.1, deadline - loop.time()))
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            # A peer that reads nothing cannot take a close frame either.
            if self.request.transport is not None:
                self.request.transport.abort()

    async def finish(self) -> None:
        """The end of the socket's teardown: the close frame (if closing
        with a code) after the queued replies, then the writer, stopped."""
        self.closing = True
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        if self._close_task is not None:
            await asyncio.gather(self._close_task, return_exceptions=True)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(code=self._close_code or WSCloseCode.OK), 1.0)
            except (asyncio.TimeoutError, ConnectionError):
                pass
