"""Frame codec: one MessagePack map per binary WebSocket frame.

Times travel as the MessagePack Timestamp extension (type -1) in UTC, money as
decimal strings and ids as canonical UUID strings. Pydantic models already
dump money and ids as strings; ``_default`` covers values that reach the
encoder directly.

A Timestamp that a datetime holds exactly decodes as an aware UTC datetime.
Any other (a part below the microsecond, or beyond years 1-9999) stays a
``msgpack.Timestamp``: the frame is still a request, and the params models
judge the value (``protocol.models.common.Time``), so that it is
``invalid_params`` naming its field rather than a frame that cannot be read,
and its nanoseconds are not dropped before a rule can see them.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from decimal import Decimal
from typing import Any

import msgpack

from protocol.times import timestamp_time

__all__ = ["encode", "decode", "DecodeError", "SUBPROTOCOL"]

# The WebSocket subprotocol that client and server agree on for these frames.
SUBPROTOCOL = "hangout.v1"


class DecodeError(ValueError):
    """The bytes are not exactly one MessagePack value."""


def _default(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, Decimal):
        return f"{obj:.2f}"
    if isinstance(obj, _dt.datetime):
        # msgpack only packs aware datetimes as Timestamps; a naive one is a bug
        # upstream, but is read as UTC rather than crashing a reply.
        return msgpack.Timestamp.from_datetime(obj.replace(tzinfo=_dt.timezone.utc))
    raise TypeError(f"cannot encode {type(obj).__name__}")


_packer_opts = dict(default=_default, datetime=True, use_bin_type=True)


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, **_packer_opts)


def _time(value: Any) -> Any:
    if type(value) is not msgpack.Timestamp:
        return value
    try:
        when, truncated = timestamp_time(value)
    except ValueError:
        return value
    return value if truncated else when


def _times_in_map(obj: dict[Any, Any]) -> dict[Any, Any]:
    for key, value in obj.items():
        if type(value) is msgpack.Timestamp:
            obj[key] = _time(value)
    return obj


def _times_in_list(obj: list[Any]) -> list[Any]:
    return [_time(v) for v in obj]


def decode(data: bytes) -> Any:
    """Decode exactly one value; trailing bytes or garbage raise DecodeError."""
    try:
        return _time(msgpack.unpackb(
            data,
            raw=False,
            timestamp=0,  # Timestamp ext -> msgpack.Timestamp, made a datetime by _time
            object_hook=_times_in_map,
            list_hook=_times_in_list,
            strict_map_key=False,
        ))
    except (msgpack.ExtraData, ValueError, msgpack.UnpackException, TypeError) as exc:
        raise DecodeError(str(exc)) from exc
    except Exception as exc:  # malformed input can surface odd exception types
        raise DecodeError(str(exc)) from exc
