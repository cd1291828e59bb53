"""Value types shared by every model: ids, money, time, names, cursors, limits."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Callable, ClassVar, Optional

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, GetJsonSchemaHandler, PlainSerializer, PlainValidator, WithJsonSchema,
)

from protocol.cursors import KeyPart
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


# A money input string: ASCII digits, at most two places, nothing else (no
# sign, exponent, underscore, whitespace or other digits). fullmatch, as
# ``$`` would also match before a trailing newline.
_MONEY_INPUT = re.compile(r"[0-9]+(\.[0-9]{1,2})?", re.ASCII)


def _parse_money(value: Any) -> Decimal:
    """Money as the database gives it (a Decimal, in results) or as a
    client sends it (a string or an integer, in params)."""
    # Floats are refused outright: 0.1 + 0.2 has no place in a ledger.
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError("must be a decimal string or an integer, not a float")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        amount = value
        if not amount.is_finite():
            raise ValueError("must be a finite amount")
        if amount.as_tuple().exponent < -2:  # type: ignore[operator]
            raise ValueError("at most two decimal places")
    elif isinstance(value, str):
        if not _MONEY_INPUT.fullmatch(value):
            raise ValueError("must be a decimal string such as \"25.00\": digits, at most two places")
        amount = Decimal(value)
    else:
        raise ValueError("must be a decimal string or an integer")
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


# The key under which a wire type names itself in pydantic's JSON Schema.
WIRE_KEY = "x-hangout-wire"


@dataclass(frozen=True)
class Wire:
    """Names how a value type travels (``kind``: "uuid", "money" or
    "timestamp"; ``rule``: a further rule of its input, such as
    "whole-hour"), so that the machine-readable contract
    (``python -m protocol.schema``) can describe it: pydantic alone sees
    only a validator function. It adds one key to pydantic's schema and
    changes nothing about validation."""

    kind: str
    rule: Optional[str] = None

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        schema = handler(core_schema)
        schema[WIRE_KEY] = f"{self.kind}/{self.rule}" if self.rule else self.kind
        return schema


Id = Annotated[uuid.UUID, PlainValidator(_parse_id), PlainSerializer(str, return_type=str), Wire("uuid")]
Money = Annotated[Decimal, PlainValidator(_parse_money), PlainSerializer(_dump_money, return_type=str), Wire("money")]
Time = Annotated[dt.datetime, PlainValidator(_parse_time), Wire("timestamp")]
# A time that is a whole UTC hour exactly: a remainder even below the
# microsecond is refused, not dropped.
WholeHour = Annotated[dt.datetime, PlainValidator(_parse_time_whole_hour), Wire("timestamp", "whole-hour")]


def _parse_money_positive(value: Any) -> Decimal:
    amount = _parse_money(value)
    if amount <= 0:
        raise ValueError("must be more than 0.00")
    return amount


# Every money input of the protocol is > 0; results use Money (a balance can be 0).
PositiveMoney = Annotated[
    Decimal, PlainValidator(_parse_money_positive), PlainSerializer(_dump_money, return_type=str),
    Wire("money", "positive"),
]
Limit = Annotated[int, Field(ge=1, le=100, strict=True)]
# Opaque to clients: what a cursor holds and whom it serves is the server's (server/cursors.py).
Cursor = Annotated[str, Field(min_length=1, max_length=512, strict=True)]


# Unicode's White_Space property. str.strip() differs: it also strips the
# control characters U+001C-U+001F, which a name must not hold at all.
WHITE_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Control characters (category Cc) and the bidirectional embeddings,
# overrides and isolates, which can make a name display as another.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# What chat content may not hold: Cc except tab, newline and carriage return.
_CONTENT_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _name_of(min_length: int, max_length: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        value = value.strip(WHITE_SPACE)
        if not value:
            raise ValueError("must not be empty or only white space")
        if len(value) > max_length:
            raise ValueError(f"at most {max_length} characters")
        if len(value) < min_length:
            raise ValueError(f"at least {min_length} characters")
        if has_control(value):
            raise ValueError("must not hold control or bidirectional control characters")
        return value

    return check


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (Cc) or a bidirectional control."""
    return _CONTROL.search(text) is not None


def name_text(min_length: int, max_length: int) -> Any:
    """A name-like text (a user's name, a gender): trimmed of White_Space,
    its length limits counted after trimming, no control characters."""
    return Annotated[
        str,
        Field(strict=True),
        AfterValidator(_name_of(min_length, max_length)),
        WithJsonSchema({"type": "string", "minLength": min_length, "maxLength": max_length}),
    ]


def check_content(value: str) -> str:
    """Free text (chat content): kept exactly as sent; tab, newline and
    carriage return are its only control characters."""
    if _CONTENT_CONTROL.search(value):
        raise ValueError("must not hold control characters other than tab, newline and carriage return")
    return value


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
    ``cursor`` of the previous page's ``next_cursor``. The server makes and
    checks cursors (a cursor is bound to its method and to every other
    param, its filters); a model names only the parts of its sort key."""

    limit: Limit = 20
    cursor: Optional[Cursor] = None

    # The parts of the sort key a cursor of this list holds.
    cursor_key: ClassVar[tuple[KeyPart, ...]] = ()
    # Params that are not filters: a cursor stays good when they change.
    NOT_FILTERS: ClassVar[frozenset[str]] = frozenset({"limit", "cursor"})


class EmptyResult(Result):
    pass
