"""Generated garbage never breaks a socket or the process.

Hypothesis sends random bytes, random MessagePack values, and request-shaped
maps whose id, method and params are of every type, including every real
method with params of the wrong types, on an authenticated socket. After
each frame the same socket must still answer a valid request, no reply may
be ``internal``, and the process must still run. A socket closes on its 10th
bad frame (by contract), so the prober reconnects after the 9th.
"""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode, encode
from protocol.models import METHODS
from tests.conftest import PASSWORD, ServerProcess, register

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # the same run every time: a failure here is reproducible as is
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROBE_IDS = itertools.count(0xFEED_0000_0000_0000)


class Prober:
    """One authenticated raw socket, replaced before it could reach its 10th
    bad frame, or once a fuzzed auth.* call has unbound it."""

    def __init__(self, server: ServerProcess, session: dict) -> None:
        self.server = server
        self.email = session["user"]["email"]
        self.token = session["access_token"]
        self.logged_out = False
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.bad_frames = 0
        self.frames_sent = 0

    async def connect(self) -> None:
        await self.close()
        if self.logged_out:  # a fuzzed auth.logout ended the token's session
            async with await self.server.connect() as c:
                self.token = (await c.call("auth.login", {"email": self.email, "password": PASSWORD}))["access_token"]
            self.logged_out = False
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(
            self.server.url, headers={"Authorization": f"Bearer {self.token}"}, max_msg_size=0
        )
        self.bad_frames = 0

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()

    async def send_then_probe(self, data: bytes) -> None:
        if self.ws is None or self.bad_frames >= 9:
            await self.connect()
        assert self.ws is not None
        await self.ws.send_bytes(data)
        self.frames_sent += 1
        probe_id = next(PROBE_IDS)
        await self.ws.send_bytes(encode({"id": probe_id, "method": "users.me"}))
        while True:
            msg = await self.ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.BINARY, f"socket ended after {data!r}: {msg}"
            frame = decode(msg.data)
            error = frame.get("error") or {}
            assert error.get("code") != "internal", f"{data!r} -> {frame}"
            if error.get("code") == "bad_frame":
                self.bad_frames += 1
            if frame.get("id") == probe_id:
                # users.me answers either way: the fuzzed frame may have been an
                # auth.* call that logged the socket out or bound someone else.
                assert "result" in frame or error.get("code") in ("unauthenticated", "token_expired"), frame
                if "result" not in frame:
                    self.bad_frames = 9  # authenticated again (at the upgrade) before the next frame
                    self.logged_out = True
                return


@pytest.fixture(scope="module")
async def prober(server):
    async with await server.connect() as c:
        session = await register(c, name="Fuzz Target")
    p = Prober(server, session)
    yield p
    await p.close()
    # The process survived everything, and serves new sockets.
    assert server.proc.poll() is None
    async with await server.connect() as c:
        await register(c)


# ---- strategies ----------------------------------------------------------------

uint64 = st.integers(min_value=0, max_value=2**64 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    int64,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=12), int64), children, max_size=4),
    ),
    max_leaves=12,
)
method_names = sorted(METHODS) + ["auth.logout"]  # logout changes the socket: the prober copes


def params_for(method: str) -> st.SearchStrategy[dict]:
    """Maps of the method's own field names with values of any type (mostly wrong)."""
    model = METHODS[method].params if method in METHODS else None
    fields = sorted(f.alias or n for n, f in model.model_fields.items()) if model is not None else []
    fields = fields or ["unknown"]
    return st.dictionaries(st.sampled_from(fields), values, max_size=len(fields))


# Well framed: a usable id and a real method, params of every type; these
# reach each method's validation (and past it, its handler).
calls = st.sampled_from(method_names).flatmap(
    lambda method: st.fixed_dictionaries({"id": uint64, "method": st.just(method), "params": params_for(method)})
)
# Anything request-shaped: every key may be missing or of any type.
requests = st.sampled_from(method_names).flatmap(
    lambda method: st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(uint64, values),
            "method": st.one_of(st.just(method), st.just(method), values),
            "params": st.one_of(params_for(method), params_for(method), values),
        },
    )
)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True, datetime=False)


# ---- the properties -------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=300))
async def test_random_bytes_never_break_the_socket(prober, data):
    await prober.send_then_probe(data)


@SETTINGS
@given(value=values)
async def test_any_messagepack_value_never_breaks_the_socket(prober, value):
    await prober.send_then_probe(pack(value))


@SETTINGS
@given(request=requests)
async def test_request_shaped_maps_with_keys_of_every_type_never_break_the_socket(prober, request):
    await prober.send_then_probe(pack(request))


@settings(SETTINGS, max_examples=300)
@given(call=calls)
async def test_calls_of_every_method_with_params_of_every_type_never_fail_internally(prober, call):
    await prober.send_then_probe(pack(call))


@SETTINGS
@given(request=requests, cut=st.integers(min_value=1, max_value=8), junk=st.binary(min_size=1, max_size=8))
async def test_truncated_or_padded_requests_never_break_the_socket(prober, request, cut, junk):
    data = pack(request)
    await prober.send_then_probe(data[:-cut] if len(data) > cut else data + junk)
    await prober.send_then_probe(data + junk)
