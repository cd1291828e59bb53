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
import struct
import uuid
from decimal import Decimal
from typing import Any

import msgpack

from protocol.times import timestamp_time

__all__ = ["encode", "decode", "DecodeError", "OverLimits", "SUBPROTOCOL"]

# The WebSocket subprotocol that client and server agree on for these frames.
SUBPROTOCOL = "hangout.v1"


class DecodeError(ValueError):
    """The bytes are not exactly one MessagePack value."""


class OverLimits(DecodeError):
    """The bytes hold more values, or nest deeper, than the reader allows."""


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


# Shape of every first byte of a MessagePack value, for ``check_shape``:
# _SIZE is the whole value's size when the first byte tells it (fixint,
# fixstr, nil, bool, numbers, fixext), else 0; _FIX_ITEMS the items of a
# fixmap or fixarray (a map's keys and values each count); _SIZED maps the
# other first bytes to (header size, struct of their length or count, kind).
_SIZE = [0] * 256
_FIX_ITEMS = [0] * 256
for _b in range(0x00, 0x80):
    _SIZE[_b] = 1
for _b in range(0xe0, 0x100):
    _SIZE[_b] = 1
for _b in range(0xa0, 0xc0):
    _SIZE[_b] = 1 + (_b & 0x1f)
for _b in range(0x80, 0x90):
    _FIX_ITEMS[_b] = 2 * (_b & 0x0f)
for _b in range(0x90, 0xa0):
    _FIX_ITEMS[_b] = _b & 0x0f
for _b, _n in {0xc0: 1, 0xc2: 1, 0xc3: 1, 0xca: 5, 0xcb: 9, 0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9, 0xd0: 2, 0xd1: 3,
               0xd2: 5, 0xd3: 9, 0xd4: 3, 0xd5: 4, 0xd6: 6, 0xd7: 10, 0xd8: 18}.items():
    _SIZE[_b] = _n
_U8, _U16, _U32 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I")
_BYTES, _MAP, _ARRAY = 0, 1, 2
# First bytes of maps and arrays (fixmap, fixarray, array16/32, map16/32).
_OPENERS = frozenset(range(0x80, 0xa0)) | frozenset(range(0xdc, 0xe0))
_NOT_OPENERS = bytes(b for b in range(256) if b not in _OPENERS)
_SIZED = {
    0xc4: (2, _U8, _BYTES), 0xc5: (3, _U16, _BYTES), 0xc6: (5, _U32, _BYTES),  # bin
    0xd9: (2, _U8, _BYTES), 0xda: (3, _U16, _BYTES), 0xdb: (5, _U32, _BYTES),  # str
    0xc7: (3, _U8, _BYTES), 0xc8: (4, _U16, _BYTES), 0xc9: (6, _U32, _BYTES),  # ext (a type byte after the length)
    0xdc: (3, _U16, _ARRAY), 0xdd: (5, _U32, _ARRAY),
    0xde: (3, _U16, _MAP), 0xdf: (5, _U32, _MAP),
}


def check_shape(data: bytes, max_values: int, max_depth: int) -> None:
    """Raise ``OverLimits`` if ``data`` holds more than ``max_values`` values
    (every map, array, key and other value counts one) or more than
    ``max_depth`` levels of maps and arrays, reading only the values'
    headers, so that nothing of an oversized frame is ever built. It stops
    at the first excess. Bytes that are not MessagePack are left for the
    decoder to refuse."""
    end = len(data)
    # The common small frame, read in C: every value takes a byte at least,
    # and every map or array begins with a byte of _OPENERS, so a frame with
    # few bytes and few such bytes is within the limits without a scan.
    if end <= max_values and len(data.translate(None, _NOT_OPENERS)) <= max_depth:
        return
    pos = 0
    values = 0
    left = 1  # values still to read in the innermost open container
    outer: list[int] = []  # the same for each enclosing one
    size_of, fix_items = _SIZE, _FIX_ITEMS
    while True:
        if not left:
            if not outer:
                return
            left = outer.pop()
            continue
        if pos >= end:
            return
        left -= 1
        values += 1
        if values > max_values:
            raise OverLimits(f"more than {max_values} values")
        b = data[pos]
        size = size_of[b]
        if size:
            pos += size
            continue
        if 0x80 <= b <= 0x9f:
            items = fix_items[b]
            pos += 1
        else:
            sized = _SIZED.get(b)
            if sized is None:
                return  # 0xc1, never used: not MessagePack
            header, length, kind = sized
            if pos + header > end:
                return
            n = length.unpack_from(data, pos + 1)[0]
            pos += header
            if kind == _BYTES:
                pos += n
                continue
            items = 2 * n if kind == _MAP else n
        if len(outer) >= max_depth:
            raise OverLimits(f"more than {max_depth} levels of maps and arrays")
        outer.append(left)
        left = items


def decode(data: bytes, max_values: int | None = None, max_depth: int | None = None) -> Any:
    """Decode exactly one value; trailing bytes or garbage raise DecodeError.
    With limits, a frame past them raises ``OverLimits`` before anything of
    it is built (``check_shape``)."""
    if max_values is not None and max_depth is not None:
        check_shape(data, max_values, max_depth)
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
