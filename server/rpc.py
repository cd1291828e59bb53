"""The method registry: ``@rpc(name, Params, auth=True)`` over an async handler.

A handler receives a ``Call`` (who is calling, on which socket, with which
services) and its validated params, and returns a result model (or a plain
dict for ``{}``). Errors are raised as ``RpcError``; only the dispatcher in
``server.socket`` turns results and errors into frames.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pydantic import BaseModel

from protocol.errors import ErrorCode, RpcError

if TYPE_CHECKING:
    from server.services import Services
    from server.socket import Connection

__all__ = ["rpc", "METHODS", "Method", "Call", "RpcError", "ErrorCode"]


@dataclass(slots=True)
class Call:
    services: "Services"
    conn: "Connection"
    # Who the socket was bound to when the call arrived. The socket may be
    # bound to someone else (or to no one) by the time the call finishes: a
    # call's writes, events and read-your-writes positions stay its caller's.
    caller: uuid.UUID | None

    @property
    def user_id(self) -> uuid.UUID:
        """The authenticated caller (guaranteed for ``auth=True`` methods)."""
        assert self.caller is not None
        return self.caller

    def still_bound(self) -> bool:
        """The socket is still the caller's, with its events flowing: only then
        may the call attach the socket to the caller's things (rooms)."""
        return self.caller is not None and self.conn.user_id == self.caller and not self.conn.events_suspended


Handler = Callable[[Call, Any], Awaitable[Any]]


@dataclass(slots=True, frozen=True)
class Method:
    name: str
    params: type[BaseModel]
    handler: Handler
    auth: bool


METHODS: dict[str, Method] = {}


def rpc(name: str, params: type[BaseModel], *, auth: bool = True) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        if name in METHODS:
            raise RuntimeError(f"method {name} registered twice")
        METHODS[name] = Method(name, params, handler, auth)
        return handler

    return register
