"""Limits at the edge (PROTOCOL Transport, 2nd ed.): the sign-in deadline,
the socket caps checked before an upgrade, the values and levels of a frame,
and the memory that calls in flight may hold.

Each limit is tested at its boundary. The deadline tests wait on purpose:
"still open after the deadline" has no event to await, and the contract
states the time bound they check.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from typing import AsyncIterator

import aiohttp
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import OverLimits, check_shape, encode
from server import credentials
from server.config import DEV_JWT_SECRET
from server.edge import SocketCounts
from tests.conftest import ServerProcess, register
from tests.test_transport import ask, ask_raw, close_code, next_reply

DEADLINE_S = 1.0
MAX_FRAME_BYTES = 65536
MAX_VALUES = 1024
MAX_DEPTH = 16
MIB = 1024 * 1024


@contextlib.asynccontextmanager
async def socket_from(server: ServerProcess, source: str = "127.0.0.1", **kw) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A bare WebSocket from the client address ``source`` (127.0.0.0/8)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.ws_connect(server.url, **kw) as ws:
            yield ws


async def refused_status(server: ServerProcess, source: str = "127.0.0.1", **kw) -> int:
    """The HTTP status of an upgrade that must be refused."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with socket_from(server, source, **kw):
            pass
    return refused.value.status


def now() -> float:
    return asyncio.get_running_loop().time()


async def wait_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - now()))


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


# ---- the sign-in deadline ----------------------------------------------------


@pytest.fixture(scope="module")
async def deadline_server(stack) -> AsyncIterator[ServerProcess]:
    proc = await ServerProcess(stack, AUTH_DEADLINE_S=str(DEADLINE_S)).start()
    yield proc
    await proc.stop()


@pytest.fixture
async def session(deadline_server) -> dict:
    async with await deadline_server.connect() as c:
        return await register(c)


def bearer(token: str) -> dict:
    return {"headers": {"Authorization": f"Bearer {token}"}}


async def test_a_socket_that_authenticates_just_before_the_deadline_stays_open(deadline_server, session):
    started = now()
    async with socket_from(deadline_server) as ws:
        await wait_until(started + DEADLINE_S / 2)
        reply = await ask(ws, {"id": 1, "method": "auth.authenticate", "params": {"access_token": session["access_token"]}})
        assert "result" in reply, reply
        await wait_until(started + 2 * DEADLINE_S)
        reply = await ask(ws, {"id": 2, "method": "users.me"})
        assert reply["result"]["id"] == session["user"]["id"]


async def test_a_socket_that_does_not_authenticate_is_closed_1008_at_the_deadline(deadline_server):
    started = now()
    async with socket_from(deadline_server) as ws:
        # Calls that do not sign in do not move the deadline.
        reply = await ask(ws, {"id": 1, "method": "users.me"})
        assert reply["error"]["code"] == "unauthenticated"
        assert await close_code(ws, timeout=DEADLINE_S + 5) == 1008
    assert DEADLINE_S <= now() - started < DEADLINE_S + 1.5


async def test_a_socket_bound_at_the_upgrade_has_no_deadline(deadline_server, session):
    started = now()
    async with socket_from(deadline_server, **bearer(session["access_token"])) as ws:
        await wait_until(started + 2 * DEADLINE_S)
        reply = await ask(ws, {"id": 1, "method": "users.me"})
        assert reply["result"]["id"] == session["user"]["id"]


async def test_logout_restarts_the_deadline(deadline_server, session):
    started = now()
    async with socket_from(deadline_server, **bearer(session["access_token"])) as ws:
        await wait_until(started + 1.5 * DEADLINE_S)  # past the first deadline: bound, so open
        logged_out = now()
        reply = await ask(ws, {"id": 1, "method": "auth.logout"})
        assert reply["result"] == {}
        assert await close_code(ws, timeout=DEADLINE_S + 5) == 1008
    assert DEADLINE_S <= now() - logged_out < DEADLINE_S + 1.5


