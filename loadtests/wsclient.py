"""A small synchronous client for the hangout protocol, for locust (gevent).

One reader greenlet per socket receives every frame: replies complete the
pending call with the same id (so calls can be pipelined), events go to a
bounded queue. Response times are taken by the reader the moment the reply
frame arrives, so a busy locust greenlet scheduler does not inflate them.

    ws = WsClient.connect("ws://127.0.0.1:8080/ws", access_token=token)
    user = ws.call("users.me")                      # blocks this greenlet only
    a, b = ws.send("users.get", {...}), ws.send("hosts.search", {})
    a.wait(); b.wait()                              # two calls in flight at once

Depends on ``websocket-client`` (pure Python, blocking sockets: cooperative
once locust has monkey-patched them) and msgpack through protocol.codec.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Any, Callable

import gevent
import gevent.event
import websocket

from protocol.codec import decode, encode

SUBPROTOCOL = "hangout.v1"
# The close reason of a socket its own user closed (a storm's drop, locust stopping).
CLOSED_BY_CLIENT = "closed by client"

# (method, response_time_ms, response_length, error) reported for each reply.
Reporter = Callable[[str, float, int, "CallError | None"], None]


class CallError(Exception):
    """An error reply (``code`` from the protocol) or a transport failure."""

    def __init__(self, code: str, message: str = "", data: Any = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.data = data or {}


class Pending:
    """One call in flight; ``wait()`` returns the result or raises CallError."""

    __slots__ = ("id", "method", "expected", "sent_at", "_done", "result", "error", "length", "elapsed_ms")

    def __init__(self, req_id: int, method: str, expected: tuple[str, ...] = ()) -> None:
        self.id = req_id
        self.method = method
        self.expected = expected  # error codes that are business answers, not failures
        self.sent_at = time.perf_counter()
        self._done = gevent.event.Event()
        self.result: Any = None
        self.error: CallError | None = None
        self.length = 0
        self.elapsed_ms = 0.0

    def _finish(self, result: Any, error: CallError | None, length: int) -> None:
        self.elapsed_ms = (time.perf_counter() - self.sent_at) * 1000.0
        self.result, self.error, self.length = result, error, length
        self._done.set()

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise CallError("timeout", f"no reply to {self.method} in {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


class WsClient:
    def __init__(self, ws: websocket.WebSocket, reporter: Reporter | None, call_timeout: float,
                 on_event: Callable[[str, Any], None] | None = None) -> None:
        self.ws = ws
        self.reporter = reporter
        self.on_event = on_event  # runs in the reader greenlet, as the event arrives
        self.call_timeout = call_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        # Events nobody looks at must not grow without bound (the server would
        # close a slow reader with 1013; a locust user is just forgetful).
        self.events: collections.deque[tuple[str, Any]] = collections.deque(maxlen=1000)
        self._event_ready = gevent.event.Event()
        self.event_seq = 0  # the highest user-event seq received: where events.resume starts
        self.closed = False
        self.close_reason = ""
        self._reader = gevent.spawn(self._read_loop)

    @classmethod
    def connect(cls, url: str, *, access_token: str | None = None, reporter: Reporter | None = None,
                on_event: Callable[[str, Any], None] | None = None,
                connect_timeout: float = 10.0, call_timeout: float = 30.0) -> "WsClient":
        headers = [f"Authorization: Bearer {access_token}"] if access_token else []
        ws = websocket.create_connection(
            url, header=headers, subprotocols=[SUBPROTOCOL], timeout=connect_timeout,
            enable_multithread=True,  # serialises sends from several greenlets
            skip_utf8_validation=True,
        )
        ws.settimeout(None)  # the reader waits for frames for as long as the socket lives
        return cls(ws, reporter, call_timeout, on_event)

    # ---- calls -----------------------------------------------------------

    def send(self, method: str, params: dict | None = None, expected: tuple[str, ...] = ()) -> Pending:
        """Send a request without waiting; the reply completes the Pending.
        Error codes in ``expected`` still raise from ``wait()`` but are
        reported as successful calls named ``method (code)``, e.g.
        ``bookings.create (slot_unavailable)``."""
        req_id = next(self._ids)
        pending = Pending(req_id, method, expected)
        if self.closed:
            pending._finish(None, CallError("closed", self.close_reason), 0)
            if self.close_reason != CLOSED_BY_CLIENT:  # the user's own drop is not the server's failure
                self._report(pending)
            return pending
        self._pending[req_id] = pending
        frame = {"id": req_id, "method": method, "params": params if params is not None else {}}
        try:
            self.ws.send(encode(frame), websocket.ABNF.OPCODE_BINARY)
        except (OSError, websocket.WebSocketException) as exc:
            self._pending.pop(req_id, None)
            pending._finish(None, CallError("closed", repr(exc)), 0)
            self._report(pending)
        return pending

    def call(self, method: str, params: dict | None = None, expected: tuple[str, ...] = (),
             timeout: float | None = None) -> Any:
        pending = self.send(method, params, expected)
        try:
            return pending.wait(timeout or self.call_timeout)
        except CallError as err:
            if err.code == "timeout":
                # Report it once, as a failure; a late reply is then dropped.
                if self._pending.pop(pending.id, None) is not None:
                    pending.elapsed_ms = (time.perf_counter() - pending.sent_at) * 1000.0
                    pending.error = err
                    self._report(pending)
            raise

    # ---- events ----------------------------------------------------------

    def take_events(self, name: str | None = None) -> list[tuple[str, Any]]:
        """Remove and return the queued events (only ``name``, if given)."""
        if name is None:
            out = list(self.events)
            self.events.clear()
            return out
        out, keep = [], []
        for ev in self.events:
            (out if ev[0] == name else keep).append(ev)
        self.events.clear()
        self.events.extend(keep)
        return out

    def wait_event(self, name: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = self.take_events(name)
            if got:
                return got[0][1]
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise CallError("timeout", f"no {name} event in {timeout}s")
            self._event_ready.clear()
            self._event_ready.wait(left)

    # ---- lifecycle -------------------------------------------------------

    def close(self) -> None:
        """Drop the socket as a phone losing its network would (close frame
        if possible, then the TCP connection)."""
        if not self.closed:
            try:
                self.ws.send_close()
            except Exception:
                pass
        # Calls still in flight were given up by the user (locust stopping
        # it, or a deliberate drop): not the server's failures.
        self._shutdown(CLOSED_BY_CLIENT, report=False)
        self._reader.join(timeout=2)

    def _shutdown(self, reason: str, report: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        try:
            self.ws.shutdown()
        except Exception:
            pass
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p._finish(None, CallError("closed", reason), 0)
            if report:
                self._report(p)
        self._event_ready.set()

    def _report(self, p: Pending) -> None:
        if self.reporter is not None:
            err = p.error
            if err is not None and err.code in p.expected:
                # A business answer: reported apart from the method's other
                # replies, and as a success.
                self.reporter(f"{p.method} ({err.code})", p.elapsed_ms, p.length, None)
            else:
                self.reporter(p.method, p.elapsed_ms, p.length, err)

    def _read_loop(self) -> None:
        reason = "server closed the socket"
        try:
            while True:
                opcode, data = self.ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                    reason = f"server closed the socket with {code}"
                    break
                if opcode != websocket.ABNF.OPCODE_BINARY:
                    continue
                self._on_frame(data)
        except (OSError, websocket.WebSocketException, ValueError) as exc:
            if not self.closed:
                reason = f"socket lost: {exc!r}"
        finally:
            self._shutdown(reason)

    def _on_frame(self, data: bytes) -> None:
        frame = decode(data)
        if "event" in frame:
            if isinstance(frame.get("seq"), int) and frame["seq"] > self.event_seq:
                self.event_seq = frame["seq"]
            if self.on_event is not None:
                self.on_event(frame["event"], frame.get("data"))
            self.events.append((frame["event"], frame.get("data")))
            self._event_ready.set()
            return
        pending = self._pending.pop(frame.get("id"), None)
        if pending is None:
            return  # a reply after its call timed out, or to a bad frame
        err = frame.get("error")
        if err is not None:
            pending._finish(None, CallError(err.get("code", "?"), err.get("message", ""), err.get("data")), len(data))
        else:
            pending._finish(frame.get("result"), None, len(data))
        self._report(pending)
