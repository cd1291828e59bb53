"""Pydantic models of every method's params and result and every event.

``METHODS`` maps a method name to its ``MethodSpec`` (protocol/methods.py);
``EVENTS`` maps an event name to its payload model. The server finds its
handlers from ``METHODS``, and the protocol reference in docs/ is generated
from these tables (``python -m protocol.docs``).
"""

from __future__ import annotations

from protocol.methods import MethodSpec
from protocol.models import auth, bookings, chat, events, users, wallet

METHODS: dict[str, MethodSpec] = {}
EVENTS: dict[str, type] = {}

for _service in (auth, users, wallet, bookings, chat, events):
    for _spec in _service.METHODS:
        if _spec.name in METHODS:
            raise RuntimeError(f"method {_spec.name} declared twice")
        METHODS[_spec.name] = _spec
    EVENTS.update(_service.EVENTS)
