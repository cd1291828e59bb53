"""No input, however malformed, is ``internal``: for every method of the
contract, params that mix values of every kind MessagePack carries into
otherwise valid params are answered, and never with ``internal``, by a real
server process over a real socket, and the process logs no traceback.

The socket is a verified user's with money, a booking and a conversation,
and the valid-looking values name that user's real hosts, bookings,
conversations and cursors, so that calls get past validation into their
handlers and the database. ``PARAMS_PROPERTY_EXAMPLES`` runs more examples
(e.g. 20000 by hand while changing the models); ``PARAMS_PROPERTY_RANDOM=1``
draws other examples than the fixed ones of the suite.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

from collections import Counter

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode, encode
from protocol.models import METHODS
from tests.booking_support import book, key, slot
from tests.conftest import PASSWORD, ServerProcess, new_email, register, verified_user

EXAMPLES = int(os.environ.get("PARAMS_PROPERTY_EXAMPLES", "400"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=os.environ.get("PARAMS_PROPERTY_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
REQUEST_IDS = itertools.count(1)
OMIT = object()


# ---- what a server with real data answers to ---------------------------------------


@dataclass
class World:
    """A verified user with money (the caller), two hosts they booked, and
    what a client would hold: ids, tokens, a page's cursor of every list."""

    email: str
    token: str
    gender: str
    # Another user's, for auth.login and auth.refresh: failed logins
    # rate-limit an email, and a reused refresh token ends its session; the
    # caller's own must stay usable (to sign in again after auth.logout).
    login_email: str = ""
    hosts: list[str] = field(default_factory=list)
    bookings: list[str] = field(default_factory=list)
    conversations: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    cursors: dict[str, str] = field(default_factory=dict)
    refresh_tokens: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
async def logged_server(stack):
    """A server of its own, its log captured to look for tracebacks."""
    with tempfile.TemporaryFile("w+") as log:
        proc = ServerProcess(stack)
        proc.stderr = log
        await proc.start()
        yield proc, log
        await proc.stop()


@pytest.fixture(scope="module")
async def world(logged_server) -> World:
    server, _ = logged_server
    g = "g" + uuid.uuid4().hex[:12]
    hosts = [await verified_user(server, price=price, gender=g) for price in ("10.00", "20.00")]
    client, session = await verified_user(server, gender=g)
    w = World(email=session["user"]["email"], token=session["access_token"], gender=g)
    w.hosts = [s["user"]["id"] for _, s in hosts]
    await client.call("wallet.topup", {"amount": "5000.00", "idempotency_key": key()})
    for day, h in enumerate(w.hosts, start=1):
        booking = await book(client, h, slot(days=day))
        w.bookings.append(booking["id"])
        w.conversations.append(booking["conversation_id"])
        await client.call("chat.send", {"conversation_id": booking["conversation_id"], "content": "hello"})
    w.ids = [session["user"]["id"], *w.hosts, *w.bookings, *w.conversations]
    for method, params in [("hosts.search", {"gender": g}), ("wallet.transactions", {}),
                           ("bookings.list", {"role": "booker"}), ("chat.conversations", {})]:
        page = await client.call(method, {**params, "limit": 1})
        assert page["next_cursor"], method
        w.cursors[method] = page["next_cursor"]
    async with await server.connect() as other:
        session = await register(other)
        w.login_email = session["user"]["email"]
        w.refresh_tokens.append(session["refresh_token"])
    for c, _ in hosts:
        await c.close()
    await client.close()
    return w


class Caller:
    """The world's user on a raw socket, as a client with any params would
    call; signed in again after a fuzzed auth.* call changed the socket."""

    def __init__(self, server: ServerProcess, w: World) -> None:
        self.server, self.world = server, w
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.calls = 0
        # How each method answered: a result, or the error's code.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    async def connect(self) -> None:
        await self.close()
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(
            self.server.url, headers={"Authorization": f"Bearer {self.world.token}"}, max_msg_size=0
        )

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        self.ws = self.session = None

    async def call(self, method: str, params: dict) -> dict:
        if self.ws is None:
            await self.connect()
        assert self.ws is not None
        req_id = next(REQUEST_IDS)
        await self.ws.send_bytes(pack({"id": req_id, "method": method, "params": params}))
        self.calls += 1
        while True:
            msg = await self.ws.receive(timeout=15)
            assert msg.type is aiohttp.WSMsgType.BINARY, f"socket ended after {method} {params!r}: {msg}"
            frame = decode(msg.data)
            if frame.get("id") == req_id:
                break
        self.outcomes[method, "result" if "result" in frame else frame.get("error", {}).get("code", "?")] += 1
        if method.startswith("auth."):
            # It may have bound the socket to someone else, or ended the session.
            await self.close()
            if method == "auth.logout" and "result" in frame:
                async with await self.server.connect() as c:
                    login = await c.call("auth.login", {"email": self.world.email, "password": PASSWORD})
                self.world.token = login["access_token"]
        return frame


