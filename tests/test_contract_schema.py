"""protocol/schema/ is what ``python -m protocol.schema`` makes from the
models: a model or method changed without regenerating fails here. The
files are valid JSON Schema, every path that index.json and asyncapi.json
name exists, and every declared method and event is there."""

from __future__ import annotations

import difflib
import json

import pytest
from jsonschema import Draft202012Validator

from protocol.models import EVENTS, METHODS
from protocol.schema import HERE, REGENERATE, documents, render, written


def test_the_committed_files_are_what_the_models_give():
    expected, current = render(), written()
    if current != expected:
        diff = []
        for path in sorted(set(expected) | set(current)):
            if expected.get(path) != current.get(path):
                diff += difflib.unified_diff(
                    current.get(path, "").splitlines(keepends=True), expected.get(path, "").splitlines(keepends=True),
                    f"{path} (in the repository)", f"{path} (from the models)",
                )
        pytest.fail(f"{HERE} is out of date; regenerate it with `{REGENERATE}`:\n{''.join(diff)[:20000]}")


def test_every_schema_file_is_a_valid_2020_12_schema():
    for path, doc in documents().items():
        if path.startswith(("methods/", "events/")) or path == "error.json":
            assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema", path
            Draft202012Validator.check_schema(doc)


def test_the_index_names_every_declared_method_and_event_and_its_files():
    index = json.loads((HERE / "index.json").read_text())
    assert [m["name"] for m in index["methods"]] == sorted(METHODS)
    assert [e["name"] for e in index["events"]] == sorted(EVENTS)
    for method in index["methods"]:
        assert set(method) == {"name", "auth", "params", "result"}
        assert method["auth"] is METHODS[method["name"]].auth
        assert (HERE / method["params"]).is_file() and (HERE / method["result"]).is_file()
    for event in index["events"]:
        assert set(event) == {"name", "data"}
        assert (HERE / event["data"]).is_file()


def _refs(value):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def test_the_asyncapi_document_has_a_request_reply_operation_per_method_and_one_per_event():
    doc = json.loads((HERE / "asyncapi.json").read_text())
    assert doc["asyncapi"] == "3.0.0"
    ops = doc["operations"]
    for name, spec in METHODS.items():
        op = ops[name]
        assert op["action"] == "send"
        assert op["messages"] == [{"$ref": f"#/channels/socket/messages/{name}.request"}]
        assert op["reply"]["messages"] == [{"$ref": f"#/channels/socket/messages/{name}.reply"}]
    for name in EVENTS:
        assert ops[f"{name}.event"]["action"] == "receive"
    assert len(ops) == len(METHODS) + len(EVENTS)
    # Every reference resolves: inside the document, or to a file of the contract.
    for ref in set(_refs(doc)):
        if ref.startswith("#/"):
            node = doc
            for part in ref[2:].split("/"):
                node = node[part]
        else:
            assert (HERE / ref).is_file(), ref


def test_the_wire_types_carry_their_annotations():
    booking = json.loads((HERE / "methods/bookings.create.result.json").read_text())["$defs"]["Booking"]["properties"]
    assert booking["start_at"]["x-msgpack"] == "timestamp" and booking["start_at"]["x-precision"] == "microsecond"
    assert booking["amount"]["x-money"] == "decimal-string" and booking["amount"]["type"] == "string"
    assert booking["id"]["format"] == "uuid" and booking["id"]["x-uuid"] == "canonical"
    params = json.loads((HERE / "methods/bookings.create.params.json").read_text())["properties"]
    assert {"x-msgpack": "timestamp", "x-precision": "microsecond"} in params["start_at"]["anyOf"]
    assert params["start_at"]["x-rule"] == "whole-hour"
    topup = json.loads((HERE / "methods/wallet.topup.params.json").read_text())["properties"]["amount"]
    assert {s["type"] for s in topup["anyOf"]} == {"string", "integer"}  # never a float
