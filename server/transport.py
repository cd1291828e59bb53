"""A WebSocket's transport: the aiohttp socket set up as the contract wants
(``websocket_response``), then reading frames, writing them, closing with a code.

A reply or event is handed to the transport at once when nothing is queued
and the transport has taken everything before it (``_write_now``). Else
replies and events share one outgoing queue, drained by the writer: a task
that runs while frames are queued and ends once the queue is empty (an idle
socket holds neither a task nor a queue). It is cancelled and awaited in
``finish``. Only event bytes count toward ``OUTGOING_QUEUE_MAX_BYTES``,
since replies are bounded by the in-flight limit instead: with that many
replies queued, the socket's frames are not read until the peer takes some
(a client that sends without reading cannot queue replies without bound,
and replies are never dropped).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import Any, Callable, Coroutine

from aiohttp import WSCloseCode, WSMsgType, web

from protocol.codec import SUBPROTOCOL
from server.config import Config
from server.deadlines import Deadline, Deadlines
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


_SOCKET_NUMBERS = itertools.count(1)  # a socket's number in the process's log lines


class Transport:
    # Slots: a process holds one per socket, tens of thousands of them idle.
    __slots__ = (
        "ws", "request", "id", "_max_replies", "_max_event_bytes", "_ping_interval", "_heard", "_pinged",
        "_ping_due", "_ping_timer", "_deadlines", "_spawn", "_on_stop", "closing", "_out", "_out_event_bytes",
        "_out_replies", "replies", "_room", "_writer", "_writing", "_peer_gone", "_close_code", "_flushed",
        "_close_task", "_serve_task", "_sending",
    )

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, config: Config, *,
                 deadlines: Deadlines, spawn: Spawn, on_stop: Callable[[], None]) -> None:
        self.ws = ws
        self.request = request
        self.id = next(_SOCKET_NUMBERS)
        self._max_replies = config.max_in_flight
        self._max_event_bytes = config.outgoing_queue_max_bytes
        self._ping_interval = config.ping_interval_s
        self._heard = False  # the peer sent something since the last ping check
        self._pinged = False  # a ping went out and nothing came back since
        self._ping_due = False  # the writer sends a ping before its queue
        self._ping_timer: Deadline | None = None
        self._deadlines = deadlines  # the process's, for the ping checks
        self._spawn = spawn  # runs a close frame's send when the caller cannot wait
        self._on_stop = on_stop  # nothing more is queued from now on (see _stop_output)
        self.closing = False
        # (frame, is_event); made when a frame is queued, dropped once drained
        self._out: collections.deque[tuple[bytes, bool]] | None = None
        self._out_event_bytes = 0
        self._out_replies = 0  # replies queued and not yet handed to the transport
        self.replies = 0  # replies queued over the socket's life
        self._room: asyncio.Future | None = None  # the reader waits on it while reading is paused
        self._writer: asyncio.Task | None = None  # while frames are queued (``_write_loop``)
        self._writing = False  # from ``serve`` to ``finish``: a writer may run
        self._peer_gone = False  # a send failed: nothing more can be written
        self._close_code: int | None = None
        self._flushed: asyncio.Future | None = None  # see flush
        self._close_task: asyncio.Task | None = None  # sends the close frame, after the queued replies
        self._serve_task: asyncio.Task | None = None  # runs the reader, then the socket's teardown
        self._sending = False  # the writer is inside send_bytes

    # ---- reading ---------------------------------------------------------

    async def serve(self, on_frame: Callable[[bytes], None]) -> None:
        """Hand every binary frame to ``on_frame`` until the peer goes or the
        socket closes (frames queued before, while the socket was being set
        up, go out now). The caller then tears the socket down, ending with
        ``finish``."""
        self._serve_task = asyncio.current_task()
        self._writing = True
        self._start_writer()
        self._ping_timer = self._deadlines.call_later(self._ping_interval, self._check_peer)
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
            if self.reading_paused:
                self._room = asyncio.get_running_loop().create_future()
                await self._room
                self._room = None
            if self.closing or self._peer_gone:
                return

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
            self._start_writer()
        else:
            log.info("socket %s: no answer to a ping within %.0fs, dropping it", self.id, self._ping_interval)
            if self.request.transport is not None:
                self.request.transport.abort()
            return
        self._ping_timer = self._deadlines.call_later(self._ping_interval, self._check_peer)

    @property
    def reading_paused(self) -> bool:
        """The socket's frames are not read until the peer takes replies:
        as many are queued as calls may be in flight, and the peer can
        still take them."""
        return self._out_replies >= self._max_replies and not (self.closing or self._peer_gone)

    def _resume_reading(self) -> None:
        room = self._room
        if room is not None and not room.done() and not self.reading_paused:
            room.set_result(None)

    # ---- writing ---------------------------------------------------------

    @property
    def queued_replies(self) -> int:
        """Replies queued and not yet handed to the transport."""
        return self._out_replies

    def send_reply(self, frame: bytes) -> None:
        if self.closing:
            return
        self.replies += 1
        if self._write_now(frame):
            return
        self._queue(frame, False)
        self._out_replies += 1

    def send_event(self, frame: bytes) -> None:
        """Queue an encoded event; never waits. Overflow closes with 1013."""
        if self.closing:
            return
        if self._write_now(frame):
            TALLY.events_out += 1
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
        self._queue(frame, True)
        TALLY.events_out += 1

    def _write_now(self, frame: bytes) -> bool:
        """Hand ``frame`` to the transport at once, as a binary WebSocket
        frame, when nothing waits before it and the transport has taken
        everything written so far: the usual case, which so costs no task.
        False otherwise (nothing written): the frame then goes through the
        queue and the writer, which waits for the peer."""
        if self._writer is not None or self._out or self._ping_due or not self._writing or self._peer_gone:
            return False
        transport = self.request.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size() or self.ws.closed:
            return False
        size = len(frame)
        if size < 126:
            header = bytes((0x82, size))
        elif size < 65536:
            header = b"\x82\x7e" + size.to_bytes(2, "big")
        else:
            header = b"\x82\x7f" + size.to_bytes(8, "big")
        if size < 16384:
            transport.write(header + frame)
        else:
            transport.writelines((header, frame))
        return True

    def _queue(self, frame: bytes, is_event: bool) -> None:
        out = self._out
        if out is None:
            out = self._out = collections.deque()
        out.append((frame, is_event))
        self._start_writer()

    def _start_writer(self) -> None:
        """A writer for what is queued (and a due ping), unless one runs
        already, the socket is not served (yet, or any more), or the peer
        is gone."""
        if self._writer is None and self._writing and not self._peer_gone and (self._out or self._ping_due):
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        ws = self.ws
        try:
            while True:
                if self._ping_due:
                    self._ping_due = False
                    try:
                        await ws.ping()
                    except (ConnectionError, RuntimeError):
                        self._peer_gone = True
                        return
                out = self._out
                if not out:
                    break
                frame, is_event = out.popleft()
                if is_event:
                    self._out_event_bytes -= len(frame)
                # Only observable by others while send_bytes is suspended,
                # i.e. waiting for the transport to drain.
                self._sending = True
                try:
                    await ws.send_bytes(frame)
                except (ConnectionError, RuntimeError):
                    self._peer_gone = True
                    return
                finally:
                    self._sending = False
                if not is_event:
                    self._out_replies -= 1
                    self._resume_reading()
            self._out = None  # drained: an idle socket holds no queue
        finally:
            # Ended with nothing queued, or stopped (the peer is gone: nothing
            # more will be written, so neither the reader nor a flush may
            # wait for it).
            self._writer = None
            self._resume_reading()
            if self._flushed is not None and not self._flushed.done():
                self._flushed.set_result(None)

    async def flush(self, timeout: float) -> None:
        """Until the writer has handed every queued frame to the transport
        (or has stopped), at most ``timeout`` seconds."""
        if self._writer is None:
            return  # nothing queued, not served yet, or the peer is gone
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
        if self._out:
            replies = [item for item in self._out if not item[1]]
            self._out.clear()
            self._out.extend(replies)
        self._out_event_bytes = 0
        self._resume_reading()  # the reader stops now, whatever is queued
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
            self._deadlines.cancel(self._ping_timer)
        if self._close_task is not None:
            await asyncio.gather(self._close_task, return_exceptions=True)
        self._writing = False
        writer = self._writer
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(code=self._close_code or WSCloseCode.OK), 1.0)
            except (asyncio.TimeoutError, ConnectionError):
                pass