@pytest.fixture(scope="module")
async def caller(logged_server, world):
    c = Caller(logged_server[0], world)
    yield c
    await c.close()


def pack(value: Any) -> bytes:
    try:
        return encode(value)
    except (TypeError, ValueError, OverflowError):  # a value no frame can carry: send it as msgpack does
        return msgpack.packb(value, use_bin_type=True, datetime=False)


# ---- values -------------------------------------------------------------------------

INT_EDGES = [0, 1, -1, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63)]
TIMESTAMP_EDGES = [
    msgpack.Timestamp(0, 0), msgpack.Timestamp(0, 999_999_999), msgpack.Timestamp(-1, 0),
    msgpack.Timestamp(-62135596800, 0), msgpack.Timestamp(-62135596801, 999_999_999),
    msgpack.Timestamp(253402300799, 999_999_999), msgpack.Timestamp(253402300800, 0),
    msgpack.Timestamp(2**63 - 1, 999_999_999), msgpack.Timestamp(-(2**63), 0), msgpack.Timestamp(2**34, 0),
]
# Text with what breaks naive handling: NUL and other controls, bidi
# controls, White_Space of every kind, non-ASCII digits, astral characters.
tricky_chars = st.sampled_from(list("\x00\x01\x1c\x1f\x7f\x85\xa0\u2028\u202e\u2066\u3000\t\n\r ١２\U0001f600\ufeff"))
texts = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
    st.lists(st.one_of(tricky_chars, st.characters(codec="utf-8")), max_size=20).map("".join),
    st.sampled_from(["", " ", "NaN", "Infinity", "-0", "1e1000000", "9" * 400, "0x10", "null", "true"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from(INT_EDGES),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=24),
    st.sampled_from(TIMESTAMP_EDGES),
    st.builds(msgpack.Timestamp, st.integers(-(2**63), 2**63 - 1), st.integers(0, 999_999_999)),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
anything = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(texts, st.integers(-(2**63), 2**64 - 1)), children, max_size=3),
    ),
    max_leaves=8,
)


def times() -> st.SearchStrategy[Any]:
    """Whole hours from the past week to beyond 90 days ahead, and near them,
    as a client may write them (Timestamp, RFC 3339 in any offset)."""
    now = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    hour = st.integers(-24 * 7, 24 * 95).map(lambda h: now + dt.timedelta(hours=h))
    offset = st.integers(-14 * 60, 14 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
    return st.one_of(
        hour,
        st.tuples(hour, offset).map(lambda t: t[0].astimezone(t[1]).isoformat()),
        st.tuples(hour, st.integers(0, 10**9 - 1)).map(lambda t: msgpack.Timestamp(int(t[0].timestamp()), t[1])),
        hour.map(lambda h: h.strftime("%Y-%m-%dT%H:%M:%SZ")),
        st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "2030-01-01T00:00:00"]),
    )


money = st.one_of(
    st.from_regex(r"[0-9]{1,6}(\.[0-9]{1,2})?", fullmatch=True),
    st.integers(-5, 20000),
    st.sampled_from(["0.01", "10000.00", "10000.01", "1.00", "0", "1e2", "１２", "5\n", " 5", "5.", ".5"]),
)


def valid_looking(w: World, name: str) -> st.SearchStrategy[Any]:
    """Values of the field named ``name`` such as a client would send,
    naming the world's real things where the field names a thing."""
    ids = st.one_of(st.sampled_from(w.ids), st.uuids().map(str), st.sampled_from(w.ids).map(str.upper))
    seqs = st.one_of(st.integers(-2, 5), st.sampled_from(INT_EDGES))
    by_name: dict[str, st.SearchStrategy[Any]] = {
        "email": st.one_of(st.just(w.login_email), st.builds(new_email), texts.map(lambda t: f"{t}@example.test")),
        "password": st.one_of(st.just(PASSWORD), texts),
        "name": st.one_of(st.just("Ann"), texts),
        "gender": st.one_of(st.just(w.gender), texts),
        "content": st.one_of(st.just("hi"), texts, st.just("x" * 4000)),
        "access_token": st.one_of(st.just(w.token), texts),
        "refresh_token": st.one_of(st.sampled_from(w.refresh_tokens), texts),
        "idempotency_key": st.one_of(st.sampled_from(["k1", "k2"]), st.builds(key), texts),
        "limit": st.integers(-1, 102),
        "cursor": st.one_of(st.sampled_from(sorted(w.cursors.values())),
                            st.sampled_from(sorted(w.cursors.values())).map(lambda c: c[:-2] + "AA"), texts),
        "role": st.sampled_from(["booker", "host", "any", "Host", ""]),
        "status": st.sampled_from(["pending", "confirmed", "completed", "failed", "cancelled", "x"]),
    }
    if name in by_name:
        return by_name[name]
    if name.endswith("_id"):
        return ids
    if name in ("start_at", "end_at", "from", "to"):
        return times()
    if name in ("amount", "price_per_hour", "min_price", "max_price"):
        return st.one_of(money, st.none()) if name == "price_per_hour" else money
    if name.endswith("seq"):
        return seqs
    return anything


