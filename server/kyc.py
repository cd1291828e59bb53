"""KYC status changes: the provider's signed webhook events and the
operator's command, and the ``user.updated`` they push.

The webhook's signature covers a timestamp and the raw body
(server/signing.py). A signature more than ``SIGNATURE_WINDOW_S`` from this
server's clock is refused, so a captured request can be replayed only
within that window; within it, the event id (recorded in PostgreSQL with
the change, sql/011) makes a replay change nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import json
import re
import unicodedata
import uuid
from typing import TYPE_CHECKING

from protocol.models import users as m
from protocol.models.common import parse_uuid
from server import signing
from server.db import kyc as kyc_db
from server.handlers.users import publish_user_updated

if TYPE_CHECKING:
    from server.services import Services

STATUSES = ("pending", "verified", "rejected")
SIGNATURE_WINDOW_S = 300
# Past the signature window, an id only guards against the provider's own
# re-deliveries, which are freshly signed and carry the same event id:
# providers retry for up to about 3 days, so ids are kept a week.
EVENT_RETENTION = dt.timedelta(days=7)
EVENT_ID_MAX_CHARS = 255

# Strict: digits only (a bounded count, so int() stays cheap) and 64 hex digits.
_SIGNATURE = re.compile(r"t=([0-9]{1,15}),sha256=([0-9a-fA-F]{64})")


def signature_valid(secret: str, header: str | None, body: bytes, now: int) -> bool:
    """``header`` is a good signature of ``body``, made within the window of
    ``now`` (whole unix seconds) in either direction."""
    match = _SIGNATURE.fullmatch(header) if header is not None else None
    if match is None:
        return False
    t, given = match.group(1), match.group(2)
    expected = signing.digest(secret, t, body)
    # Checked before the window: a forger learns nothing from which test failed.
    good = hmac.compare_digest(given.lower().encode(), expected.encode())
    return good and abs(now - int(t)) <= SIGNATURE_WINDOW_S


@dataclasses.dataclass(frozen=True)
class Event:
    event_id: str
    user_id: uuid.UUID
    status: str


def parse_event(body: bytes) -> Event | str:
    """The event in a signed body, or why it is malformed."""
    try:
        data = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        return "malformed body"
    if not isinstance(data, dict):
        return "malformed body"
    try:
        user_id = parse_uuid(data["user_id"]) if isinstance(data.get("user_id"), str) else None
    except ValueError:
        user_id = None
    if user_id is None:
        return "user_id must be a UUID"
    event_id = data.get("event_id")
    if not (isinstance(event_id, str) and _event_id_ok(event_id)):
        return f"event_id must be a string of 1-{EVENT_ID_MAX_CHARS} characters, none of them a control character"
    status = data.get("status")
    if status not in STATUSES:
        return "unknown status"
    return Event(event_id, user_id, status)


def _event_id_ok(event_id: str) -> bool:
    # Control characters and lone surrogates (JSON may hold "\ud800"):
    # PostgreSQL cannot store NUL or a surrogate, and no provider's id has them.
    return 1 <= len(event_id) <= EVENT_ID_MAX_CHARS and not any(
        unicodedata.category(ch) in ("Cc", "Cs") for ch in event_id
    )


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


async def apply_event(services: "Services", event: Event) -> tuple[str, m.OwnUser | None]:
    """Apply a webhook event once; pushes ``user.updated`` only when it
    changed the status. Returns (outcome from server.db.kyc, the user)."""
    outcome, row = await services.db.write(event.user_id, kyc_db.apply_event, event.event_id, event.user_id, event.status)
    user = m.OwnUser.model_validate(dict(row)) if row is not None else None
    if outcome == kyc_db.CHANGED:
        assert user is not None
        await publish_user_updated(services, user)
    return outcome, user


async def set_status(services: "Services", user_id: uuid.UUID, status: str) -> tuple[m.OwnUser | None, bool]:
    """The operator's change; pushes ``user.updated`` only on a change.
    Returns (user or None when unknown, changed)."""
    row, changed = await services.db.write(user_id, kyc_db.set_status, user_id, status)
    if row is None:
        return None, False
    user = m.OwnUser.model_validate(dict(row))
    if changed:
        await publish_user_updated(services, user)
    return user, changed
