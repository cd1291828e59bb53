"""The contract for machines: ``python -m protocol.schema`` writes, from the
models in ``protocol/models/``, the files beside this module:

- ``methods/<method>.params.json`` and ``methods/<method>.result.json``,
  ``events/<event>.json``: JSON Schema (draft 2020-12) of every method's
  params and result and of every event's ``data``, with ``x-`` annotations
  for times, money and ids (``protocol.schema.wire``);
- ``error.json``: the ``error`` map of a failure reply;
- ``asyncapi.json``: an AsyncAPI 3.0 document of the one WebSocket channel,
  a request/reply operation per method and a receive operation per event;
- ``index.json``: ``{"methods": [{"name", "auth", "params", "result"}],
  "events": [{"name", "data"}]}``, paths relative to this folder, for code
  generators (clients/ts reads it).

The files are committed; ``python -m protocol.schema --check`` (and
tests/test_contract_schema.py) fails when they differ from the models.
Methods and events are taken from ``protocol.models.METHODS`` and
``EVENTS``, so a new declaration appears here on the next run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol.errors import ErrorCode
from protocol.models import EVENTS, METHODS
from protocol.schema.asyncapi import asyncapi
from protocol.schema.wire import DIALECT, PARAMS, RESULT, model_schema

HERE = Path(__file__).resolve().parent
REGENERATE = "python -m protocol.schema"


def params_path(method: str) -> str:
    return f"methods/{method}.params.json"


def result_path(method: str) -> str:
    return f"methods/{method}.result.json"


def event_path(event: str) -> str:
    return f"events/{event}.json"


ERROR_PATH = "error.json"


def error_schema() -> dict[str, Any]:
    """The ``error`` map of a failure reply. ``data`` depends on the code:
    ``errors`` for ``invalid_params``, ``retry_after`` for ``rate_limited``,
    ``booking_id`` and ``replayed`` for ``insufficient_funds``, ``ref`` for
    ``internal``."""
    return {
        "$schema": DIALECT,
        "title": "Error",
        "type": "object",
        "properties": {
            "code": {"type": "string", "enum": [c.value for c in ErrorCode]},
            "message": {"type": "string", "description": "for humans; clients branch on code"},
            "data": {
                "type": "object",
                "properties": {
                    "errors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"field": {"type": "string"}, "reason": {"type": "string"}},
                            "required": ["field", "reason"],
                        },
                    },
                    "retry_after": {"type": "number", "minimum": 0},
                    "booking_id": {"type": "string", "format": "uuid", "x-uuid": "canonical"},
                    "replayed": {"type": "boolean"},
                    "ref": {"type": "string"},
                },
            },
        },
        "required": ["code", "message"],
    }


def documents() -> dict[str, Any]:
    """Every file of the contract, by its path relative to this folder."""
    docs: dict[str, Any] = {}
    index: dict[str, list[dict[str, Any]]] = {"methods": [], "events": []}
    for name in sorted(METHODS):
        spec = METHODS[name]
        docs[params_path(name)] = model_schema(spec.params, PARAMS)
        docs[result_path(name)] = model_schema(spec.result, RESULT)
        index["methods"].append(
            {"name": name, "auth": spec.auth, "params": params_path(name), "result": result_path(name)}
        )
    for name in sorted(EVENTS):
        docs[event_path(name)] = model_schema(EVENTS[name], RESULT)
        index["events"].append({"name": name, "data": event_path(name)})
    docs[ERROR_PATH] = error_schema()
    docs["asyncapi.json"] = asyncapi(index, ERROR_PATH)
    docs["index.json"] = index
    return docs


def render() -> dict[str, str]:
    """Every file's text, as written."""
    return {path: json.dumps(doc, indent=2, ensure_ascii=False) + "\n" for path, doc in documents().items()}


def written() -> dict[str, str]:
    """The JSON files now in this folder, by relative path."""
    return {p.relative_to(HERE).as_posix(): p.read_text() for p in sorted(HERE.rglob("*.json"))}
