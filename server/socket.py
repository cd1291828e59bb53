"""One WebSocket's lifecycle, from its three parts: the transport
(``server.transport``: reading, writing, closing), the dispatcher
(``server.dispatch``: calls) and the auth binding (``server.binding``: who
it is signed in as, and the socket as the hub and handlers see it).

The socket's tasks are the transport's writer and the dispatcher's calls;
``serve`` cancels and awaits them all when the socket ends.
"""

from __future__ import annotations

import uuid

from aiohttp import WSCloseCode, web

from server.binding import AuthBinding
from server.dispatch import Dispatcher
from server.services import Services
from server.transport import Transport


class Connection:
    """A client socket. ``services.connections`` holds those being served."""

    __slots__ = ("_hub", "transport", "binding", "dispatcher")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, services: Services, address: str) -> None:
        self._hub = services.hub
        self.transport = Transport(ws, request, services.config, deadlines=services.deadlines, spawn=services.spawn,
                                   on_stop=self._leave_channels)
        self.binding = AuthBinding(services, self.transport.send_event, address)
        self.dispatcher = Dispatcher(services, self.transport, self.binding)

    @property
    def user_id(self) -> uuid.UUID | None:
        return self.binding.user_id

    @property
    def token_family(self) -> uuid.UUID | None:
        return self.binding.token_family

    def stats(self) -> dict[str, int | bool]:
        """The outgoing side as it stands (test servers' ``test.sockets``):
        replies queued over the socket's life, calls in flight, replies
        queued and not yet sent, and whether reading waits for the peer."""
        transport = self.transport
        return {
            "replies": transport.replies,
            "calls_in_flight": self.dispatcher.calls_in_flight,
            "queued_replies": transport.queued_replies,
            "reading_paused": transport.reading_paused,
        }

    def _leave_channels(self) -> None:
        self._hub.unfollow_all(self.binding)

    def _sign_in_deadline_passed(self) -> None:
        if not self.transport.closing:
            self.transport.close_soon(WSCloseCode.POLICY_VIOLATION, "not authenticated in time")

    async def serve(self) -> None:
        self.binding.watch_sign_in(self._sign_in_deadline_passed)
        try:
            await self.transport.serve(self.dispatcher.on_frame)
        finally:
            self.transport.closing = True
            self.binding.end()
            self._leave_channels()
            await self.dispatcher.cancel_calls()
            await self.transport.finish()

    async def drain(self, timeout: float) -> None:
        """Shutdown: take no new calls, let running ones finish, then 1001."""
        self.dispatcher.draining = True
        await self.dispatcher.wait_calls(timeout)
        await self.transport.flush(1.0)  # the replies of the calls that just finished
        await self.transport.close(WSCloseCode.GOING_AWAY, "server shutting down")
