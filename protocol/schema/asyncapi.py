"""The AsyncAPI 3.0 document of the protocol: one channel (the WebSocket at
``/ws``), a request/reply operation per method (send the request, receive
its reply, matched by ``id``) and a receive operation per event. Message
payloads are the frames; their params, results and event data point to the
JSON Schema files beside this module (draft 2020-12, so each payload names
that schema format)."""

from __future__ import annotations

from typing import Any

from protocol.codec import SUBPROTOCOL
from protocol.models.events import USER_EVENTS

SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
CONTENT_TYPE = "application/msgpack"
CHANNEL = "socket"

_REQUEST_ID = {"type": "integer", "minimum": 0, "description": "chosen by the client, unique among its calls in flight"}
_SEQ = {"type": "integer", "minimum": 1, "description": "the event's number in the user's sequence (events.resume)"}


def _payload(schema: dict[str, Any]) -> dict[str, Any]:
    return {"schemaFormat": SCHEMA_FORMAT, "schema": schema}


def _request(method: dict[str, Any]) -> dict[str, Any]:
    name = method["name"]
    return {
        "name": f"{name}.request",
        "title": f"{name} request",
        "summary": "needs an authenticated socket" if method["auth"] else "works before authentication",
        "correlationId": {"$ref": "#/components/correlationIds/id"},
        "payload": _payload({
            "type": "object",
            "properties": {
                "id": _REQUEST_ID,
                "method": {"const": name},
                "params": {"$ref": method["params"], "description": "may be omitted for {}"},
            },
            "required": ["id", "method"],
        }),
    }


def _reply(method: dict[str, Any], error_path: str) -> dict[str, Any]:
    name = method["name"]
    return {
        "name": f"{name}.reply",
        "title": f"{name} reply",
        "correlationId": {"$ref": "#/components/correlationIds/id"},
        "payload": _payload({
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"id": _REQUEST_ID, "result": {"$ref": method["result"]}},
                    "required": ["id", "result"],
                },
                {
                    "type": "object",
                    "properties": {"id": {"anyOf": [_REQUEST_ID, {"type": "null"}]}, "error": {"$ref": error_path}},
                    "required": ["id", "error"],
                },
            ],
        }),
    }


def _event(event: dict[str, Any]) -> dict[str, Any]:
    name = event["name"]
    properties: dict[str, Any] = {"event": {"const": name}, "data": {"$ref": event["data"]}}
    required = ["event", "data"]
    if name in USER_EVENTS:
        properties["seq"] = _SEQ
        required.append("seq")
    return {
        "name": name,
        "title": f"{name} event",
        "summary": "numbered per user" if name in USER_EVENTS else "live only",
        "payload": _payload({"type": "object", "properties": properties, "required": required}),
    }


def asyncapi(index: dict[str, list[dict[str, Any]]], error_path: str) -> dict[str, Any]:
    """The document for the methods and events of ``index`` (index.json's
    shape), with failure replies' ``error`` at ``error_path``."""
    channel_ref = {"$ref": f"#/channels/{CHANNEL}"}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for method in index["methods"]:
        name = method["name"]
        messages[f"{name}.request"] = _request(method)
        messages[f"{name}.reply"] = _reply(method, error_path)
        operations[name] = {
            "action": "send",
            "channel": channel_ref,
            "title": name,
            "messages": [{"$ref": f"#/channels/{CHANNEL}/messages/{name}.request"}],
            "reply": {
                "channel": channel_ref,
                "messages": [{"$ref": f"#/channels/{CHANNEL}/messages/{name}.reply"}],
            },
        }
    for event in index["events"]:
        name = event["name"]
        messages[f"{name}.event"] = _event(event)
        operations[f"{name}.event"] = {
            "action": "receive",
            "channel": channel_ref,
            "title": f"{name} event",
            "messages": [{"$ref": f"#/channels/{CHANNEL}/messages/{name}.event"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "hangout",
            "version": "1",
            "description": (
                "Booking and chat over one WebSocket: each binary frame is one MessagePack map. "
                "Calls are pipelined and their replies matched by id; events arrive between them."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "local": {
                "host": "127.0.0.1:8080",
                "protocol": "ws",
                "pathname": "/ws",
                "description": f"a development server; ask for the subprotocol {SUBPROTOCOL}",
            },
        },
        "channels": {
            CHANNEL: {
                "address": "/ws",
                "title": "the socket",
                "description": (
                    "Authenticate at the upgrade (Authorization: Bearer, or ?access_token=) or with an auth.* call."
                ),
                "messages": {key: {"$ref": f"#/components/messages/{key}"} for key in messages},
            },
        },
        "operations": operations,
        "components": {
            "messages": messages,
            "correlationIds": {
                "id": {"description": "a reply carries its request's id", "location": "$message.payload#/id"},
            },
        },
    }
