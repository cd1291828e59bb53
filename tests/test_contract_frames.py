"""The machine-readable contract (protocol/schema/) describes what real
servers send: a flow over two processes that calls every method and
receives every event records each frame, and each is checked against its
schema, closed (a key the schema does not declare fails), and as a whole
frame against its message in asyncapi.json. Times must arrive as
Timestamps a datetime holds exactly (microseconds), money as decimal
strings, ids in canonical form; user events carry ``seq``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import uuid
from typing import Any

import jsonschema
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from protocol.client import Client
from protocol.models import EVENTS, METHODS
from protocol.models.events import USER_EVENTS
from protocol.schema import ERROR_PATH, HERE, event_path, params_path, result_path, written
from tests.booking_support import key, move_to_past, slot
from tests.conftest import PASSWORD, ServerProcess, new_email, post_kyc

UTC = dt.timezone.utc


def _timestamp(validator: Any, value: str, instance: Any, schema: dict) -> Any:
    """``x-msgpack: timestamp``: the codec made a UTC datetime of it, which
    it does only for a Timestamp that a datetime holds exactly."""
    if value == "timestamp" and not (isinstance(instance, dt.datetime) and instance.utcoffset() == dt.timedelta(0)):
        yield jsonschema.ValidationError(f"{instance!r} is not a MessagePack Timestamp to the microsecond")


Validator = jsonschema.validators.extend(Draft202012Validator, {"x-msgpack": _timestamp})


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


_validators: dict[str, Any] = {}


def check(path: str, instance: Any, closed: bool = True) -> None:
    name = f"{path}:{closed}"
    if name not in _validators:
        schema = json.loads((HERE / path).read_text())
        _validators[name] = Validator(_closed(schema) if closed else schema, format_checker=Validator.FORMAT_CHECKER)
    errors = list(_validators[name].iter_errors(instance))
    assert not errors, f"{path}: {[(list(e.absolute_path), e.message) for e in errors]} in {instance!r}"


_BASE = HERE.as_uri() + "/"
# The schema files by their address, for the relative $refs of asyncapi.json.
_REGISTRY = Registry().with_resources(
    (_BASE + path, Resource.from_contents(json.loads(text), default_specification=DRAFT202012))
    for path, text in written().items() if path.startswith(("methods/", "events/")) or path == ERROR_PATH
)
_ASYNCAPI = json.loads((HERE / "asyncapi.json").read_text())


def check_frame(message: str, frame: Any) -> None:
    """A whole frame against the payload of ``message`` in asyncapi.json."""
    name = f"asyncapi:{message}"
    if name not in _validators:
        payload = _ASYNCAPI["components"]["messages"][message]["payload"]["schema"]
        _validators[name] = Validator({"$id": _BASE + "asyncapi.json", **payload}, registry=_REGISTRY)
    errors = list(_validators[name].iter_errors(frame))
    assert not errors, f"{message}: {[(list(e.absolute_path), e.message) for e in errors]} in {frame!r}"


class RecordingClient(Client):
    """Records every request it sends and every frame it receives."""

    log: list[tuple[str, Any, Any]]  # ("request" | "reply", method, frame) | ("event", name, frame)

    async def request(self, frame: dict, *, timeout: float = 30.0) -> dict:
        self.log.append(("request", frame["method"], frame))
        reply = await super().request(frame, timeout=timeout)
        self.log.append(("reply", frame["method"], reply))
        return reply

    def _on_frame(self, frame: Any) -> None:
        if "event" in frame:
            self.log.append(("event", frame["event"], frame))
        super()._on_frame(frame)


class Flow:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any, Any]] = []
        self.clients: list[RecordingClient] = []

    async def connect(self, server: ServerProcess, **kw: Any) -> RecordingClient:
        c = await RecordingClient.connect(server.url, **kw)
        c.log = self.log
        self.clients.append(c)
        return c

    async def user(self, server: ServerProcess, name: str, price: str | None = None) -> tuple[RecordingClient, dict]:
        c = await self.connect(server)
        session = await c.call("auth.register", {"email": new_email(), "password": PASSWORD, "name": name, "gender": "other"})
        assert (await post_kyc(server, session["user"]["id"], "verified")).status == 200
        await c.next_event("user.updated")
        if price is not None:
            await c.call("users.update", {"price_per_hour": price})
        return c, session

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


async def until(call: Any, ready: Any, timeout: float = 10.0) -> Any:
    """A replica read repeated until it shows what the primary has (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await call()
        if ready(result):
            return result
        assert asyncio.get_running_loop().time() < deadline, result
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def expiring_server(stack):
    """Tokens live 30 s, less than the 60 s lead: auth.expiring comes at once."""
    proc = await ServerProcess(stack, ACCESS_TOKEN_TTL_S="30").start()
    yield proc
    await proc.stop()


async def run_flow(flow: Flow, server: ServerProcess, server2: ServerProcess, expiring_server: ServerProcess, db) -> None:
    # A price of its own: the suite leaves many hosts at round prices, and
    # this host must be on the search's first page.
    price = f"{random.randint(1001, 5999) / 100:.2f}"
    host, host_session = await flow.user(server2, "Host", price=price)
    booker, booker_session = await flow.user(server, "Booker")
    host_id = host_session["user"]["id"]

    await booker.call("users.me")
    await until(lambda: booker.call_raw("users.get", {"user_id": host_id}), lambda r: "result" in r)
    await booker.call("wallet.topup", {"amount": "100.50", "idempotency_key": key()})
    await booker.call("wallet.topup", {"amount": 20, "idempotency_key": key()})
    await booker.next_event("wallet.updated")
    await booker.call("wallet.transactions", {"limit": 1})
    start = slot(days=2)
    await until(lambda: booker.call("hosts.search", {"min_price": price, "max_price": int(float(price)) + 1, "limit": 100}),
                lambda r: any(h["id"] == host_id for h in r["hosts"]))
    await booker.call("hosts.search", {"start_at": start, "end_at": (start + dt.timedelta(hours=1)).isoformat()})
    await booker.call("hosts.availability", {"host_id": host_id, "from": start, "to": start + dt.timedelta(days=1)})

    booking = (await booker.call("bookings.create", {
        "host_id": host_id, "start_at": start, "end_at": start + dt.timedelta(hours=2), "idempotency_key": key(),
    }))["booking"]
    await host.next_event("booking.created")
    await booker.call("bookings.get", {"booking_id": booking["id"]})
    await booker.call("bookings.list", {"role": "booker", "limit": 1})
    # Refusals are frames too.
    await booker.call_raw("bookings.create", {"host_id": "nope", "start_at": "10:00", "end_at": 1, "idempotency_key": ""})
    await booker.call_raw("bookings.get", {"booking_id": str(uuid.uuid4())})

    conversation_id = booking["conversation_id"]
    await host.call("chat.join", {"conversation_id": conversation_id})
    await booker.call("chat.join", {"conversation_id": conversation_id, "since_seq": 0})
    sent = (await booker.call("chat.send", {"conversation_id": conversation_id, "content": "hi", "client_msg_id": str(uuid.uuid4())}))["message"]
    await host.call("chat.send", {"conversation_id": conversation_id, "content": "hello\n"})
    await host.call("chat.typing", {"conversation_id": conversation_id})
    await booker.next_event("chat.typing")
    if "chat.read" in METHODS:
        await host.call("chat.read", {"conversation_id": conversation_id, "seq": sent["seq"]})
        await booker.next_event("chat.read")
    await booker.call("chat.history", {"conversation_id": conversation_id, "limit": 5})
    await until(lambda: booker.call("chat.conversations", {"limit": 5}), lambda r: r["conversations"])
    if "chat.presence" in EVENTS:
        # The booker's last socket closes: the host, joined, sees them go offline.
        await booker.close()
        await host.next_event("chat.presence", timeout=20)
        booker = await flow.connect(server, access_token=booker_session["access_token"])
    await booker.call("chat.leave", {"conversation_id": conversation_id})

    # A cancellation and a settlement: booking.cancelled and booking.completed.
    await booker.call("bookings.cancel", {"booking_id": booking["id"]})
    later = (await booker.call("bookings.create", {
        "host_id": host_id, "start_at": slot(days=3), "end_at": slot(days=3, hour=1), "idempotency_key": key(),
    }))["booking"]
    await move_to_past(db, later["id"])
    await booker.next_event("booking.completed", timeout=20)
    await booker.call("events.resume", {"since_seq": 0})

    tokens = await booker.call("auth.refresh", {"refresh_token": booker_session["refresh_token"]})
    await booker.call("auth.authenticate", {"access_token": tokens["access_token"]})
    await booker.call("auth.logout")
    await booker.call("auth.login", {"email": booker_session["user"]["email"], "password": PASSWORD})
    await booker.call_raw("auth.login", {"email": booker_session["user"]["email"], "password": "wrong password"})

    short = await flow.connect(expiring_server)
    await short.call("auth.login", {"email": host_session["user"]["email"], "password": PASSWORD})
    await short.next_event("auth.expiring")


async def test_real_frames_match_the_schema_files(server, server2, expiring_server, db):
    flow = Flow()
    try:
        await run_flow(flow, server, server2, expiring_server, db)
    finally:
        await flow.close()

    results: set[str] = set()
    events: set[str] = set()
    for kind, name, frame in flow.log:
        if kind == "request":
            # What a real client sends is what the params schema allows.
            if name not in ("bookings.create",) or "nope" not in str(frame):
                check(params_path(name), frame.get("params", {}), closed=False)
                check_frame(f"{name}.request", frame)
        elif kind == "reply":
            check_frame(f"{name}.reply", frame)
            if "result" in frame:
                check(result_path(name), frame["result"])
                results.add(name)
                if name == "events.resume":
                    for stored in frame["result"]["events"]:
                        check(event_path(stored["event"]), stored["data"])
                        assert stored["event"] in USER_EVENTS
            else:
                check(ERROR_PATH, frame["error"])
        else:
            check_frame(f"{name}.event", frame)
            check(event_path(name), frame["data"])
            events.add(name)
            numbered = name in USER_EVENTS
            assert ("seq" in frame) is numbered, frame
            if numbered:
                assert isinstance(frame["seq"], int) and frame["seq"] >= 1
            assert set(frame) <= {"event", "data", "seq"}, frame
    assert sorted(set(METHODS) - results) == [], "methods the flow never got a result of"
    assert sorted(set(EVENTS) - events) == [], "events the flow never received"


def test_the_validator_refuses_what_the_contract_does_not_allow():
    """The checks above can fail: a time that is not a Timestamp, money as
    a number, an id not in canonical form, an undeclared key."""
    good = {"balance": "1.00"}
    check(event_path("wallet.updated"), good)
    for bad in ({"balance": 1.0}, {"balance": "1.5"}, {"balance": "1.00", "extra": 1}):
        with pytest.raises(AssertionError):
            check(event_path("wallet.updated"), bad)
    when = dt.datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    check(event_path("auth.expiring"), {"expires_at": when})
    for bad_time in (when.isoformat(), when.timestamp(), when.replace(tzinfo=None)):
        with pytest.raises(AssertionError):
            check(event_path("auth.expiring"), {"expires_at": bad_time})
    typing = {"conversation_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4())}
    check(event_path("chat.typing"), typing)
    with pytest.raises(AssertionError):
        check(event_path("chat.typing"), {**typing, "user_id": typing["user_id"].upper()})


def test_the_asyncapi_payloads_refuse_frames_of_the_wrong_shape():
    check_frame("wallet.updated.event", {"event": "wallet.updated", "data": {"balance": "1.00"}, "seq": 4})
    for bad in ({"event": "wallet.updated", "data": {"balance": "1.00"}},  # a user event without its seq
                {"event": "chat.typing", "data": {"balance": "1.00"}, "seq": 4}):
        with pytest.raises(AssertionError):
            check_frame("wallet.updated.event", bad)
    check_frame("users.me.reply", {"id": 1, "error": {"code": "unauthenticated", "message": "authentication required"}})
    for bad in ({"id": 1}, {"id": 1, "error": {"code": "no such code", "message": ""}}, {"id": 1, "result": {}}):
        with pytest.raises(AssertionError):
            check_frame("users.me.reply", bad)
