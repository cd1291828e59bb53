"""Frame codec: one MessagePack map per binary WebSocket frame.

Times travel as the MessagePack Timestamp extension (type -1) in UTC, money as
decimal strings and ids as canonical UUID strings. Pydantic models already
dump money and ids as strings; ``_default`` covers values that reach the
encoder directly.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from decimal import Decimal
from typing import Any

import msgpack

__all__ = ["encode", "decode", "DecodeError"]


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


def decode(data: bytes) -> Any:
    """Decode exactly one value; trailing bytes or garbage raise DecodeError."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            timestamp=3,  # Timestamp ext -> aware UTC datetime
            strict_map_key=False,
        )
    except (msgpack.ExtraData, ValueError, msgpack.UnpackException, TypeError) as exc:
        raise DecodeError(str(exc)) from exc
    except Exception as exc:  # malformed input can surface odd exception types
        raise DecodeError(str(exc)) from exc
