"""invalid_params names every failing field at once: the rules that span
fields (a search range given by half, a cursor that does not decode) are
reported together with the field errors, not one call later."""

from __future__ import annotations

import pytest

from protocol.errors import RpcError
from tests.conftest import register

PAGED = ["hosts.search", "wallet.transactions", "bookings.list", "chat.conversations"]


async def invalid_fields(client, method: str, params: dict) -> set[str]:
    with pytest.raises(RpcError) as info:
        await client.call(method, params)
    assert info.value.code.value == "invalid_params"
    return {e["field"] for e in info.value.data["errors"]}


@pytest.mark.parametrize("method", PAGED)
async def test_a_bad_cursor_is_named_with_the_other_bad_fields(server, method):
    async with await server.connect() as c:
        await register(c)
        assert await invalid_fields(c, method, {"cursor": "not-a-cursor", "limit": 0}) == {"cursor", "limit"}
        assert await invalid_fields(c, method, {"cursor": "not-a-cursor"}) == {"cursor"}
        # A cursor of another list does not decode as one of this list either.
        other = "WyIxMC4wMCIsIm5vdC1hbi1pZCJd"  # ["10.00","not-an-id"]
        assert await invalid_fields(c, method, {"cursor": other}) == {"cursor"}


async def test_a_search_range_given_by_half_is_named_with_the_other_bad_fields(server):
    async with await server.connect() as c:
        await register(c)
        start = "2030-01-01T10:00:00+00:00"
        assert await invalid_fields(c, "hosts.search", {"start_at": start, "limit": 0}) == {"end_at", "limit"}
        assert await invalid_fields(c, "hosts.search", {"end_at": start, "min_price": "-1"}) == {"start_at", "min_price"}
        assert await invalid_fields(c, "hosts.search", {"start_at": start}) == {"end_at"}
