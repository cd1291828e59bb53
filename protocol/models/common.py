"""Value types shared by every model: ids, money, time, cursors, limits."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator

from protocol.cursors import BAD_CURSOR, decode_cursor
from protocol.errors import RpcError
from protocol.times import UTC, read_time

CENT = Decimal("0.01")


_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_HYPHENATED = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(text: str) -> uuid.UUID:
    """A UUID written as 8-4-4-4-12 or 32 hex digits (either case), maybe
    in braces, maybe after ``urn:uuid:``; anything else is a ValueError.
    ``uuid.UUID`` alone also reads what ``int(s, 16)`` does: ``"+123..."``,
    ``" 123..."`` or ``"12_34..."`` would name another id."""
    core = text[9:] if text[:9].lower() == "urn:uuid:" else text
    if core[:1] == "{" and core[-1:] == "}":
        core = core[1:-1]
    if not (_HEX32.fullmatch(core) or _HYPHENATED.fullmatch(core)):
        raise ValueError("not a UUID")
    return uuid.UUID(core)


def _parse_id(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return parse_uuid(value)
        except ValueError:
            pass
    raise ValueError("must be a UUID string")


def _parse_money(value: Any) -> Decimal:
    # Floats are refused outright: 0.1 + 0.2 has no place in a ledger.
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError("must be a decimal string or an integer, not a float")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError("must be a decimal string such as \"25.00\"") from None
    else:
        raise ValueError("must be a decimal string or an integer")
    if not amount.is_finite():
        raise ValueError("must be a finite amount")
    if amount.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ValueError("at most two decimal places")
    try:
        return amount.quantize(CENT)
    except InvalidOperation:  # more digits than the decimal context holds
        raise ValueError("amount out of range") from None


def _parse_time(value: Any) -> dt.datetime:
    # Where a time is only compared (search and availability ranges), it is
    # read rounded down to the microsecond, as PostgreSQL keeps times.
    return read_time(value)[0]


def _parse_time_whole_hour(value: Any) -> dt.datetime:
    # (Named _parse_time* so that protocol.docs shows the field as a time.)
    when, truncated = read_time(value)
    if truncated or when.minute or when.second or when.microsecond:
        raise ValueError("must be a whole UTC hour")
    return when


def _dump_money(value: Decimal) -> str:
    return f"{value:.2f}"


Id = Annotated[uuid.UUID, PlainValidator(_parse_id), PlainSerializer(str, return_type=str)]
Money = Annotated[Decimal, PlainValidator(_parse_money), PlainSerializer(_dump_money, return_type=str)]
Time = Annotated[dt.datetime, PlainValidator(_parse_time)]
# A time that is a whole UTC hour exactly: a remainder even below the
# microsecond is refused, not dropped.
WholeHour = Annotated[dt.datetime, PlainValidator(_parse_time_whole_hour)]


def _parse_money_positive(value: Any) -> Decimal:
    amount = _parse_money(value)
    if amount <= 0:
        raise ValueError("must be more than 0.00")
    return amount


# Every money input of the protocol is > 0; results use Money (a balance can be 0).
PositiveMoney = Annotated[
    Decimal, PlainValidator(_parse_money_positive), PlainSerializer(_dump_money, return_type=str)
]
Limit = Annotated[int, Field(ge=1, le=100, strict=True)]
Cursor = Annotated[str, Field(min_length=1, max_length=512, strict=True)]


class Params(BaseModel):
    """Base of every method's params. Unknown keys are ignored so that older
    servers accept newer clients; known keys are validated strictly (no
    string-to-number coercion)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @classmethod
    def raw_errors(cls, raw: dict[Any, Any]) -> list[dict[str, str]]:
        """Rules over the raw params that no single field's validator can
        check; the dispatcher reports them with the field errors, so that an
        invalid_params names every failing field at once."""
        return []


class Result(BaseModel):
    """Base of every result, object and event payload."""

    model_config = ConfigDict(extra="ignore")


class PageParams(Params):
    """A keyset-paginated list: ``limit`` 1-100 (default 20) and the opaque
    ``cursor`` of the previous page's ``next_cursor``."""

    limit: Limit = 20
    cursor: Optional[Cursor] = None

    # The types of the sort key a cursor of this list holds.
    cursor_key: ClassVar[tuple[Callable[[Any], Any], ...]] = ()

    def after(self) -> tuple | None:
        """The sort key of the last row of the previous page, or None."""
        return decode_cursor(self.cursor, *self.cursor_key)

    @classmethod
    def raw_errors(cls, raw: dict[Any, Any]) -> list[dict[str, str]]:
        cursor = raw.get("cursor")
        if isinstance(cursor, str) and cursor:
            try:
                decode_cursor(cursor, *cls.cursor_key)
            except RpcError:
                return [*super().raw_errors(raw), BAD_CURSOR]
        return super().raw_errors(raw)


class EmptyResult(Result):
    pass
