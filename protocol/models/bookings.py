"""bookings.* methods and the booking.created|cancelled|completed events.

Decisions where the contract is silent:
- Only an ``insufficient_funds`` outcome is stored (as a ``failed``
  booking). A call refused for any other reason (``slot_unavailable``,
  ``kyc_required``, ``host_not_bookable``, ``not_found``, ``invalid_params``)
  stores nothing, so its key may be used again.
- ``amount`` is the host's price at the moment of booking times the hours;
  a later price change does not alter it.
- ``bookings.cancel`` of a ``failed`` or ``completed`` booking, or of a
  confirmed one whose start has passed, is ``invalid_state``.
- ``bookings.list`` orders by ``start_at`` then ``id``, both newest first.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal, Optional

from pydantic import ValidationInfo, field_validator

from protocol import cursors
from protocol.methods import MethodSpec
from protocol.models.common import UTC, Id, Money, PageParams, Params, Result, Time, WholeHour
from protocol.models.wallet import IdempotencyKey

# The invalid_params error of a new booking whose start is not in the future.
START_PASSED = {"field": "start_at", "reason": "must be in the future"}

BookingStatus = Literal["pending", "confirmed", "completed", "failed", "cancelled"]
Role = Literal["booker", "host", "any"]
HOUR = dt.timedelta(hours=1)
MIN_HOURS = 1
MAX_HOURS = 12
MAX_AHEAD = dt.timedelta(days=90)


class Booking(Result):
    id: Id
    user_id: Id  # the booker
    host_id: Id
    start_at: Time
    end_at: Time
    status: BookingStatus
    amount: Money
    created_at: Time
    updated_at: Time
    conversation_id: Optional[Id]  # null for a failed booking


class CreateParams(Params):
    host_id: Id
    start_at: WholeHour
    end_at: WholeHour
    idempotency_key: IdempotencyKey

    # Time rules live here so that the error names the field that breaks them,
    # all but "start in the future": that one is checked after the
    # idempotency key (server/db/bookings.create), so that a retry sent after
    # the start still gets its booking back. The error is the same
    # (``START_PASSED``).
    @field_validator("start_at")
    @classmethod
    def _start(cls, v: dt.datetime) -> dt.datetime:
        if v - dt.datetime.now(UTC) > MAX_AHEAD:
            raise ValueError("must be at most 90 days ahead")
        return v

    @field_validator("end_at")
    @classmethod
    def _end(cls, v: dt.datetime, info: ValidationInfo) -> dt.datetime:
        start = info.data.get("start_at")
        if start is not None and not MIN_HOURS * HOUR <= v - start <= MAX_HOURS * HOUR:
            raise ValueError(f"must be {MIN_HOURS} to {MAX_HOURS} hours after start_at")
        return v


class CreateResult(Result):
    booking: Booking
    replayed: bool


class BookingIdParams(Params):
    booking_id: Id


class CancelResult(Result):
    booking: Booking


class ListParams(PageParams):
    role: Role = "any"
    status: Optional[BookingStatus] = None

    cursor_key = (cursors.TIME, cursors.ID)  # start_at then id, as the list is ordered


class ListResult(Result):
    """Newest ``start_at`` first."""

    bookings: list[Booking]
    next_cursor: Optional[str]


class BookingEvent(Result):
    booking: Booking


METHODS = (
    MethodSpec("bookings.create", CreateParams, CreateResult),
    MethodSpec("bookings.cancel", BookingIdParams, CancelResult),
    MethodSpec("bookings.get", BookingIdParams, Booking),
    MethodSpec("bookings.list", ListParams, ListResult),
)
EVENTS = {
    "booking.created": BookingEvent,
    "booking.cancelled": BookingEvent,
    "booking.completed": BookingEvent,
}
