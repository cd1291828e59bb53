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

    @property
    def user_id(self) -> uuid.UUID:
        """The authenticated caller (guaranteed for ``auth=True`` methods)."""
        uid = self.conn.user_id
        assert uid is not None
        return uid


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