def valid_params(w: World, method: str, draw: Any) -> dict:
    """Params of ``method`` that pass validation, naming the world's things
    (a method not listed gets valid-looking values field by field)."""
    start = slot(hour=draw(st.integers(1, 24 * 80)), days=0)
    end = start + dt.timedelta(hours=draw(st.integers(1, 12)))
    host_id = draw(st.sampled_from(w.hosts))
    booking_id = draw(st.sampled_from(w.bookings))
    conversation_id = draw(st.sampled_from(w.conversations))
    known: dict[str, dict] = {
        "auth.register": {"email": new_email(), "password": PASSWORD, "name": "Ann", "gender": "f"},
        "auth.login": {"email": w.login_email, "password": PASSWORD},
        "auth.authenticate": {"access_token": w.token},
        "auth.refresh": {"refresh_token": draw(st.sampled_from(w.refresh_tokens))},
        "users.update": {"name": "Ann", "gender": w.gender, "price_per_hour": "15.00"},
        "users.get": {"user_id": host_id},
        "hosts.search": draw(st.sampled_from([
            {"gender": w.gender, "limit": 1, "cursor": w.cursors["hosts.search"]},  # its cursor's filters
            {"gender": w.gender, "start_at": start, "end_at": end, "min_price": "1", "max_price": 100, "limit": 1},
        ])),
        "hosts.availability": {"host_id": host_id, "from": start, "to": end + dt.timedelta(days=draw(st.integers(0, 30)))},
        "wallet.topup": {"amount": "1.00", "idempotency_key": key()},
        "bookings.create": {"host_id": host_id, "start_at": start, "end_at": end, "idempotency_key": key()},
        "bookings.cancel": {"booking_id": booking_id},
        "bookings.get": {"booking_id": booking_id},
        "bookings.list": {"role": "booker", "limit": 1, "cursor": w.cursors["bookings.list"]},
        "wallet.transactions": {"limit": 2, "cursor": w.cursors["wallet.transactions"]},
        "chat.conversations": {"limit": 1, "cursor": w.cursors["chat.conversations"]},
        "chat.join": {"conversation_id": conversation_id, "since_seq": draw(st.integers(0, 3))},
        "chat.leave": {"conversation_id": conversation_id},
        "chat.typing": {"conversation_id": conversation_id},
        "chat.send": {"conversation_id": conversation_id, "content": "hi", "client_msg_id": str(uuid.uuid4())},
        "chat.history": {"conversation_id": conversation_id, "before_seq": draw(st.integers(1, 4)), "limit": 3},
    }
    if method in known:
        return known[method]
    model = METHODS[method].params
    return {f.alias or n: draw(valid_looking(w, f.alias or n)) for n, f in model.model_fields.items()}


def params_for(w: World, method: str, draw: Any) -> dict:
    """Valid params with a few fields (maybe none) replaced by a value of
    any kind, a valid-looking one, or nothing; sometimes a key the method
    does not know."""
    params = valid_params(w, method, draw)
    model = METHODS[method].params
    fields = sorted({f.alias or n for n, f in model.model_fields.items()} | set(params) | {"unknown"})
    for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        value = draw(st.one_of(anything, anything, valid_looking(w, name), st.just(OMIT)))
        if value is OMIT:
            params.pop(name, None)
        else:
            params[name] = value
    # Keys no model names, of any kind a map key may be.
    keys = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), texts, st.binary(max_size=8))
    params.update(draw(st.dictionaries(keys, anything, max_size=2)))
    return params


# ---- the property -------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), method=st.sampled_from(sorted(METHODS)))
async def test_no_params_of_any_method_are_answered_internal(caller, world, data, method):
    params = params_for(world, method, data.draw)
    frame = await caller.call(method, params)
    assert "result" in frame or "error" in frame, frame
    assert frame.get("error", {}).get("code") != "internal", f"{method} {params!r} -> {frame}"


async def test_the_server_logged_no_traceback(logged_server, caller):
    # Runs after the property above (pytest keeps the file's order).
    server, log = logged_server
    # The valid-looking values got calls past validation into their handlers.
    answered = {method for (method, outcome), n in caller.outcomes.items() if outcome != "invalid_params"}
    assert len(answered) >= len(METHODS) // 2, sorted(caller.outcomes.items())
    print(sorted(caller.outcomes.items()))
    assert server.proc.poll() is None
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text and "internal error" not in text, text[-4000:]
