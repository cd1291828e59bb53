"""A client that comes back: ``ResumingClient`` keeps one logical connection
over as many sockets as the network takes.

    async with ResumingClient(url) as c:
        await c.call("auth.login", {"email": ..., "password": ...})
        await c.call("chat.join", {"conversation_id": room})
        while True:
            name, data = await c.next_event()

When the socket is lost it opens another, after waits drawn with
exponential backoff and full jitter (``protocol.resume.Backoff``), then,
before any call goes through: authenticates with the tokens it holds
(refreshing them once if the access token was refused), runs
``events.resume`` from the last user event it delivered, and joins every
room again with ``since_seq``. What those return is delivered as events
(``chat.message {message}`` for messages), each user event and message
once, by ``seq``.

- Tokens come from the ``auth.*`` results that pass through ``call`` (or
  the constructor). On ``auth.expiring`` the tokens are refreshed, by
  ``refresh_tokens`` when given (an app that keeps them elsewhere), else
  with ``auth.refresh`` on the socket.
- A call made while no socket is ready waits for one. A call whose socket
  is lost before its reply is sent again on the next socket, except the
  ``auth.*`` calls (a refresh token is single-use), which raise
  ``ConnectionClosed``. ``chat.send`` is given a ``client_msg_id`` when it
  has none, so that a send made twice is stored once.
- Local events (never sent by the server) are named ``client.*``:
  ``client.resync {"scope": "events"}`` or ``{"scope": "chat",
  "conversation_id"}`` when the server no longer keeps everything missed
  (``truncated``), or a room answers ``not_found`` and is no longer
  followed: re-read that state. ``client.reconnected {"attempts"}`` once a
  new socket is ready (``attempts``: the failed attempts so far).
- An authentication that fails for good (the access token refused and the
  refresh token too) ends the connection: every call then raises that
  ``RpcError``. Other errors while restoring (``unavailable`` during a
  failover, ``rate_limited``) are retried on a new socket.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Awaitable, Callable

import aiohttp

from protocol.client import Client, ConnectionClosed
from protocol.errors import ErrorCode, RpcError
from protocol.resume import Backoff, SeqWindow

# Calls that must not be sent twice: a refresh token is single-use, a
# registration would find its own email taken.
NOT_RESENT = frozenset({"auth.register", "auth.login", "auth.refresh", "auth.authenticate", "auth.logout"})
_SIGNED_OUT = (ErrorCode.UNAUTHENTICATED, ErrorCode.TOKEN_EXPIRED)
# Errors that end the connection while it is restored: the app must sign in
# again. Any other (unavailable during a failover, rate_limited...) is
# retried on a new socket.
_FOR_GOOD = (*_SIGNED_OUT, ErrorCode.INVALID_CREDENTIALS)
_LOST = (ConnectionError, aiohttp.ClientError, asyncio.TimeoutError, OSError)

Tokens = tuple[str, str]  # (access_token, refresh_token)


class ResumingClient:
    def __init__(
        self,
        url: str,
        *,
        access_token: str | None = None,
        refresh_token: str | None = None,
        since_seq: int | None = None,
        backoff: Backoff | None = None,
        refresh_tokens: Callable[[], Awaitable[Tokens]] | None = None,
        **connect_options: Any,
    ) -> None:
        """``since_seq``: the last user event the app already holds (from a
        previous run); without it, user events are followed from the first
        authentication on."""
        self.url = url
        self.access_token = access_token
        self.refresh_token = refresh_token
        self.backoff = backoff or Backoff()
        self.refresh_tokens = refresh_tokens
        # aiohttp's pings find a connection that died without a word (a
        # phone leaving its network), which TCP alone may take minutes to see.
        self.connect_options = {"heartbeat": 20.0, **connect_options}
        self.user_events: SeqWindow | None = SeqWindow(since_seq) if since_seq is not None else None
        self.rooms: dict[str, SeqWindow] = {}
        # Seqs that arrived before the reply that starts their stream was
        # read (the reader runs ahead of the caller): taken once it is.
        self._early_user: list[int] = []
        self._joining: dict[str, list[int]] = {}
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.sockets = 0  # sockets made ready so far
        self.failed_attempts = 0  # attempts that did not give a ready socket
        self.error: RpcError | None = None
        self._client: Client | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._changed = asyncio.Event()  # a socket became ready, or the connection ended
        self._runner: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle ---------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> "ResumingClient":
        """Connect (retrying as after a loss) and wait for the first socket."""
        self._runner = asyncio.create_task(self._run())
        self._runner.add_done_callback(lambda _: self._changed.set())
        try:
            await self._wait_ready(timeout)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> "ResumingClient":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        self._changed.set()
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    @property
    def socket(self) -> Client | None:
        """The current socket while one is ready (tests drop it on purpose)."""
        return self._client if self._ready.is_set() else None

    # ---- calls -------------------------------------------------------------

    async def call(self, method: str, params: dict | None = None, *, timeout: float = 30.0) -> Any:
        """The result; raises ``RpcError`` on an error reply."""
        params = dict(params or {})
        if method == "chat.send" and params.get("client_msg_id") is None:
            params["client_msg_id"] = str(uuid.uuid4())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        room = params.get("conversation_id") if method == "chat.join" else None
        while True:
            client = await self._wait_ready(deadline - loop.time())
            if room is not None:
                self._joining.setdefault(room, [])
            try:
                result = await client.call(method, params, timeout=max(0.0, deadline - loop.time()))
            except ConnectionClosed:
                if method in NOT_RESENT:
                    raise
                continue
            finally:
                early = self._joining.pop(room, []) if room is not None else []
            self._after_call(method, params, result)
            if room is not None and room in self.rooms:
                self.rooms[room].take_all(early)
            return result

    async def next_event(self, name: str | None = None, *, timeout: float = 10.0) -> Any:
        """The next event (of ``name``, skipping others): its data, or
        ``(name, data)`` when no name is given."""
        async def wait() -> Any:
            while True:
                event, data = await self.events.get()
                if name is None:
                    return event, data
                if event == name:
                    return data
        return await asyncio.wait_for(wait(), timeout)

    async def _wait_ready(self, timeout: float) -> Client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.error is not None:
                raise self.error
            if self._closing or self._runner is None:
                raise ConnectionClosed(None)
            if self._runner.done():  # a bug ended it: say which
                raise ConnectionClosed(None) from (None if self._runner.cancelled() else self._runner.exception())
            if self._ready.is_set() and self._client is not None:
                return self._client
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError("no socket ready in time") from None

    def _after_call(self, method: str, params: dict, result: Any) -> None:
        """What the app's own calls tell: tokens, and the rooms it follows."""
        if not isinstance(result, dict):
            return
        if "access_token" in result:
            self.access_token = result["access_token"]
            self.refresh_token = result.get("refresh_token", self.refresh_token)
        if "user" in result and method.startswith("auth."):
            self._follow_user_events(result["user"])
        if method == "chat.join":
            self._joined(params, result, deliver=False)
        elif method == "chat.leave":
            self.rooms.pop(params["conversation_id"], None)
        elif method == "auth.logout":
            self.access_token = self.refresh_token = None
            self.user_events = None
            self.rooms.clear()

    def _follow_user_events(self, user: dict) -> None:
        if self.user_events is None and "event_seq" in user:
            self.user_events = SeqWindow(user["event_seq"])
            self.user_events.take_all(self._early_user)
            self._early_user.clear()

    def _joined(self, params: dict, result: dict, deliver: bool) -> None:
        room = params["conversation_id"]
        messages = result["messages"]
        window = self.rooms.get(room)
        if window is None:
            since = params.get("since_seq")
            start = since if since is not None else (messages[0]["seq"] - 1 if messages else result["last_seq"])
            window = self.rooms[room] = SeqWindow(start)
        if result["truncated"]:
            window.skip_to(messages[0]["seq"] - 1 if messages else result["last_seq"])
            self._local("client.resync", {"scope": "chat", "conversation_id": room})
        for message in messages:
            if window.take(message["seq"]) and deliver:
                self.events.put_nowait(("chat.message", {"message": message}))

    def _local(self, name: str, data: dict) -> None:
        self.events.put_nowait((name, data))

    # ---- the sockets -------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            try:
                client = await Client.open(self.url, **self.connect_options)
            except _LOST:
                await self._failed()
                continue
            # Live events that come while the socket is restored wait, so
            # that what the resume returns (older) is delivered first.
            held: list[tuple[str, Any, int | None]] = []
            client.on_event = lambda name, data, seq: held.append((name, data, seq))
            try:
                await self._restore(client)
            except RpcError as exc:
                await client.close()
                if exc.code not in _FOR_GOOD:
                    await self._failed()
                    continue
                self.error = exc
                self._changed.set()
                return
            except _LOST:
                await client.close()
                await self._failed()
                continue
            self._client = client
            for event in held:
                self._on_event(*event)
            client.on_event = self._on_event
            self.backoff.reset()
            self.sockets += 1
            if self.sockets > 1:
                self._local("client.reconnected", {"attempts": self.failed_attempts})
            self._ready.set()
            self._changed.set()
            try:
                await client.closed.wait()
            finally:
                self._ready.clear()
                await client.close()
            await asyncio.sleep(self.backoff.next())

    async def _failed(self) -> None:
        self.failed_attempts += 1
        await asyncio.sleep(self.backoff.next())

    async def _restore(self, client: Client) -> None:
        """Authenticate, resume user events, re-join rooms: all before the
        socket is handed to any call."""
        if self.access_token is None:
            return
        try:
            result = await client.call("auth.authenticate", {"access_token": self.access_token})
        except RpcError as exc:
            if exc.code not in _SIGNED_OUT or (self.refresh_token is None and self.refresh_tokens is None):
                raise
            await self._refresh(client)
            result = await client.call("auth.authenticate", {"access_token": self.access_token})
        self._follow_user_events(result["user"])
        if self.user_events is not None:
            await self._resume(client, self.user_events)
        for room, window in list(self.rooms.items()):
            params = {"conversation_id": room, "since_seq": window.through}
            try:
                joined = await client.call("chat.join", params)
            except RpcError as exc:
                if exc.code is not ErrorCode.NOT_FOUND:
                    raise
                # The room is no longer this user's to follow: say so, go on.
                del self.rooms[room]
                self._local("client.resync", {"scope": "chat", "conversation_id": room})
                continue
            self._joined(params, joined, deliver=True)

    async def _resume(self, client: Client, window: SeqWindow) -> None:
        while True:
            page = await client.call("events.resume", {"since_seq": window.through})
            if page["truncated"]:
                window.skip_to(page["events"][0]["seq"] - 1 if page["events"] else page["last_seq"])
                self._local("client.resync", {"scope": "events"})
            for stored in page["events"]:
                if window.take(stored["seq"]):
                    self.events.put_nowait((stored["event"], stored["data"]))
            if not page["has_more"] or not page["events"]:
                return

    async def _refresh(self, client: Client) -> None:
        if self.refresh_tokens is not None:
            self.access_token, self.refresh_token = await self.refresh_tokens()
            return
        tokens = await client.call("auth.refresh", {"refresh_token": self.refresh_token})
        self.access_token, self.refresh_token = tokens["access_token"], tokens["refresh_token"]

    def _on_event(self, name: str, data: Any, seq: int | None) -> None:
        if seq is not None:
            if self.user_events is None:
                self._early_user.append(seq)
            elif not self.user_events.take(seq):
                return
        if name == "chat.message":
            message = data["message"]
            window = self.rooms.get(message["conversation_id"])
            if window is not None:
                if not window.take(message["seq"]):
                    return
            elif message["conversation_id"] in self._joining:
                self._joining[message["conversation_id"]].append(message["seq"])
        self.events.put_nowait((name, data))
        client = self._client
        if name == "auth.expiring" and client is not None and (
                self.refresh_token is not None or self.refresh_tokens is not None):
            self._spawn(self._refresh_on(client))

    async def _refresh_on(self, client: Client) -> None:
        try:
            await self._refresh(client)
            await client.call("auth.authenticate", {"access_token": self.access_token})
        except (RpcError, *_LOST):
            pass  # the next reconnect authenticates (and refreshes) again

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

