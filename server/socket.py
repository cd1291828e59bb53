"""One WebSocket's lifecycle: reading frames, dispatching calls, writing.

Each socket owns exactly two kinds of task: the writer (one, for the life of
the socket) and one task per in-flight call. Both are cancelled and awaited
when the socket ends. Replies and events share one outgoing queue drained by
the writer; only event bytes count toward ``OUTGOING_QUEUE_MAX_BYTES``, since
replies are already bounded by the in-flight limit.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import logging
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import redis.exceptions
from aiohttp import WSMsgType, web
from pydantic import BaseModel, ValidationError

from protocol.codec import DecodeError, decode, encode
from protocol.errors import ErrorCode, RpcError
from server.db.errors import DatabaseUnavailable
from server.rpc import METHODS, Call

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("hangout.socket")

CLOSE_UNSUPPORTED = 1003  # text frame
CLOSE_POLICY = 1008  # too many bad frames
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013  # outgoing queue overflow
CLOSE_GOING_AWAY = 1001  # server shutdown
SLOW_PEER_CLOSE_S = 10.0  # how long a 1013 close frame may wait for a stalled peer
# How long bind waits for Redis to confirm the new user's channel. Past it the
# socket is bound anyway (the subscription is made when Redis answers).
SUBSCRIBE_WAIT_S = 2.0
MAX_UINT64 = 2**64 - 1

UNAVAILABLE_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err["loc"]) or "params"
        reason = err["msg"]
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, "):]
        errors.append({"field": field, "reason": reason})
    return errors


def _holds_nul(value: Any) -> bool:
    # Iterative: a frame may nest values ~1000 deep, past Python's recursion limit.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


@functools.cache
def _wire_names(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(f.alias or name for name, f in model.model_fields.items())


def nul_errors(model: type[BaseModel], raw: dict[Any, Any], named: set[str]) -> list[dict[str, str]]:
    """Known params holding a NUL character: PostgreSQL text cannot store
    one, so letting it through would fail later as an internal error."""
    known = _wire_names(model)
    return [
        {"field": key, "reason": "must not contain NUL characters"}
        for key, value in raw.items()
        if key in known and key not in named and _holds_nul(value)
    ]


def dump_result(result: Any) -> Any:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="python")
    return result


class _Placeholder:
    """Holds a user's channel subscribed while ``Connection.bind`` waits for
    Redis, so that the socket itself changes only once the wait is over."""

    user_id = None
    events_suspended = False

    def send_event(self, frame: bytes) -> None:
        pass


class Connection:
    """A client socket: its auth binding, in-flight calls and outgoing queue."""

    def __init__(self, ws: web.WebSocketResponse, services: "Services") -> None:
        self.ws = ws
        self.services = services
        self.config = services.config
        self.id = uuid.uuid4()
        self.user_id: uuid.UUID | None = None
        self.token_family: uuid.UUID | None = None
        self.token_expires_at: dt.datetime | None = None
        self.events_suspended = False  # the token expired (``_suspend_events``)
        self.bad_frames = 0
        self.closing = False
        self.draining = False
        self._calls: set[asyncio.Task] = set()
        self._out: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._out_event_bytes = 0
        # Replies queued and not yet handed to the transport. At the in-flight
        # limit the socket's frames are not read until the peer takes some:
        # a client that sends without reading cannot queue replies without
        # bound (replies are never dropped, so they must be bounded here).
        self._out_replies = 0
        self.replies = 0  # replies queued over the socket's life (tests, via test.sockets)
        self._replies_room = asyncio.Event()
        self._replies_room.set()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._close_code: int | None = None
        self._flushed: asyncio.Future | None = None  # see _flush
        self._close_task: asyncio.Task | None = None  # sends the close frame, after the queued replies
        self._serve_task: asyncio.Task | None = None  # runs the reader, then the teardown
        self._sending = False  # the writer is inside send_bytes

    # ---- lifecycle -------------------------------------------------------

    async def serve(self) -> None:
        self._serve_task = asyncio.current_task()
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")
        try:
            await self._read_loop()
        finally:
            await self._teardown()

    async def _read_loop(self) -> None:
        ws = self.ws
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                self._on_frame(msg.data)
            elif msg.type is WSMsgType.TEXT:
                await self.close(CLOSE_UNSUPPORTED, "binary frames only")
                return
            elif msg.type is WSMsgType.ERROR:
                exc = ws.exception()
                if getattr(exc, "code", None) == CLOSE_TOO_BIG or "too big" in str(exc).lower():
                    await self.close(CLOSE_TOO_BIG, "frame too large")
                return
            if self.closing:
                return
            if not self._replies_room.is_set():
                await self._replies_room.wait()
            if self.closing or self._writer_stopped:
                return  # (a writer that stopped means the peer is gone)

    async def _teardown(self) -> None:
        self.closing = True
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self.services.hub.forget(self)
        for task in list(self._calls):
            task.cancel()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        if self._close_task is not None:
            # Closing with a code: the replies queued before it go out first.
            await asyncio.gather(self._close_task, return_exceptions=True)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(code=self._close_code or 1000), 1.0)
            except (asyncio.TimeoutError, ConnectionError):
                pass

    async def close(self, code: int, message: str = "") -> None:
        """Close with ``code``; safe to call from any task, any number of times."""
        if self._close_code is not None:
            return
        self._stop_output(code)
        if asyncio.current_task() is not self._serve_task:
            # Closed from elsewhere (shutdown): the teardown waits for it
            # rather than stop the writer under the flush.
            self._close_task = asyncio.current_task()
        await self._send_close(code, message)

    def _close_now(self, code: int, message: str) -> None:
        """``close`` from code that cannot wait: the socket is closing from
        this moment, and the close frame goes out from a task."""
        self._stop_output(code)
        self._close_task = self.services.spawn(self._send_close(code, message))

    def _stop_output(self, code: int) -> None:
        """From now on nothing more is queued for this socket, and it leaves
        every channel at once rather than when its reader notices. Queued
        events are dropped; queued replies still go out, before the close
        frame (a reply may tell of a committed change)."""
        self._close_code = code
        self.closing = True
        replies = [item for item in self._out if not item[1]]
        self._out.clear()
        self._out.extend(replies)
        self._out_event_bytes = 0
        self._replies_room.set()  # the reader stops now, whatever is queued
        self.services.hub.forget(self)

    async def _send_close(self, code: int, message: str) -> None:
        # The close frame goes behind the queued replies, and behind what the
        # transport and the kernel already hold. A peer that stopped reading
        # sees it only once it reads all that, so it gets longer before the
        # connection is cut.
        timeout = SLOW_PEER_CLOSE_S if code == CLOSE_TRY_AGAIN else 2.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self._flush(timeout)
            await asyncio.wait_for(self.ws.close(code=code, message=message.encode()), max(0.1, deadline - loop.time()))
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            # A peer that reads nothing cannot take a close frame either.
            transport = self.ws._req.transport if self.ws._req is not None else None
            if transport is not None:
                transport.abort()

    async def drain(self, timeout: float) -> None:
        """Shutdown: take no new calls, let running ones finish, then 1001."""
        self.draining = True
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=timeout)
        await self._flush(1.0)  # the replies of the calls that just finished
        await self.close(CLOSE_GOING_AWAY, "server shutting down")

    async def _flush(self, timeout: float) -> None:
        """Until the writer has handed every queued frame to the transport
        (or has stopped), at most ``timeout`` seconds."""
        if not (self._out or self._sending) or self._writer is None or self._writer_stopped:
            return
        if self._flushed is None or self._flushed.done():
            self._flushed = asyncio.get_running_loop().create_future()
        await asyncio.wait({self._flushed}, timeout=timeout)

    # ---- outgoing --------------------------------------------------------

    @property
    def _writer_stopped(self) -> bool:
        """Nothing more can be written (the peer is gone): nobody may wait for the writer."""
        return self._writer is not None and self._writer.done()

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    @property
    def queued_replies(self) -> int:
        """Replies queued and not yet handed to the transport."""
        return self._out_replies

    @property
    def reading_paused(self) -> bool:
        """The socket's frames are not read until the peer takes replies."""
        return not self._replies_room.is_set()

    def send_reply(self, frame: bytes) -> None:
        if self.closing:
            return
        self._out.append((frame, False))
        self.replies += 1
        self._out_replies += 1
        if self._out_replies >= self.config.max_in_flight and not self._writer_stopped:
            self._replies_room.clear()
        self._wake.set()

    def send_event(self, frame: bytes) -> None:
        """Queue an encoded event; never waits. Overflow closes with 1013.
        Dropped while the token has expired (``_suspend_events``)."""
        if self.closing or self.events_suspended:
            return
        self._out_event_bytes += len(frame)
        # Over the bound while the writer waits for the peer to take bytes: the
        # peer is not reading. (A burst delivered within one loop turn, before
        # the writer has run at all, is not the peer's doing.)
        if self._sending and self._out_event_bytes > self.config.outgoing_queue_max_bytes:
            log.info("socket %s: outgoing queue over bound, closing 1013", self.id)
            self._close_now(CLOSE_TRY_AGAIN, "outgoing queue full")  # a burst must not queue more
            return
        self._out.append((frame, True))
        self._wake.set()

    async def _write_loop(self) -> None:
        out = self._out
        ws = self.ws
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
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
                        if self._out_replies < self.config.max_in_flight:
                            self._replies_room.set()
                if self._flushed is not None and not self._flushed.done():
                    self._flushed.set_result(None)
        finally:
            # Stopped (the peer is gone): nothing more will be written, so
            # neither the reader nor a flush may wait for it.
            self._replies_room.set()
            if self._flushed is not None and not self._flushed.done():
                self._flushed.set_result(None)

    # ---- incoming --------------------------------------------------------

    def _bad_frame(self, req_id: int | None, reason: str) -> None:
        self.bad_frames += 1
        if self.bad_frames >= self.config.max_bad_frames:
            # Frames that came in the same read as this one must not run.
            self._close_now(CLOSE_POLICY, "too many bad frames")
            return
        self.send_reply(encode({"id": req_id, "error": RpcError(ErrorCode.BAD_FRAME, reason).to_wire()}))

    def _on_frame(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            frame = decode(data)
        except DecodeError:
            return self._bad_frame(None, "not a single MessagePack value")
        if not isinstance(frame, dict):
            return self._bad_frame(None, "frame is not a map")
        req_id = frame.get("id")
        if type(req_id) is not int or not 0 <= req_id <= MAX_UINT64:
            return self._bad_frame(None, "missing or unusable id")
        method = frame.get("method")
        if type(method) is not str:
            return self._bad_frame(req_id, "missing or unusable method")
        params = frame.get("params", {})
        if self.draining:
            # Shutting down: tell the client to retry elsewhere rather than
            # leave the call unanswered.
            return self._reply_error(req_id, RpcError(ErrorCode.UNAVAILABLE, "server shutting down, retry"))
        if len(self._calls) >= self.config.max_in_flight:
            return self._reply_error(req_id, RpcError(ErrorCode.TOO_MANY_REQUESTS))
        task = asyncio.create_task(self._call(req_id, method, params))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _reply_error(self, req_id: int, err: RpcError) -> None:
        self.send_reply(encode({"id": req_id, "error": err.to_wire()}))

    async def _call(self, req_id: int, name: str, raw_params: Any) -> None:
        try:
            result = await self.dispatch(name, raw_params)
            frame = encode({"id": req_id, "result": dump_result(result)})
        except RpcError as err:
            frame = encode({"id": req_id, "error": err.to_wire()})
        except asyncio.CancelledError:
            raise
        except DatabaseUnavailable as exc:
            frame = encode({"id": req_id, "error": RpcError(ErrorCode.UNAVAILABLE, str(exc) or None).to_wire()})
        except UNAVAILABLE_ERRORS as exc:
            log.warning("call %s unavailable: %r", name, exc)
            frame = encode({"id": req_id, "error": RpcError(ErrorCode.UNAVAILABLE).to_wire()})
        except Exception:
            ref = uuid.uuid4().hex
            log.exception("internal error in %s ref=%s", name, ref)
            frame = encode({"id": req_id, "error": RpcError(ErrorCode.INTERNAL, data={"ref": ref}).to_wire()})
        self.send_reply(frame)

    async def dispatch(self, name: str, raw_params: Any) -> Any:
        method = METHODS.get(name)
        if method is None:
            raise RpcError(ErrorCode.UNKNOWN_METHOD, f"no method named {name[:100]!r}")
        if method.auth:
            self.require_auth()
        if not isinstance(raw_params, dict):
            raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": [{"field": "params", "reason": "must be a map"}]})
        errors: list[dict[str, str]] = []
        try:
            params = method.params.model_validate(raw_params)
        except ValidationError as exc:
            errors = validation_errors(exc)
        named = {e["field"] for e in errors}
        errors += [e for e in method.params.raw_errors(raw_params) if e["field"] not in named]
        errors += nul_errors(method.params, raw_params, {e["field"] for e in errors})
        if errors:
            raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": errors})
        # The call's write positions go to Redis in the pipeline of its
        # events, and the reply waits for them (read-your-writes).
        async with self.services.db.recording_writes():
            return await method.handler(Call(self.services, self, self.user_id), params)

    # ---- authentication binding -----------------------------------------

    def require_auth(self) -> uuid.UUID:
        if self.user_id is None:
            raise RpcError(ErrorCode.UNAUTHENTICATED)
        if self.token_expires_at is not None and dt.datetime.now(dt.timezone.utc) >= self.token_expires_at:
            self._suspend_events()  # if the timer has not fired yet
            raise RpcError(ErrorCode.TOKEN_EXPIRED)
        return self.user_id

    async def bind(self, user_id: uuid.UUID, family: uuid.UUID | None, expires_at: dt.datetime) -> None:
        """Bind (or re-bind) the socket to a user and schedule ``auth.expiring``.

        Returns once the user's channel is subscribed, so that no event about
        the user published after the reply can be missed (unless Redis is
        down, in which case the subscription is made when it is back)."""
        sessions, hub = self.services.sessions, self.services.hub
        if family is not None and sessions.ended(family):
            # The session ended after it was checked, before this: the call
            # fails, and the earlier binding stays as it was.
            raise RpcError(ErrorCode.UNAUTHENTICATED, "session ended")
        if self.user_id != user_id:
            # The new user's channel is subscribed before the socket changes
            # at all, on behalf of a placeholder: if the session ends while
            # Redis confirms, the call fails with the earlier binding (its
            # user, its rooms) as it was. Past the wait nothing awaits, so
            # no news can fall between the last check and the switch.
            channel = hub.user_channel(user_id)
            placeholder = _Placeholder()
            subscribed = hub.follow(placeholder, channel)
            try:
                if subscribed is not None:
                    await asyncio.wait({subscribed}, timeout=SUBSCRIBE_WAIT_S)
                if family is not None and sessions.ended(family):
                    raise RpcError(ErrorCode.UNAUTHENTICATED, "session ended")
                # Another user's events and rooms must never reach this socket.
                hub.unfollow_all(self)
                hub.follow(self, channel)  # subscribed already (or made when Redis is back)
            finally:
                hub.unfollow(placeholder, channel)
        resumed = self.events_suspended and self.user_id == user_id
        self.events_suspended = False
        if resumed:
            hub.resume(self)
        self.user_id = user_id
        self.token_family = family
        self.token_expires_at = expires_at
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        loop = asyncio.get_running_loop()
        lead = self.config.auth_expiring_lead_s
        delay = max(0.0, (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds() - lead)
        self._expiry_timer = loop.call_later(delay, self._warn_expiring, expires_at)

    def session_ended(self, family: uuid.UUID) -> None:
        """Another socket or process ended this socket's session."""
        if self.token_family == family:
            self.unbind()

    def unbind(self) -> None:
        if self.user_id is not None:
            self.services.hub.unfollow_all(self)
        self.user_id = None
        self.token_family = None
        self.token_expires_at = None
        self.events_suspended = False
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None

    def _warn_expiring(self, expires_at: dt.datetime) -> None:
        if self.token_expires_at != expires_at:
            return
        self.send_event(encode({"event": "auth.expiring", "data": {"expires_at": expires_at}}))
        left = (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        self._expiry_timer = asyncio.get_running_loop().call_later(max(0.0, left), self._expired, expires_at)

    def _expired(self, expires_at: dt.datetime) -> None:
        if self.token_expires_at == expires_at:
            self._suspend_events()

    def _suspend_events(self) -> None:
        """The access token has expired. The socket stays bound (its calls
        answer ``token_expired``), but it gets none of the user's events or
        room messages until it authenticates again: a token that leaked must
        not keep a socket listening for longer than the token lives. It keeps
        its subscriptions, so that an ended session still reaches it
        (server/sessions.py) and its rooms resume, missing nothing, once it
        authenticates again as the same user (``Hub.resume``)."""
        if self.user_id is not None:
            self.events_suspended = True
