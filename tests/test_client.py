"""The Python client's own promises: ``async with Client.connect(...)``
opens and closes a socket, and an ``RpcError`` says which fields failed."""

from __future__ import annotations

import pytest

from protocol.client import Client
from protocol.errors import ErrorCode, RpcError


async def test_connect_is_an_async_context_manager_and_still_awaitable(server):
    async with Client.connect(server.url) as c:
        assert await c.call_raw("users.me") != {}
    assert c.ws.closed and c.closed.is_set()
    plain = await Client.connect(server.url)
    async with plain:
        pass
    assert plain.ws.closed


async def test_an_invalid_params_error_names_every_failing_field(server):
    async with Client.connect(server.url) as c:
        with pytest.raises(RpcError) as raised:
            await c.call("auth.register", {"email": "not an email", "password": "short", "name": "", "gender": "x"})
    err = raised.value
    assert err.code is ErrorCode.INVALID_PARAMS
    assert set(err.fields) == {"email", "password", "name"}
    text = str(err)
    for field, reason in err.fields.items():
        assert f"{field}: {reason}" in text, text


def test_the_text_of_other_errors_is_their_code_and_message():
    assert str(RpcError("not_found")) == "not_found: not found"
    assert str(RpcError("rate_limited", data={"retry_after": 3})) == "rate_limited: too many attempts (retry after 3 s)"
