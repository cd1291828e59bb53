"""Reading input times: every time a client sends becomes an aware UTC
``datetime`` (years 1 to 9999) or a ValueError, which the params models
report as ``invalid_params``."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgpack

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

OUT_OF_RANGE = "time out of range (years 1 to 9999 in UTC)"


def read_time(value: Any) -> dt.datetime:
    """An input time (a datetime, a Timestamp the codec left as it is, or an
    RFC 3339 string with an offset) in UTC."""
    if isinstance(value, msgpack.Timestamp):  # one the codec could not make a datetime
        when = timestamp_time(value)
    elif isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("z", "Z")):
            text = text[:-1] + "+00:00"
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("must be an RFC 3339 time with an offset") from None
        if "T" not in text.upper():
            raise ValueError("must be an RFC 3339 time with an offset")
    else:
        raise ValueError("must be a timestamp or an RFC 3339 string")
    return in_utc(when)


def in_utc(when: dt.datetime) -> dt.datetime:
    """An aware datetime in UTC. One that UTC cannot hold (year 1 with a
    positive offset, year 9999 with a negative one) is a ValueError:
    ``astimezone`` raises OverflowError, which pydantic does not report as a
    validation error, and which asyncpg meets again when it encodes it."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("time must carry a UTC offset")
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise ValueError(OUT_OF_RANGE) from None


def timestamp_time(ts: msgpack.Timestamp) -> dt.datetime:
    """A Timestamp as a UTC datetime, rounded down to the microsecond as
    msgpack does; beyond years 1-9999 a ValueError."""
    try:
        when = EPOCH + dt.timedelta(seconds=ts.seconds, microseconds=ts.nanoseconds // 1000)
    except OverflowError:
        raise ValueError(OUT_OF_RANGE) from None
    return when

