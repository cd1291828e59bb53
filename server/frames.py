"""The one place that builds the frames the server sends: a call's reply
(result or error) and an event. Everything else hands these a result, an
``RpcError`` or an event payload."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from protocol.codec import encode
from protocol.errors import RpcError


def _data(value: Any) -> Any:
    return value.model_dump(mode="python") if isinstance(value, BaseModel) else value


def result_frame(req_id: int, result: Any) -> bytes:
    """A handler's result: a model, or a plain dict for ``{}``."""
    return encode({"id": req_id, "result": _data(result)})


def error_frame(req_id: int | None, err: RpcError) -> bytes:
    """``req_id`` is None when the frame that failed had no usable id."""
    return encode({"id": req_id, "error": err.to_wire()})


def event_frame(name: str, payload: BaseModel | dict, seq: int | None = None) -> bytes:
    """``seq``: the number of a durable user event in its user's sequence."""
    if seq is None:
        return encode({"event": name, "data": _data(payload)})
    return encode({"event": name, "data": _data(payload), "seq": seq})