async def test_a_socket_unbound_by_its_session_ending_elsewhere_gets_a_new_deadline(deadline_server, session):
    async with socket_from(deadline_server, **bearer(session["access_token"])) as watcher:
        async with socket_from(deadline_server, **bearer(session["access_token"])) as other:
            ended = now()
            assert (await ask(other, {"id": 1, "method": "auth.logout"}))["result"] == {}
        assert await close_code(watcher, timeout=DEADLINE_S + 5) == 1008
    assert DEADLINE_S <= now() - ended < DEADLINE_S + 1.5


async def test_a_socket_whose_token_expired_is_still_bound_and_stays_open(deadline_server, session):
    claims = credentials.decode_access_token(DEV_JWT_SECRET, session["access_token"])
    short = credentials.issue_access_token(DEV_JWT_SECRET, 1, claims.user_id, claims.family_id)
    started = now()
    async with socket_from(deadline_server, **bearer(short)) as ws:
        await wait_until(started + max(2 * DEADLINE_S, 2.5))  # the token expired, the deadline passed
        reply = await ask(ws, {"id": 1, "method": "users.me"})
        assert reply["error"]["code"] == "token_expired"


# ---- socket caps before the upgrade ------------------------------------------

PER_ADDRESS = 3
PER_PROCESS = 5


@pytest.fixture
async def capped_server(stack) -> AsyncIterator[ServerProcess]:
    """Its own process per test: the caps count every socket of the process."""
    proc = await ServerProcess(stack, MAX_SOCKETS_PER_ADDRESS=str(PER_ADDRESS), MAX_SOCKETS=str(PER_PROCESS),
                               TRUSTED_PROXIES="127.0.0.1").start()
    yield proc
    await proc.stop()


async def open_sockets(stack_: contextlib.AsyncExitStack, server: ServerProcess, source: str, count: int,
                       **kw) -> list[aiohttp.ClientWebSocketResponse]:
    return [await stack_.enter_async_context(socket_from(server, source, **kw)) for _ in range(count)]


async def admitted_once_freed(server: ServerProcess, stack_: contextlib.AsyncExitStack, source: str, status: int,
                              **kw) -> aiohttp.ClientWebSocketResponse:
    """A socket from ``source`` once the process has torn down a socket just
    closed, whose slot it needs. The teardown ends a moment after the close
    handshake, and there is no event to await: a bounded retry, as long as
    the answer is the refusal ``status``."""
    deadline = now() + 5.0
    while True:
        try:
            return await stack_.enter_async_context(socket_from(server, source, **kw))
        except aiohttp.WSServerHandshakeError as refused:
            assert refused.status == status and now() < deadline, refused
        await asyncio.sleep(0.02)


async def test_sockets_per_address_are_capped_before_the_upgrade_with_429(capped_server):
    async with contextlib.AsyncExitStack() as sockets:
        first, *_ = await open_sockets(sockets, capped_server, "127.0.0.1", PER_ADDRESS)
        assert await refused_status(capped_server, "127.0.0.1") == 429
        # Another address still gets in, and the refused upgrade took no slot.
        await open_sockets(sockets, capped_server, "127.0.0.2", 1)
        assert await refused_status(capped_server, "127.0.0.1") == 429
        # A closed socket frees its slot.
        await first.close()
        await admitted_once_freed(capped_server, sockets, "127.0.0.1", 429)
        assert await refused_status(capped_server, "127.0.0.1") == 429


async def test_sockets_per_process_are_capped_before_the_upgrade_with_503(capped_server):
    async with contextlib.AsyncExitStack() as sockets:
        await open_sockets(sockets, capped_server, "127.0.0.1", PER_ADDRESS)
        last, = await open_sockets(sockets, capped_server, "127.0.0.2", PER_PROCESS - PER_ADDRESS - 1)
        await open_sockets(sockets, capped_server, "127.0.0.3", 1)
        assert await refused_status(capped_server, "127.0.0.4") == 503
        await last.close()
        await admitted_once_freed(capped_server, sockets, "127.0.0.4", 503)


