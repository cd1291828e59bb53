"""The method registry: ``@rpc("bookings.create")`` over an async handler.

A method is declared once, in ``protocol.models.METHODS`` (its name, params,
result and whether it needs an authenticated socket); ``rpc`` finds that
declaration by name, and fails at import when the contract has no such
method. Methods outside the contract (the test servers' own, in
``tests/debug_methods.py``) pass a ``MethodSpec`` of their own instead.

A handler receives a ``Call`` (who is calling, on which socket, with which
services) and its validated params, and returns a result model (or a plain
dict for ``{}``). Errors are raised as ``RpcError``; only the dispatcher
(``server.dispatch``) turns results and errors into frames.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from protocol.errors import ErrorCode, RpcError
from protocol.methods import MethodSpec
from protocol.models import METHODS as DECLARED
from server.services import Services

__all__ = ["rpc", "METHODS", "Method", "Call", "Socket", "RpcError", "ErrorCode"]


class Socket(Protocol):
    """The socket a call came in on, as handlers see it (``server.binding``):
    who it is bound to, binding and unbinding it, and, as a follower of the
    hub's channels, taking events."""

    user_id: uuid.UUID | None
    token_family: uuid.UUID | None
    # The client's address as the edge sees it (``server.edge``).
    address: str
    # The access token expired: the socket stays bound but gets no events.
    events_suspended: bool

    async def bind(self, user_id: uuid.UUID, family: uuid.UUID | None, expires_at: dt.datetime) -> None: ...

    def unbind(self) -> None: ...

    def send_event(self, frame: bytes) -> None: ...


@dataclass(slots=True)
class Call:
    services: Services
    conn: Socket
    # Who the socket was bound to when the call arrived. The socket may be
    # bound to someone else (or to no one) by the time the call finishes: a
    # call's writes, events and read-your-writes positions stay its caller's.
    caller: uuid.UUID | None

    @property
    def user_id(self) -> uuid.UUID:
        """The authenticated caller (guaranteed for methods that need auth)."""
        assert self.caller is not None
        return self.caller

    def still_bound(self) -> bool:
        """The socket is still the caller's, with its events flowing: only then
        may the call attach the socket to the caller's things (rooms)."""
        return self.caller is not None and self.conn.user_id == self.caller and not self.conn.events_suspended


Handler = Callable[[Call, Any], Awaitable[Any]]


@dataclass(slots=True, frozen=True)
class Method:
    spec: MethodSpec
    handler: Handler


METHODS: dict[str, Method] = {}


def rpc(method: str | MethodSpec) -> Callable[[Handler], Handler]:
    """Register the handler of ``method``: a name declared in
    ``protocol.models.METHODS``, or, for a method outside the contract
    (tests only), its own ``MethodSpec``."""
    if isinstance(method, str):
        spec = DECLARED.get(method)
        if spec is None:
            raise LookupError(f"method {method} is not declared in protocol.models")
    else:
        spec = method

    def register(handler: Handler) -> Handler:
        if spec.name in METHODS:
            raise RuntimeError(f"method {spec.name} registered twice")
        METHODS[spec.name] = Method(spec, handler)
        return handler

    return register
