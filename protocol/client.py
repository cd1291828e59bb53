"""An asyncio client for the hangout protocol (used by tests and load tests).

    async with Client.connect("ws://127.0.0.1:8080/ws") as c:
        session = await c.call("auth.login", {"email": ..., "password": ...})
        booking = await c.call("bookings.create", {...})
        event = await c.next_event("booking.created")

Calls are pipelined: many may be awaited concurrently on one socket and
replies are matched by id. Events are queued in arrival order.
``await Client.connect(...)`` gives the client without the block (close it
yourself). For a socket that comes back after a network loss, see
``protocol.reconnect``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable, Coroutine, Generator

import aiohttp

from protocol.codec import SUBPROTOCOL, decode, encode
from protocol.errors import RpcError


class ConnectionClosed(ConnectionError):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"socket closed with code {code}")
        self.code = code


class Connecting:
    """What ``Client.connect`` returns: awaited, the connected client; as an
    ``async with`` block, the client, closed when the block ends."""

    def __init__(self, opening: Coroutine[Any, Any, "Client"]) -> None:
        self._opening = opening
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, "Client"]:
        return self._opening.__await__()

    async def __aenter__(self) -> "Client":
        self._client = await self._opening
        return self._client

    async def __aexit__(self, *exc: Any) -> None:
        if self._client is not None:
            await self._client.close()


class Client:
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, own_session: bool) -> None:
        self._session = session
        self._own_session = own_session
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        # Numbered user events as they arrived, by seq (they also go to
        # ``events``), and the seqs that arrived more than once.
        self.numbered: dict[int, tuple[str, Any]] = {}
        self.numbered_again: list[int] = []
        self._numbered_arrived = asyncio.Event()
        self.unmatched: list[dict] = []  # replies with id null (bad_frame)
        # When set, every event goes to it as (name, data, seq or None)
        # instead of ``events`` (protocol.reconnect takes them this way).
        self.on_event: Callable[[str, Any, int | None], None] | None = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read_loop())

    # ---- construction ----------------------------------------------------

    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> Connecting:
        """Open a socket: ``await`` it, or use it as ``async with``. The
        options are ``open``'s."""
        return Connecting(cls.open(url, **kwargs))

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        access_token: str | None = None,
        token_in_query: bool = False,
        session: aiohttp.ClientSession | None = None,
        heartbeat: float | None = None,
        max_msg_size: int = 4 * 1024 * 1024,
        local_address: str | None = None,
        **kwargs: Any,
    ) -> "Client":
        """``local_address`` binds the socket's own end to that address (any
        port), e.g. ``"127.0.0.2"``: how a test on one machine connects as
        another client address. Not with ``session`` (it has a connector)."""
        if local_address is not None and session is not None:
            raise ValueError("local_address needs a session of the client's own")
        own = session is None
        if session is None:
            connector = aiohttp.TCPConnector(local_addr=(local_address, 0)) if local_address else None
            session = aiohttp.ClientSession(connector=connector)
        headers = {}
        params = {}
        if access_token is not None:
            if token_in_query:
                params["access_token"] = access_token
            else:
                headers["Authorization"] = f"Bearer {access_token}"
        try:
            ws = await session.ws_connect(
                url, protocols=(SUBPROTOCOL,), headers=headers, params=params,
                heartbeat=heartbeat, max_msg_size=max_msg_size, autoping=True, **kwargs,
            )
        except BaseException:
            if own:
                await session.close()
            raise
        return cls(session, ws, own)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if not self.ws.closed:
            await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        if self._own_session:
            await self._session.close()

    # ---- calls -----------------------------------------------------------

    def _next_id(self) -> int:
        return next(self._ids)

    async def call(self, method: str, params: dict | None = None, *, timeout: float = 30.0) -> Any:
        """Call and return the result; raises RpcError on an error reply."""
        reply = await self.call_raw(method, params, timeout=timeout)
        if "error" in reply:
            raise RpcError.from_wire(reply["error"])
        return reply.get("result")

    async def call_raw(self, method: str, params: Any = None, *, timeout: float = 30.0, req_id: int | None = None) -> dict:
        """Send a request and return the whole reply frame."""
        frame: dict[str, Any] = {"id": req_id if req_id is not None else self._next_id(), "method": method}
        if params is not None:
            frame["params"] = params
        return await self.request(frame, timeout=timeout)

    async def request(self, frame: dict, *, timeout: float = 30.0) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._pending[frame["id"]] = fut
        try:
            await self.send_bytes(encode(frame))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(frame["id"], None)

    async def send_bytes(self, data: bytes) -> None:
        if self.closed.is_set():
            raise ConnectionClosed(self.close_code)
        await self.ws.send_bytes(data)

    # ---- events ----------------------------------------------------------

    async def next_event(self, name: str | None = None, *, timeout: float = 10.0) -> Any:
        """The next event (of ``name``, skipping others) as its data map."""
        async def wait() -> Any:
            while True:
                event, data = await self.events.get()
                if name is None or event == name:
                    return data if name is not None else (event, data)
        return await asyncio.wait_for(wait(), timeout)

    async def wait_numbered(self, seqs: Any, *, timeout: float = 10.0) -> None:
        """Returns once every seq in ``seqs`` has arrived as a user event."""
        wanted = set(seqs)

        async def wait() -> None:
            while not wanted <= self.numbered.keys():
                self._numbered_arrived.clear()
                await self._numbered_arrived.wait()
        await asyncio.wait_for(wait(), timeout)

    def drain_events(self) -> list[tuple[str, Any]]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    # ---- reading ---------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self._on_frame(decode(msg.data))
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    break
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionClosed(self.close_code))

    def _on_frame(self, frame: Any) -> None:
        if "event" in frame:
            seq = frame.get("seq")
            if seq is not None:
                if seq in self.numbered:
                    self.numbered_again.append(seq)
                self.numbered[seq] = (frame["event"], frame.get("data"))
                self._numbered_arrived.set()
            if self.on_event is not None:
                self.on_event(frame["event"], frame.get("data"), seq)
            else:
                self.events.put_nowait((frame["event"], frame.get("data")))
            return
        fut = self._pending.get(frame.get("id")) if frame.get("id") is not None else None
        if fut is not None and not fut.done():
            fut.set_result(frame)
        else:
            self.unmatched.append(frame)