async def test_forwarded_addresses_count_only_from_a_trusted_proxy(capped_server):
    async with contextlib.AsyncExitStack() as sockets:
        # 127.0.0.1 is a trusted proxy: each forwarded client has its own cap.
        proxied = {"headers": {"X-Forwarded-For": "198.51.100.1"}}
        await open_sockets(sockets, capped_server, "127.0.0.1", PER_ADDRESS, **proxied)
        assert await refused_status(capped_server, "127.0.0.1", **proxied) == 429
        await open_sockets(sockets, capped_server, "127.0.0.1", 1, headers={"X-Forwarded-For": "198.51.100.2"})
    async with contextlib.AsyncExitStack() as sockets:
        # 127.0.0.2 is not: what it claims is ignored, its own address counts.
        # (The sockets just closed may still hold their slots for a moment.)
        for n in range(PER_ADDRESS):
            await admitted_once_freed(capped_server, sockets, "127.0.0.2", 503, headers={"X-Forwarded-For": f"203.0.113.{n}"})
        assert await refused_status(capped_server, "127.0.0.2", headers={"X-Forwarded-For": "203.0.113.99"}) == 429


# ---- values and levels of a frame --------------------------------------------


@pytest.fixture(scope="module")
async def held_server(stack) -> AsyncIterator[ServerProcess]:
    """The contract's frame limits, and the test methods that hold
    bookings.create calls in flight."""
    proc = await ServerProcess(stack, test_methods=True).start()
    yield proc
    await proc.stop()


def frame_with_values(count: int, req_id: int = 1) -> bytes:
    """users.me with an ignored list param: ``count`` values in all (the
    frame's map, its 3 keys and 3 values, "pad" and its list make 9)."""
    return encode({"id": req_id, "method": "users.me", "params": {"pad": [0] * (count - 9)}})


def frame_with_levels(levels: int, req_id: int = 1) -> bytes:
    """users.me with an ignored param nested so the frame has ``levels``
    levels of maps and arrays (the frame's map and params are two)."""
    pad: list = []
    for _ in range(levels - 3):
        pad = [pad]
    return encode({"id": req_id, "method": "users.me", "params": {"pad": pad}})


async def test_a_frame_of_1024_values_is_read_and_one_of_1025_is_a_bad_frame(held_server):
    async with socket_from(held_server) as ws:
        reply = await ask_raw(ws, frame_with_values(MAX_VALUES))
        assert reply["id"] == 1 and reply["error"]["code"] == "unauthenticated"  # read as a request
        reply = await ask_raw(ws, frame_with_values(MAX_VALUES + 1))
        assert reply["id"] is None and reply["error"]["code"] == "bad_frame"


async def test_a_frame_of_16_levels_is_read_and_one_of_17_is_a_bad_frame(held_server):
    async with socket_from(held_server) as ws:
        reply = await ask_raw(ws, frame_with_levels(MAX_DEPTH))
        assert reply["id"] == 1 and reply["error"]["code"] == "unauthenticated"
        reply = await ask_raw(ws, frame_with_levels(MAX_DEPTH + 1))
        assert reply["id"] is None and reply["error"]["code"] == "bad_frame"
        # A level is a level whatever holds it: maps nested as deep (params
        # is the 2nd level, and holds 15 more).
        deep: dict = {}
        for _ in range(MAX_DEPTH - 2):
            deep = {"k": deep}
        reply = await ask_raw(ws, encode({"id": 2, "method": "users.me", "params": deep}))
        assert reply["id"] == 2 and reply["error"]["code"] == "unauthenticated"
        reply = await ask_raw(ws, encode({"id": 3, "method": "users.me", "params": {"k": deep}}))
        assert reply["id"] is None and reply["error"]["code"] == "bad_frame"


