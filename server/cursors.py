"""Signed keyset cursors: a page's ``next_cursor`` is good for the next page
of the same method with the same filters, and for nothing else.

A cursor is urlsafe base64 (no padding) of a 16-byte tag followed by a JSON
list: a digest of the filters (every param but ``limit`` and ``cursor``, as
validated) and the last row's sort key, each part written by its
``protocol.cursors.KeyPart``. The tag is an HMAC-SHA256, truncated, of the
method's name and that list, keyed by a key derived from ``JWT_SECRET``: a
cursor the server did not make, or made with another secret, or for another
method, does not verify. Keeping the filters' digest in the cursor lets a
forged cursor be named beside params that are invalid themselves.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
from typing import Any

from protocol.errors import ErrorCode, RpcError
from protocol.models.common import PageParams
from server.config import Config

TAG_BYTES = 16
_KEY_LABEL = b"hangout cursor key"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)

NOT_OURS = {"field": "cursor", "reason": "not a cursor from this list"}
OTHER_FILTERS = {"field": "cursor", "reason": "made for other filters: start again without a cursor"}


@functools.lru_cache(maxsize=4)
def _cursor_key(jwt_secret: str) -> bytes:
    # A key of its own: a cursor's tag never doubles as anything the JWT secret signs.
    return hmac.new(jwt_secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _tag(jwt_secret: str, method: str, body: bytes) -> bytes:
    return hmac.new(_cursor_key(jwt_secret), method.encode() + b"\n" + body, hashlib.sha256).digest()[:TAG_BYTES]


def filters_digest(params: PageParams) -> str:
    """The filters as validated (so ``"25"`` and ``"25.00"``, or one instant
    in two offsets, are the same filters), in a canonical form."""
    filters = params.model_dump(mode="json", by_alias=True, exclude=set(params.NOT_FILTERS))
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()[:16]).decode().rstrip("=")


def make(config: Config, method: str, params: PageParams, *key: Any) -> str:
    """The cursor of the page after the row whose sort key is ``key``."""
    parts = type(params).cursor_key
    assert len(parts) == len(key), "a cursor holds the list's whole sort key"
    return sign(config, method, [filters_digest(params), *(part.dump(value) for part, value in zip(parts, key))])


def sign(config: Config, method: str, values: list[Any]) -> str:
    """A cursor of ``method`` holding ``values`` as they are: the filters'
    digest, then the sort key's parts as written."""
    body = json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(_tag(config.jwt_secret, method, body) + body).decode().rstrip("=")


def _verified(jwt_secret: str, method: str, cursor: str) -> list[Any] | None:
    """The cursor's list if the server made it for ``method``, else None."""
    if not _BASE64URL.fullmatch(cursor):
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        return None
    tag, body = raw[:TAG_BYTES], raw[TAG_BYTES:]
    if len(tag) != TAG_BYTES or not hmac.compare_digest(tag, _tag(jwt_secret, method, body)):
        return None
    try:
        values = json.loads(body)
    except ValueError:
        return None
    return values if isinstance(values, list) and values and isinstance(values[0], str) else None


def _read(jwt_secret: str, method: str, model: type[PageParams], cursor: str,
          params: PageParams | None) -> tuple[tuple | None, dict[str, str] | None]:
    """The cursor's sort key, or the error that says why it is not good here.
    With ``params`` None (other params are invalid) its filters are not compared."""
    values = _verified(jwt_secret, method, cursor)
    if values is None or len(values) != len(model.cursor_key) + 1:
        return None, NOT_OURS
    try:
        key = tuple(part.load(value) for part, value in zip(model.cursor_key, values[1:]))
    except (ValueError, TypeError, OverflowError):
        return None, NOT_OURS
    if params is not None and values[0] != filters_digest(params):
        return None, OTHER_FILTERS
    return key, None


def errors(config: Config, method: str, model: type, raw: dict[Any, Any], params: Any) -> list[dict[str, str]]:
    """The error of ``raw``'s cursor when it is not good for ``method`` with
    these filters. ``params`` is None when other params are invalid: then
    only what the cursor itself says is checked."""
    cursor = raw.get("cursor")
    if not (isinstance(model, type) and issubclass(model, PageParams)) or not isinstance(cursor, str) or not cursor:
        return []  # no cursor, or one the params model refuses itself
    _, error = _read(config.jwt_secret, method, model, cursor, params if isinstance(params, PageParams) else None)
    return [error] if error else []


def after(config: Config, method: str, params: PageParams) -> tuple | None:
    """The sort key of the last row of the previous page, or None for the
    first page; a cursor that is not good here is ``invalid_params``."""
    if params.cursor is None:
        return None
    key, error = _read(config.jwt_secret, method, type(params), params.cursor, params)
    if error is not None:
        raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": [error]})
    return key
