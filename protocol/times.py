"""Reading input times: every time a client sends becomes an aware UTC
``datetime`` (years 1 to 9999, to the microsecond) or a ValueError, which
the params models report as ``invalid_params``.

A datetime holds microseconds; a MessagePack Timestamp holds nanoseconds and
an RFC 3339 string any number of fraction digits. Readers here return the
time rounded down to the microsecond together with whether something below
the microsecond was dropped, so that a rule that needs the exact instant
(bookings are whole hours) can refuse it rather than lose it silently."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import msgpack

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

OUT_OF_RANGE = "time out of range (years 1 to 9999 in UTC)"

# A fraction of a second (or of an offset) in a string fromisoformat reads.
_FRACTION = re.compile(r"[.,](\d+)")


def read_time(value: Any) -> tuple[dt.datetime, bool]:
    """An input time (a datetime, a Timestamp the codec left as it is, or an
    RFC 3339 string with an offset) in UTC, rounded down to the microsecond,
    and whether a part below the microsecond was dropped."""
    truncated = False
    if isinstance(value, msgpack.Timestamp):  # one the codec could not make a datetime
        when, truncated = timestamp_time(value)
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
        truncated = below_microsecond(text)
    else:
        raise ValueError("must be a timestamp or an RFC 3339 string")
    return in_utc(when), truncated


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


def timestamp_time(ts: msgpack.Timestamp) -> tuple[dt.datetime, bool]:
    """A Timestamp as a UTC datetime rounded down to the microsecond, and
    whether nanoseconds were dropped; beyond years 1-9999 a ValueError."""
    try:
        when = EPOCH + dt.timedelta(seconds=ts.seconds, microseconds=ts.nanoseconds // 1000)
    except OverflowError:
        raise ValueError(OUT_OF_RANGE) from None
    return when, ts.nanoseconds % 1000 != 0


def below_microsecond(text: str) -> bool:
    """Whether an ISO 8601 text has a nonzero digit past the sixth of a
    fraction, which ``datetime.fromisoformat`` drops without a word."""
    return any(digits[6:].strip("0") for digits in _FRACTION.findall(text))
