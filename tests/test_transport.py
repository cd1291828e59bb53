"""The WebSocket transport and the frame layer: binary frames of bounded
size, the subprotocol, pings, pipelining and the in-flight limit, bad frames
and their count, and how calls fail (unknown method, invalid params,
internal)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import tempfile
import time
from typing import AsyncIterator

import aiohttp
import msgpack
import pytest

from protocol.codec import decode, encode
from tests.chat_helpers import RawSocket, open_room
from tests.conftest import (ServerProcess, get_when_replicated, ops_status, register, row_locked,
                            until_writes_wait_on_the_lock)

MAX_FRAME_BYTES = 65536
MAX_IN_FLIGHT = 32
MAX_UINT64 = 2**64 - 1


@contextlib.asynccontextmanager
async def raw_socket(server: ServerProcess, **kw) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A bare WebSocket: frames are written and read exactly as given."""
    async with aiohttp.ClientSession(connector=kw.pop("connector", None)) as s:
        async with s.ws_connect(server.url, **kw) as ws:
            yield ws


async def next_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> dict:
    msg = await ws.receive(timeout)
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    return decode(msg.data)


async def next_reply(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> dict:
    """The next reply frame, skipping events (e.g. user.updated after an update)."""
    while "event" in (frame := await next_frame(ws, timeout)):
        pass
    return frame


async def close_code(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> int | None:
    """Read until the server closes; replies still in flight are skipped."""
    while True:
        msg = await ws.receive(timeout)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return ws.close_code
        assert msg.type is aiohttp.WSMsgType.BINARY, msg


async def ask(ws: aiohttp.ClientWebSocketResponse, frame: dict) -> dict:
    await ws.send_bytes(encode(frame))
    return await next_reply(ws)


async def ask_raw(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> dict:
    await ws.send_bytes(data)
    return await next_reply(ws)


async def still_answers(ws: aiohttp.ClientWebSocketResponse) -> None:
    reply = await ask(ws, {"id": 424242, "method": "users.me"})
    assert reply["id"] == 424242 and reply["error"]["code"] == "unauthenticated"


def frame_of_size(size: int, req_id: int = 1) -> bytes:
    """A valid request (users.me, with an ignored pad param) of exactly ``size`` bytes."""
    pad = size
    while True:
        data = encode({"id": req_id, "method": "users.me", "params": {"pad": "x" * pad}})
        if len(data) == size:
            return data
        pad -= len(data) - size if len(data) > size else -1


# ---- frames on the wire ----------------------------------------------------


async def test_a_text_frame_closes_the_socket_with_1003(server):
    async with raw_socket(server) as ws:
        await ws.send_str('{"id": 1, "method": "users.me"}')
        assert await close_code(ws) == 1003


async def test_a_text_frame_that_is_not_utf8_closes_the_socket_with_1003_too(server):
    async with await server.connect() as c:
        s = await register(c)
    raw = await RawSocket.connect(server, s["access_token"])
    try:
        await raw.send_frames([(0x1, b"\xff\xfe not utf-8")])
        assert await raw.close_code() == 1003
    finally:
        raw.close()


async def accepts_a_frame_of(ws: aiohttp.ClientWebSocketResponse, size: int, req_id: int) -> None:
    data = frame_of_size(size, req_id)
    assert len(data) == size
    await ws.send_bytes(data)
    reply = await next_frame(ws)
    assert reply["id"] == req_id and reply["error"]["code"] == "unauthenticated"


async def test_a_frame_of_exactly_max_frame_bytes_is_accepted(server):
    async with raw_socket(server) as ws:
        await accepts_a_frame_of(ws, MAX_FRAME_BYTES, req_id=77)


async def test_a_frame_one_byte_over_max_frame_bytes_closes_the_socket_with_1009(server):
    async with raw_socket(server) as ws:
        await ws.send_bytes(frame_of_size(MAX_FRAME_BYTES + 1))
        assert await close_code(ws) == 1009


SMALL_FRAME_BYTES = 1024


async def test_max_frame_bytes_is_configurable_exactly_it_is_accepted_one_byte_more_closes_1009(stack):
    proc = await ServerProcess(stack, MAX_FRAME_BYTES=str(SMALL_FRAME_BYTES)).start()
    try:
        async with raw_socket(proc) as ws:
            await accepts_a_frame_of(ws, SMALL_FRAME_BYTES, req_id=78)
            # The limit is the setting's, not the default's: far below 65,536.
            await ws.send_bytes(frame_of_size(SMALL_FRAME_BYTES + 1))
            assert await close_code(ws) == 1009
    finally:
        await proc.stop()


async def test_the_server_selects_hangout_v1_when_the_client_asks_for_it(server):
    async with await server.connect() as c:  # the protocol client asks for it
        assert c.ws.protocol == "hangout.v1"
    async with raw_socket(server, protocols=("something.else", "hangout.v1")) as ws:
        assert ws.protocol == "hangout.v1"
    async with raw_socket(server) as ws:  # not asked: none, and it still works
        assert ws.protocol is None
        await still_answers(ws)


# ---- pings -----------------------------------------------------------------


PING_INTERVAL_S = 1.0


@pytest.fixture(scope="module")
async def pinging_server(stack):
    proc = await ServerProcess(stack, PING_INTERVAL_S=str(PING_INTERVAL_S)).start()
    yield proc
    await proc.stop()


async def test_a_client_that_never_answers_pings_is_dropped_one_that_does_is_kept(pinging_server):
    async def never_answers() -> float:
        async with raw_socket(pinging_server, autoping=False) as ws:
            msg = await ws.receive(PING_INTERVAL_S * 3)
            assert msg.type is aiohttp.WSMsgType.PING
            pinged = time.monotonic()
            msg = await ws.receive(PING_INTERVAL_S * 3)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
            return time.monotonic() - pinged

    async def answers_late_but_within_the_interval() -> None:
        async with raw_socket(pinging_server, autoping=False) as ws:
            for _ in range(2):
                msg = await ws.receive(PING_INTERVAL_S * 3)
                assert msg.type is aiohttp.WSMsgType.PING, msg
                await asyncio.sleep(PING_INTERVAL_S * 0.6)  # a slow network, still inside the interval
                await ws.pong(msg.data)
            await still_answers(ws)

    async def lets_the_library_answer() -> None:
        async with await pinging_server.connect() as c:
            await asyncio.sleep(PING_INTERVAL_S * 3)  # idle through several pings
            reply = await c.call_raw("users.me")
            assert reply["error"]["code"] == "unauthenticated"  # answered: still connected

    dropped_after, _, _ = await asyncio.gather(
        never_answers(), answers_late_but_within_the_interval(), lets_the_library_answer()
    )
    # dropped once the next interval has passed without an answer
    assert PING_INTERVAL_S * 0.9 <= dropped_after <= PING_INTERVAL_S * 2.5


# ---- pipelining and the in-flight limit ------------------------------------


async def test_pipelined_calls_are_answered_and_matched_by_id(server):
    users = []
    for i in range(4):
        async with await server.connect() as c:
            users.append((await register(c, name=f"Pipelined {i}"))["user"])
    async with await server.connect() as c:
        me = (await register(c, name="Caller"))["user"]
        for user in users:
            await get_when_replicated(c, user["id"])
        calls = [("users.get", {"user_id": users[i % 4]["id"]}) for i in range(100)] + [("users.me", {})] * 20
        in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def call(method: str, params: dict) -> dict:
            async with in_flight:
                return await c.call(method, params)

        results = await asyncio.gather(*(call(m, p) for m, p in calls))
    for (method, params), result in zip(calls, results):
        assert result["id"] == (params["user_id"] if method == "users.get" else me["id"])


async def test_replies_come_in_any_order(server, db):
    async with await server.connect() as c:
        s = await register(c)
    async with raw_socket(server, headers={"Authorization": f"Bearer {s['access_token']}"}) as ws:
        async with row_locked(db, s["user"]["id"]):
            await ws.send_bytes(encode({"id": 1, "method": "users.update", "params": {"name": "Slow"}}))
            await until_writes_wait_on_the_lock(db, 1)
            await ws.send_bytes(encode({"id": 2, "method": "users.me"}))
            assert (await next_reply(ws))["id"] == 2  # overtakes the slow call
        slow = await next_reply(ws)
        assert slow["id"] == 1 and slow["result"]["name"] == "Slow"


async def test_one_call_more_than_max_in_flight_is_too_many_requests(server, db):
    async with await server.connect() as c:
        s = await register(c)
    async with raw_socket(server, headers={"Authorization": f"Bearer {s['access_token']}"}) as ws:
        async with row_locked(db, s["user"]["id"]):
            for i in range(1, MAX_IN_FLIGHT + 1):
                await ws.send_bytes(encode({"id": i, "method": "users.update", "params": {"name": f"n{i}"}}))
            await until_writes_wait_on_the_lock(db, 1)
            await ws.send_bytes(encode({"id": 1000, "method": "users.me"}))
            refused = await next_reply(ws)
            assert refused == {"id": 1000, "error": refused["error"]}
            assert refused["error"]["code"] == "too_many_requests"
        replies = [await next_reply(ws) for _ in range(MAX_IN_FLIGHT)]
        assert sorted(r["id"] for r in replies) == list(range(1, MAX_IN_FLIGHT + 1))
        assert all("result" in r for r in replies)
        # Below the limit again: accepted.
        assert "result" in await ask(ws, {"id": 1001, "method": "users.me"})


# ---- bad frames --------------------------------------------------------------


UNREADABLE_FRAMES = {
    "not-msgpack": b"\xc1",
    "truncated": encode({"id": 1, "method": "users.me"})[:-3],
    "empty": b"",
    "trailing-bytes": encode({"id": 1, "method": "users.me"}) + b"\x00",
    "two-maps": encode({"id": 1, "method": "users.me"}) * 2,
    "array": encode([1, "users.me", {}]),
    "integer": encode(1),
    "string": encode("users.me"),
    "nil": encode(None),
    "binary": encode(b"\x81\xa2id\x01"),
    "no-id": encode({"method": "users.me"}),
    "id-negative": encode({"id": -1, "method": "users.me"}),
    "id-float": encode({"id": 1.0, "method": "users.me"}),
    "id-above-uint64-as-float": encode({"id": float(2**64), "method": "users.me"}),
    "id-string": encode({"id": "1", "method": "users.me"}),
    "id-true": encode({"id": True, "method": "users.me"}),
    "id-false": encode({"id": False, "method": "users.me"}),
    "id-null": encode({"id": None, "method": "users.me"}),
    "id-array": encode({"id": [1], "method": "users.me"}),
    "id-map": encode({"id": {"a": 1}, "method": "users.me"}),
    "id-binary": encode({"id": b"\x01", "method": "users.me"}),
    "id-timestamp": msgpack.packb({"id": msgpack.Timestamp(1, 0), "method": "users.me"}),
    "id-ext": msgpack.packb({"id": msgpack.ExtType(5, b"\x01"), "method": "users.me"}),
}


@pytest.mark.parametrize("data", UNREADABLE_FRAMES.values(), ids=UNREADABLE_FRAMES.keys())
async def test_a_frame_without_a_usable_id_is_bad_frame_with_id_null(server, data):
    async with raw_socket(server) as ws:
        await ws.send_bytes(data)
        reply = await next_frame(ws)
        assert reply["id"] is None
        assert reply["error"]["code"] == "bad_frame"
        assert isinstance(reply["error"]["message"], str)
        await still_answers(ws)


@pytest.mark.parametrize("req_id", [0, 7, MAX_UINT64])
@pytest.mark.parametrize(
    "method", [None, 5, "", b"users.me", ["users.me"], {"name": "users.me"}, True], ids=repr
)
async def test_a_frame_with_a_uint_id_but_no_usable_method_is_bad_frame_carrying_the_id(server, req_id, method):
    frame = {"id": req_id} if method is None else {"id": req_id, "method": method}
    async with raw_socket(server) as ws:
        reply = await ask(ws, frame)
        assert reply["id"] == req_id
        if method == "":
            assert reply["error"]["code"] == "unknown_method"  # a string is a usable method name
        else:
            assert reply["error"]["code"] == "bad_frame"


async def test_the_tenth_bad_frame_closes_the_socket_with_1008(server):
    async with raw_socket(server) as ws:
        for i in range(9):
            reply = await ask(ws, {"id": "not a uint", "method": "users.me"})
            assert reply["error"]["code"] == "bad_frame"
            await still_answers(ws)  # open through the 9th; valid calls do not reset the count
        await ws.send_bytes(b"\xc1")
        assert await close_code(ws) == 1008


async def test_frames_with_a_uint_id_but_no_usable_method_count_toward_the_tenth_too(server):
    no_method = [
        {"id": 0}, {"id": 1, "params": {}}, {"id": 2, "method": None}, {"id": 3, "method": 5},
        {"id": 4, "method": b"users.me"}, {"id": 5, "method": ["users.me"]}, {"id": 6, "method": {"name": "users.me"}},
        {"id": 7, "method": 1.5}, {"id": MAX_UINT64},
    ]
    async with raw_socket(server) as ws:
        for frame in no_method:  # nine of them: still open
            reply = await ask(ws, frame)
            assert (reply["id"], reply["error"]["code"]) == (frame["id"], "bad_frame")
            await still_answers(ws)
        await ws.send_bytes(encode({"id": 99, "method": True}))  # the tenth
        assert await close_code(ws) == 1008


async def test_nothing_that_arrives_with_the_tenth_bad_frame_runs(server, db):
    async with await server.connect() as c:
        s = await register(c, name="Before")
    raw = await RawSocket.connect(server, s["access_token"])
    try:
        update = encode({"id": 1, "method": "users.update", "params": {"name": "After"}})
        await raw.send_frames([(0x2, b"\xc1")] * 10 + [(0x2, update)])  # one TCP write
        assert await raw.close_code() == 1008
    finally:
        raw.close()
    assert await db.fetchval("SELECT name FROM users WHERE id = $1::uuid", s["user"]["id"]) == "Before"


async def test_ten_bad_frames_in_one_read_get_their_nine_replies_before_1008(server):
    async with await server.connect() as c:
        s = await register(c)
    raw = await RawSocket.connect(server, s["access_token"], rcvbuf=65536)
    try:
        await raw.send_frames([(0x2, b"\xc1")] * 10)  # one TCP write: the server reads them together
        replies = []
        while True:
            opcode, data = await raw.frame()
            if opcode == 0x8:
                break
            replies.append(decode(data))
        assert struct.unpack("!H", data[:2])[0] == 1008
        # Replies queued before a close go out before the close frame.
        assert [(r["id"], r["error"]["code"]) for r in replies] == [(None, "bad_frame")] * 9
    finally:
        raw.close()


# ---- how calls fail ------------------------------------------------------------


@pytest.mark.parametrize("method", ["users.nope", "USERS.ME", "users.me ", "x" * 5000, "test.crash"])
async def test_an_unknown_method_is_unknown_method(server, method):
    async with raw_socket(server) as ws:
        reply = await ask(ws, {"id": 9, "method": method})
        assert reply["id"] == 9
        assert reply["error"]["code"] == "unknown_method"
        await still_answers(ws)


async def test_invalid_params_name_every_failing_field(server):
    async with raw_socket(server) as ws:
        reply = await ask(ws, {"id": 3, "method": "auth.register", "params": {"email": 5, "password": "short"}})
        err = reply["error"]
        assert err["code"] == "invalid_params"
        reasons = {e["field"]: e["reason"] for e in err["data"]["errors"]}
        assert set(reasons) == {"email", "password", "name", "gender"}
        assert reasons["name"] == reasons["gender"] == "Field required"
        assert all(isinstance(r, str) and r for r in reasons.values())


async def test_deeply_nested_params_are_invalid_params_not_internal(server):
    async with await server.connect() as c:
        s = await register(c)
    async with raw_socket(server, headers={"Authorization": f"Bearer {s['access_token']}"}) as ws:
        # 14 levels under the frame's map and params: the 16 MAX_FRAME_DEPTH
        # allows (deeper is a bad frame: tests/test_edge_limits.py).
        for depth in (1, 14):
            # {"id": 12, "method": "users.update", "params": {"name": [[[...["x"]...]]]}}
            frame = b"\x83\xa2id\x0c\xa6method\xacusers.update\xa6params\x81\xa4name" + b"\x91" * depth + b"\xa1x"
            reply = await ask_raw(ws, frame)
            assert reply["id"] == 12
            assert reply["error"]["code"] == "invalid_params", reply["error"]
            assert reply["error"]["data"]["errors"][0]["field"].startswith("name")


@pytest.mark.parametrize("params", [None, [], [1, 2], "params", 5, True, b"\x80"], ids=repr)
async def test_params_that_are_not_a_map_are_invalid_params(server, params):
    async with raw_socket(server) as ws:
        reply = await ask(ws, {"id": 4, "method": "auth.login", "params": params})
        assert reply["error"]["code"] == "invalid_params"
        assert reply["error"]["data"]["errors"] == [{"field": "params", "reason": "must be a map"}]


async def test_omitted_params_mean_an_empty_map(server):
    async with await server.connect() as c:
        s = await register(c)
    async with raw_socket(server, headers={"Authorization": f"Bearer {s['access_token']}"}) as ws:
        assert (await ask(ws, {"id": 5, "method": "users.me"}))["result"]["id"] == s["user"]["id"]
        assert (await ask(ws, {"id": 6, "method": "users.update"}))["result"] == (await ask(ws, {"id": 7, "method": "users.me"}))["result"]


@pytest.fixture(scope="module")
async def server_with_test_methods(stack):
    proc = ServerProcess(stack, test_methods=True, LOG_LEVEL="ERROR")
    proc.stderr = tempfile.TemporaryFile()
    await proc.start()
    yield proc
    await proc.stop()
    proc.stderr.close()


async def test_a_bug_answers_internal_with_a_correlation_ref_that_is_logged(server_with_test_methods):
    async with raw_socket(server_with_test_methods) as ws:
        reply = await ask(ws, {"id": 11, "method": "test.crash"})
        assert reply["id"] == 11
        assert reply["error"]["code"] == "internal"
        ref = reply["error"]["data"]["ref"]
        assert isinstance(ref, str) and len(ref) >= 16
        assert "deliberate" not in reply["error"]["message"]  # no internals leak to the client
        await still_answers(ws)
    log = server_with_test_methods.stderr
    deadline = time.monotonic() + 5
    while True:  # the log is written by another process: a bounded poll
        log.seek(0)
        text = log.read().decode(errors="replace")
        if ref in text:
            break
        assert time.monotonic() < deadline, text[-2000:]
        await asyncio.sleep(0.02)
    assert "RuntimeError: deliberate bug" in text  # with its traceback


# ---- the outgoing queue --------------------------------------------------------


def small_receive_buffer(addr_info) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_replies_do_not_count_toward_the_outgoing_queue_bound(stack):
    # A 1 KiB bound on queued events, and a client that pipelines 600 calls
    # with ~1.2 KiB replies through a 4 KiB receive window without reading:
    # ~700 KiB of replies wait in the server's queue, and every one of them
    # is still delivered.
    proc = await ServerProcess(stack, OUTGOING_QUEUE_MAX_BYTES="1024", MAX_IN_FLIGHT="1000",
                               test_methods=True).start()
    try:
        async with await proc.connect() as c:
            s = await register(c)
            await c.call("users.update", {"name": "\U0001F600" * 255})
        calls = 600
        async with raw_socket(
            proc,
            headers={"Authorization": f"Bearer {s['access_token']}"},
            connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer),
        ) as ws:
            for i in range(calls):
                await ws.send_bytes(encode({"id": i, "method": "users.me"}))
            # A slow reader: every call is answered before the client reads
            # any reply (a bounded poll of the server's own view).
            async with raw_socket(proc) as probe:
                deadline = time.monotonic() + 20
                while True:
                    state = await socket_state(probe, s["user"]["id"])
                    if state["replies"] >= calls:
                        break
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.01)
            replies = [await next_frame(ws) for _ in range(calls)]
            assert sorted(r["id"] for r in replies) == list(range(calls))
            assert all(len(r["result"]["name"]) == 255 for r in replies)
            assert sum(len(encode(r)) for r in replies) > 600 * 1024
            await still_answers_as_user(ws)
    finally:
        await proc.stop()


async def still_answers_as_user(ws: aiohttp.ClientWebSocketResponse) -> None:
    assert "result" in await ask(ws, {"id": 99999, "method": "users.me"})


async def socket_state(ws: aiohttp.ClientWebSocketResponse, user_id: str) -> dict:
    """The server's view of the user's sockets, taken together."""
    states = [x for x in (await ask(ws, {"id": 1, "method": "test.sockets"}))["result"]["sockets"]
              if x["user_id"] == user_id]
    return {"replies": sum(x["replies"] for x in states),
            "reading_paused": any(x["reading_paused"] for x in states),
            "calls_in_flight": sum(x["calls_in_flight"] for x in states),
            "queued_replies": max(x["queued_replies"] for x in states)}


async def test_a_socket_that_sends_without_reading_is_not_read_past_the_in_flight_limit(server_with_test_methods):
    """Replies are never dropped, so they must be bounded: once the replies
    queued for a socket reach the in-flight limit (32), the server stops
    reading its frames until the peer takes some (TCP pushes back on the
    client). Before, a client that kept sending but never read made the
    server queue replies, and grow, without bound."""
    server = server_with_test_methods
    room = await open_room(server)
    booker = room.booker
    conv = room.conversation_id
    for i in range(20):
        await booker.client.call("chat.send", {"conversation_id": conv, "content": f"{i:04d}" + "x" * 3996})
    deadline = time.monotonic() + 10
    while len((await booker.client.call("chat.history", {"conversation_id": conv, "limit": 20}))["messages"]) < 20:
        assert time.monotonic() < deadline, "the replica never replayed the messages"
        await asyncio.sleep(0.02)

    def history(req_id: int) -> tuple[int, bytes]:  # each reply about 80 KB: a few fill the kernel's buffer
        return 0x2, encode({"id": req_id, "method": "chat.history", "params": {"conversation_id": conv, "limit": 20}})

    raw = await RawSocket.connect(server, booker.access_token, rcvbuf=4096)
    sent = 0
    try:
        async with raw_socket(server) as probe:
            while True:
                assert sent < 300, "the server kept reading a socket whose replies piled up"
                await raw.send_frames([history(sent + i + 1) for i in range(10)])
                sent += 10
                deadline = time.monotonic() + 10
                while True:  # until those calls are done, or the server stopped reading (bounded poll)
                    state = await socket_state(probe, booker.user_id)
                    if state["reading_paused"] or state["calls_in_flight"] == 0:
                        break
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.01)
                if state["reading_paused"]:
                    break
            assert state["queued_replies"] <= 2 * 32 + 1, state
            # More frames now wait in the kernel; once the client reads, every
            # call is answered, none refused, none lost.
            await raw.send_frames([history(sent + i + 1) for i in range(10)])
            sent += 10
            answered = {}
            while len(answered) < sent:
                opcode, data = await raw.frame()
                frame = decode(data)
                if opcode == 0x2 and "id" in frame:
                    answered[frame["id"]] = frame
            assert sorted(answered) == list(range(1, sent + 1))
            assert [f.get("error") for f in answered.values() if "error" in f] == []
            assert all(len(f["result"]["messages"]) == 20 for f in answered.values())
    finally:
        raw.close()
        await room.close()


async def test_a_client_that_sends_a_burst_and_hangs_up_leaves_nothing_behind(server):
    """A burst of calls (past the in-flight limit, so that replies pile up
    and reading pauses), then the client is gone: the server's side of the
    socket still ends, and leaves every channel."""
    async with await server.connect() as c:
        s = await register(c)
    before = (await ops_status(server))["sockets"]
    for _ in range(3):
        raw = await RawSocket.connect(server, s["access_token"], rcvbuf=4096)
        frames = [(0x2, encode({"id": i, "method": "users.me"})) for i in range(200)]
        await raw.send_frames(frames)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # a reset: nothing more is read or written
    deadline = time.monotonic() + 15
    while (await ops_status(server))["sockets"] > before:
        assert time.monotonic() < deadline, "a socket of a client that hung up never ended"
        await asyncio.sleep(0.05)
