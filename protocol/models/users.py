"""Users, hosts and KYC."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, field_validator

from protocol import cursors
from protocol.methods import MethodSpec
from protocol.models.common import Id, Money, PageParams, Params, PositiveMoney, Result, Time, name_text

KycStatus = Literal["pending", "verified", "rejected"]
Name = name_text(1, 255)
Gender = name_text(1, 20)
PRICE_MIN = Decimal("1.00")
PRICE_MAX = Decimal("10000.00")


class PublicUser(Result):
    """What any signed-in user may see of another (never email or balance)."""

    id: Id
    name: str
    gender: str
    kyc_status: KycStatus
    price_per_hour: Optional[Money]
    created_at: Time


class OwnUser(PublicUser):
    email: str
    balance: Money
    # The user's latest event number (events.resume), 0 before any.
    event_seq: int


class MeParams(Params):
    pass


class UpdateParams(Params):
    name: Optional[Name] = None
    gender: Optional[Gender] = None
    # Absent = unchanged; explicit null = not bookable.
    price_per_hour: Optional[Money] = Field(default=None)

    @field_validator("name", "gender")
    @classmethod
    def _not_null(cls, v: Optional[str]) -> str:
        if v is None:
            raise ValueError("may be omitted but not null")
        return v

    @field_validator("price_per_hour")
    @classmethod
    def _price_range(cls, v: Optional[Decimal]) -> Optional[Decimal]:
        if v is not None and not (PRICE_MIN <= v <= PRICE_MAX):
            raise ValueError("must be between 1.00 and 10000.00")
        return v


class GetParams(Params):
    user_id: Id


class UserUpdatedEvent(Result):
    user: OwnUser


class SearchParams(PageParams):
    start_at: Optional[Time] = None
    end_at: Optional[Time] = None
    min_price: Optional[PositiveMoney] = None
    max_price: Optional[PositiveMoney] = None
    gender: Optional[Gender] = None

    cursor_key = (cursors.PRICE, cursors.ID)  # price then id, as the list is ordered

    @classmethod
    def raw_errors(cls, raw: dict[Any, Any]) -> list[dict[str, str]]:
        errors = super().raw_errors(raw)
        given = {name for name in ("start_at", "end_at") if raw.get(name) is not None}
        if len(given) == 1:
            (missing,) = {"start_at", "end_at"} - given
            errors.append({"field": missing, "reason": "start_at and end_at go together"})
        return errors

    @field_validator("end_at")
    @classmethod
    def _range(cls, v: Optional[dt.datetime], info) -> Optional[dt.datetime]:
        start = info.data.get("start_at")
        if v is not None and start is not None and v <= start:
            raise ValueError("must be after start_at")
        return v


class SearchResult(Result):
    hosts: list[PublicUser]
    next_cursor: Optional[str]


class AvailabilityParams(Params):
    host_id: Id
    from_: Time = Field(alias="from")
    to: Time

    @field_validator("to")
    @classmethod
    def _range(cls, v: dt.datetime, info) -> dt.datetime:
        start = info.data.get("from_")
        if start is not None:
            if v <= start:
                raise ValueError("must be after from")
            if v - start > dt.timedelta(days=31):
                raise ValueError("range is at most 31 days")
        return v


class BusyInterval(Result):
    start_at: Time
    end_at: Time


class AvailabilityResult(Result):
    busy: list[BusyInterval]


METHODS = (
    MethodSpec("users.me", MeParams, OwnUser),
    MethodSpec("users.update", UpdateParams, OwnUser),
    MethodSpec("users.get", GetParams, PublicUser),
    MethodSpec("hosts.search", SearchParams, SearchResult),
    MethodSpec("hosts.availability", AvailabilityParams, AvailabilityResult),
)
EVENTS = {"user.updated": UserUpdatedEvent}