async def test_frames_over_the_limits_count_as_bad_frames(held_server):
    async with socket_from(held_server) as ws:
        for n in range(9):
            frame = frame_with_values(MAX_VALUES + 1) if n % 2 else frame_with_levels(MAX_DEPTH + 1)
            assert (await ask_raw(ws, frame))["error"]["code"] == "bad_frame"
        await ws.send_bytes(frame_with_values(MAX_VALUES + 1))
        assert await close_code(ws) == 1008


def attack_frame(req_id: int) -> bytes:
    """The 64 KiB frame of about 65,000 empty maps."""
    count = MAX_FRAME_BYTES - 64
    while len(data := encode({"id": req_id, "method": "users.me", "params": {"pad": [{}] * count}})) > MAX_FRAME_BYTES:
        count -= 1
    return data


async def test_a_frame_of_65000_empty_maps_is_a_bad_frame_and_memory_does_not_jump(held_server):
    pid = held_server.proc.pid
    async with contextlib.AsyncExitStack() as sockets:
        socks = [await sockets.enter_async_context(socket_from(held_server)) for _ in range(4)]
        peak_before = vm_kib(pid, "VmHWM")
        frames = [attack_frame(n) for n in range(9)]
        for ws in socks:
            for frame in frames:
                await ws.send_bytes(frame)
        for ws in socks:
            for _ in frames:
                reply = await next_reply(ws)
                assert reply["id"] is None and reply["error"]["code"] == "bad_frame"
        assert (vm_kib(pid, "VmHWM") - peak_before) * 1024 < 16 * MIB


# ---- what calls in flight hold ------------------------------------------------


@pytest.fixture(scope="module")
async def many_values_server(stack) -> AsyncIterator[ServerProcess]:
    """Frames of up to 70,000 values allowed: what calls in flight hold must
    not depend on the values limit."""
    proc = await ServerProcess(stack, test_methods=True, MAX_FRAME_VALUES="70000").start()
    yield proc
    await proc.stop()


def booking_frame(req_id: int, pad: object) -> bytes:
    """A valid bookings.create with an unknown (ignored) ``pad`` param."""
    start = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
    return encode({"id": req_id, "method": "bookings.create", "params": {
        "host_id": str(uuid.uuid4()), "start_at": start, "end_at": start + dt.timedelta(hours=1),
        "idempotency_key": f"edge-{uuid.uuid4()}", "pad": pad,
    }})


def heaviest_frame(req_id: int) -> bytes:
    """64 KiB and 1,024 values: 1,007 strings, each with a character that
    makes Python store all of it at 4 bytes a character."""
    count = MAX_VALUES - 17  # the frame's map with 3 keys and values, params with 5 keys and values, the list
    size = 40
    while True:
        data = booking_frame(req_id, ["\U0001F600" + "x" * size] * count)
        if len(data) > MAX_FRAME_BYTES:
            break
        size += 1
    size -= 1
    extra = MAX_FRAME_BYTES - len(booking_frame(req_id, ["\U0001F600" + "x" * size] * count))
    while True:  # the last string takes up the rest (its header may grow by a byte)
        data = booking_frame(req_id, ["\U0001F600" + "x" * size] * (count - 1) + ["\U0001F600" + "x" * (size + extra)])
        if len(data) <= MAX_FRAME_BYTES:
            break
        extra -= 1
    assert len(data) >= MAX_FRAME_BYTES - 2, len(data)
    return data


def empty_maps_frame(req_id: int) -> bytes:
    count = MAX_FRAME_BYTES - 200
    while len(data := booking_frame(req_id, [{}] * count)) > MAX_FRAME_BYTES:
        count -= 1
    return data


