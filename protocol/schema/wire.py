"""JSON Schema of the protocol's own value types, and of whole models.

pydantic describes a model's fields; the wire types (ids, money, times)
name themselves in its output (``protocol.models.common.Wire``), and
``model_schema`` turns each such node into what travels: a params schema
says what a client may send, a result or event schema what the server
sends. Both sides of a type carry the same ``x-`` annotations, so that a
code generator can map it to one type of its language:

- times: ``"x-msgpack": "timestamp"`` with ``"x-precision": "microsecond"``,
  a MessagePack Timestamp extension (type -1) in UTC. JSON Schema has no
  type for an extension value, so the node has no ``type``: a validator
  that knows the keyword checks it (tests/test_contract_frames.py does).
  A params time is ``anyOf`` that or an RFC 3339 string with an offset.
- money: ``"x-money": "decimal-string"`` with ``"x-scale": 2``, a string
  such as ``"25.00"`` (a debit is negative); inputs may also be integers.
- ids: ``"format": "uuid"`` with ``"x-uuid": "canonical"``, the lowercase
  8-4-4-4-12 form.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from protocol.models.common import WIRE_KEY

DIALECT = "https://json-schema.org/draft/2020-12/schema"

PARAMS, RESULT = "validation", "serialization"

_TIMESTAMP = {"x-msgpack": "timestamp", "x-precision": "microsecond"}
_MONEY = {"x-money": "decimal-string", "x-scale": 2}
_UUID = {"type": "string", "format": "uuid", "x-uuid": "canonical"}

# What the server sends, by wire kind.
_GIVEN: dict[str, dict[str, Any]] = {
    "uuid": {**_UUID, "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"},
    "money": {"type": "string", "pattern": "^-?[0-9]+\\.[0-9]{2}$", **_MONEY},
    "timestamp": {
        **_TIMESTAMP,
        "description": "MessagePack Timestamp extension (type -1), UTC, to the microsecond",
    },
}
# What a client may send, by wire kind.
_SENT: dict[str, dict[str, Any]] = {
    "uuid": {**_UUID, "description": "a UUID; send the canonical lowercase form"},
    "money": {
        "anyOf": [
            {"type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,2})?$"},
            {"type": "integer", "minimum": 0},
        ],
        **_MONEY,
        "description": "a decimal string with at most two places, or an integer; never a float",
    },
    "timestamp": {
        "anyOf": [
            {**_TIMESTAMP},
            {"type": "string", "format": "date-time"},
        ],
        "description": "a MessagePack Timestamp (UTC), or an RFC 3339 string with an offset",
    },
}
_RULES = {
    "positive": "more than 0.00",
    "whole-hour": "a whole UTC hour",
}
# Keys of pydantic's node that stay on the wire type's node.
_KEPT = ("title", "default")


def wire_node(node: dict[str, Any], mode: str) -> dict[str, Any]:
    """The wire type's schema in place of pydantic's ``node``."""
    kind, _, rule = node[WIRE_KEY].partition("/")
    table = _SENT if mode == PARAMS else _GIVEN
    out = {k: node[k] for k in _KEPT if k in node}
    out.update(copy.deepcopy(table[kind]))
    if rule:
        out["description"] = f"{out['description']}; {_RULES[rule]}" if "description" in out else _RULES[rule]
        out["x-rule"] = rule
    return out


def _replace_wire(value: Any, mode: str) -> Any:
    if isinstance(value, dict):
        if WIRE_KEY in value:
            return wire_node(value, mode)
        return {k: _replace_wire(v, mode) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_wire(v, mode) for v in value]
    return value


def model_schema(model: Any, mode: str) -> dict[str, Any]:
    """A self-contained JSON Schema (draft 2020-12) of a params model
    (``PARAMS``) or a result or event model (``RESULT``). ``dict`` is a
    result that is always ``{}``."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        body = _replace_wire(model.model_json_schema(mode=mode, by_alias=True), mode)
    else:
        body = {"title": "Empty", "type": "object", "properties": {}, "additionalProperties": False}
    return {"$schema": DIALECT, **body}
