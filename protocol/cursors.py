"""The values a keyset cursor holds: the last row's sort key.

A cursor is opaque to clients and made by the server alone (the server signs
it and binds it to its method and filters, ``server/cursors.py``). Each
paginated params model names the parts of its key (``PageParams.cursor_key``);
each part writes its value as a string and reads back only what it wrote, so
that a value in a cursor is always finite and in range, whatever the
cursor holds.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

from protocol.times import in_utc

_PRICE = re.compile(r"[0-9]{1,12}\.[0-9]{2}", re.ASCII)
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)
# What ``datetime.isoformat()`` writes for an aware time: to the microsecond, with its offset.
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?[+-][0-9]{2}:[0-9]{2}", re.ASCII)


@dataclass(frozen=True, slots=True)
class KeyPart:
    name: str
    dump: Callable[[Any], str]
    # Reads a dumped value back; anything else is a ValueError.
    load: Callable[[Any], Any]


def _string(value: Any, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError("not a cursor value")
    return value


def _dump_time(when: dt.datetime) -> str:
    return in_utc(when).isoformat()


def _load_time(value: Any) -> dt.datetime:
    # A time UTC cannot hold is a ValueError here (in_utc), never an overflow further down.
    return in_utc(dt.datetime.fromisoformat(_string(value, _TIME)))


PRICE = KeyPart("price", lambda d: f"{d:.2f}", lambda v: Decimal(_string(v, _PRICE)))
TIME = KeyPart("time", _dump_time, _load_time)
ID = KeyPart("id", str, lambda v: uuid.UUID(_string(v, _ID)))