async def rss_raised_by_calls_in_flight(server: ServerProcess, frame_for) -> int:
    """Bytes of RSS that 4 sockets x 32 held bookings.create calls add."""
    pid = server.proc.pid
    async with await server.connect() as c:
        s = await register(c)
        await c.call("test.hold_merged_writes", {"hold": True})
        try:
            async with contextlib.AsyncExitStack() as sockets:
                socks = [await sockets.enter_async_context(socket_from(server, **bearer(s["access_token"])))
                         for _ in range(4)]
                frames = [[frame_for(n) for n in range(32)] for _ in socks]
                before = vm_kib(pid, "VmRSS")
                for ws, own in zip(socks, frames):
                    for frame in own:
                        await ws.send_bytes(frame)
                del frames
                deadline = now() + 30
                while True:  # the calls' arrival has no event to await: a bounded poll
                    stats = (await c.call("test.sockets"))["sockets"]
                    # (this socket, bound as the same user, is listed too)
                    in_flight = sorted(x["calls_in_flight"] for x in stats if x["user_id"] == s["user"]["id"])
                    if in_flight[-4:] == [32] * 4:
                        break
                    assert now() < deadline, in_flight
                    await asyncio.sleep(0.05)
                raised = (vm_kib(pid, "VmRSS") - before) * 1024
                await c.call("test.hold_merged_writes", {"hold": False})
                for ws in socks:
                    for _ in range(32):
                        assert "error" in await next_reply(ws, timeout=30)  # the host is unknown
                return raised
        finally:
            await c.call("test.hold_merged_writes", {"hold": False})


async def test_calls_in_flight_of_the_largest_frames_raise_memory_by_less_than_64_mib(held_server):
    raised = await rss_raised_by_calls_in_flight(held_server, heaviest_frame)
    assert raised < 64 * MIB, raised / MIB


async def test_a_call_in_flight_holds_its_params_not_its_frame(many_values_server):
    raised = await rss_raised_by_calls_in_flight(many_values_server, empty_maps_frame)
    assert raised < 64 * MIB, raised / MIB


def test_socket_counts_keep_no_entry_for_an_address_without_sockets():
    counts = SocketCounts()
    for address in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        counts.add(address)
    assert (counts.total, counts.of("192.0.2.1"), counts.addresses) == (3, 2, 2)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.1"):
        counts.remove(address)
    assert (counts.total, counts.of("192.0.2.1"), counts.addresses) == (0, 0, 0)


# Every kind of MessagePack value, at every size class of its header.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=300), st.binary(max_size=300),
    st.sampled_from(["s" * 70000, b"b" * 70000, msgpack.ExtType(5, b"e" * 300), msgpack.ExtType(5, b"e" * 70000),
                     msgpack.ExtType(1, b"x"), msgpack.ExtType(1, b"x" * 16), [0] * 70000, dict.fromkeys(range(20000))]),
    st.datetimes(timezones=st.just(dt.timezone.utc)),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=20), st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-2**63, 2**64 - 1)), inner, max_size=20)),
    max_leaves=60)


def counted(value, level: int = 0) -> tuple[int, int]:
    """(values, levels) of a decoded value, the contract's way."""
    if isinstance(value, dict):
        parts = [counted(v, level + 1) for pair in value.items() for v in pair]
    elif isinstance(value, list):
        parts = [counted(v, level + 1) for v in value]
    else:
        return 1, level
    return 1 + sum(p[0] for p in parts), max([level + 1] + [p[1] for p in parts])


@settings(max_examples=200, deadline=None)
@given(values)
def test_the_shape_check_agrees_with_the_decoded_frame_at_every_boundary(value):
    data = msgpack.packb(value, datetime=True, use_bin_type=True)
    count, levels = counted(msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=0))
    check_shape(data, count, levels)
    for limits in ((count - 1, levels), (count, levels - 1)):
        if min(limits) >= 0 and limits != (count, levels):
            with pytest.raises(OverLimits):
                check_shape(data, *limits)
