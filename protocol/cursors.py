"""Opaque keyset cursors: a urlsafe-base64 JSON list of the last row's sort key.

Clients only hand back what a page gave them. Each paginated params model
names the types of its key (``PageParams.cursor_key``), so that a cursor
that does not decode is reported with the other invalid params."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any, Callable, Sequence

from protocol.errors import ErrorCode, RpcError
from protocol.times import in_utc


# The invalid_params error of a cursor that does not decode as one of its list.
BAD_CURSOR = {"field": "cursor", "reason": "not a cursor from this list"}


def encode_cursor(*values: Any) -> str:
    raw = json.dumps([str(v) if not isinstance(v, (int, str)) else v for v in values], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def aware_time(text: str) -> dt.datetime:
    """A cursor's time value (written with ``datetime.isoformat()``), which
    must carry its offset, in UTC: a time that UTC cannot hold is no cursor
    of ours (and would otherwise fail in asyncpg, as ``internal``)."""
    return in_utc(dt.datetime.fromisoformat(text))


def decode_cursor(cursor: str | None, *types: Callable[[Any], Any]) -> tuple | None:
    """Decode and convert each value with ``types``; a bad cursor is invalid_params."""
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values: Sequence[Any] = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(values, list) or len(values) != len(types):
            raise ValueError("wrong shape")
        return tuple(t(v) for t, v in zip(types, values))
    except Exception:
        raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": [BAD_CURSOR]}) from None
