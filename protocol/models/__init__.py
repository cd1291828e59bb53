"""Pydantic models of every method's params and result and every event.

``METHODS`` maps a method name to ``(Params, Result)``; ``EVENTS`` maps an
event name to its payload model. The protocol reference in docs/ is
generated from these tables (``python -m protocol.docs``).
"""

from __future__ import annotations

from protocol.models import auth, bookings, chat, users, wallet

METHODS: dict[str, tuple[type, type]] = {}
EVENTS: dict[str, type] = {}

for _service in (auth, users, wallet, bookings, chat):
    METHODS.update(_service.METHODS)
    EVENTS.update(_service.EVENTS)
