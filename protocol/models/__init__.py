"""Pydantic models of every method's params and result and every event.

``METHODS`` maps a method name to ``(Params, Result)``; ``EVENTS`` maps an
event name to its payload model. The protocol reference in docs/ is
generated from these tables (``python -m protocol.docs``).
"""

from __future__ import annotations

import importlib

_SERVICES = ("auth", "users", "wallet", "bookings", "chat")

METHODS: dict[str, tuple[type, type]] = {}
EVENTS: dict[str, type] = {}

for _name in _SERVICES:
    try:
        _mod = importlib.import_module(f"protocol.models.{_name}")
    except ModuleNotFoundError as exc:  # a service not written yet
        if exc.name != f"protocol.models.{_name}":
            raise
        continue
    METHODS.update(getattr(_mod, "METHODS", {}))
    EVENTS.update(getattr(_mod, "EVENTS", {}))
