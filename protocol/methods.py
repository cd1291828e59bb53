"""How the contract declares a method: ``MethodSpec``.

A method is declared once, here in ``protocol/``: its name, its params and
result models, and whether it needs an authenticated socket. The server's
handlers are found from these declarations (``server.rpc``), and the
reference in docs/ is generated from them (``python -m protocol.docs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class MethodSpec:
    name: str
    params: type[BaseModel]
    # A result model, or ``dict`` for a method that answers ``{}``.
    result: type
    # Needs an authenticated socket (``unauthenticated`` / ``token_expired`` otherwise).
    auth: bool = True
