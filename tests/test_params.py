"""invalid_params names every failing field at once: the rules that span
fields (a search range given by half, a cursor that does not decode) are
reported together with the field errors, not one call later."""

from __future__ import annotations

import datetime as dt
import uuid

import msgpack
import pytest

from protocol.errors import RpcError
from protocol.models import METHODS
from server import cursors
from server.config import Config, dev_secrets
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


# ---- times and cursors that datetime or PostgreSQL cannot hold ---------------

# A whole hour that UTC cannot hold (datetime's years are 1 to 9999), as an
# RFC 3339 string and as MessagePack Timestamps beyond datetime's range.
BEFORE_YEAR_1 = "0001-01-01T00:00:00+14:00"
AFTER_YEAR_9999 = "9999-12-31T23:00:00-14:00"
UNREADABLE_TIMES = [
    BEFORE_YEAR_1,
    AFTER_YEAR_9999,
    msgpack.Timestamp(2**62, 0),
    msgpack.Timestamp(-(2**62), 0),
    msgpack.Timestamp(-62135596801, 0),  # a second before 0001-01-01T00:00Z
    msgpack.Timestamp(253402300800, 0),  # 10000-01-01T00:00Z
]
# A whole hour that breaks no rule of any of these methods.
SOON = (dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0) + dt.timedelta(days=1)).isoformat()


def time_inputs(bad) -> list[tuple[str, dict, str]]:
    """(method, params, the field holding ``bad``) for every time input."""
    host = str(uuid.uuid4())
    return [
        ("bookings.create", {"host_id": host, "start_at": bad, "end_at": SOON, "idempotency_key": "k"}, "start_at"),
        ("bookings.create", {"host_id": host, "start_at": SOON, "end_at": bad, "idempotency_key": "k"}, "end_at"),
        ("hosts.search", {"start_at": bad, "end_at": SOON}, "start_at"),
        ("hosts.search", {"start_at": SOON, "end_at": bad}, "end_at"),
        ("hosts.availability", {"host_id": host, "from": bad, "to": SOON}, "from"),
        ("hosts.availability", {"host_id": host, "from": SOON, "to": bad}, "to"),
    ]


@pytest.mark.parametrize("bad", UNREADABLE_TIMES, ids=repr)
async def test_a_time_out_of_datetime_range_is_invalid_params_naming_its_field(server, bad):
    async with await server.connect() as c:
        await register(c)
        for method, params, field in time_inputs(bad):
            assert await invalid_fields(c, method, params) == {field}, (method, field)


# Times of the same list's kind, but with a time that UTC cannot hold.
TIME_CURSORS = ["wallet.transactions", "bookings.list", "chat.conversations"]


def signed_cursor(method: str, when: str) -> str:
    """A cursor the test servers would accept for ``method`` without
    filters, holding ``when`` and an id as they are."""
    config = Config(jwt_secret=dev_secrets()["JWT_SECRET"])
    digest = cursors.filters_digest(METHODS[method].params.model_validate({}))
    return cursors.sign(config, method, [digest, when, str(uuid.uuid4())])


@pytest.mark.parametrize("method", TIME_CURSORS)
@pytest.mark.parametrize("when", [BEFORE_YEAR_1, AFTER_YEAR_9999])
async def test_a_cursor_holding_a_time_out_of_range_is_invalid_params(server, method, when):
    # Only the server makes cursors, and never such a one: it is checked anyway.
    async with await server.connect() as c:
        await register(c)
        assert await invalid_fields(c, method, {"cursor": signed_cursor(method, when)}) == {"cursor"}


@pytest.mark.parametrize("method", TIME_CURSORS)
@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00"])
async def test_a_cursor_at_the_ends_of_the_time_range_is_served(server, method, when):
    """What validation lets through, PostgreSQL takes: no internal error
    further down for the first and last instants a datetime holds."""
    async with await server.connect() as c:
        await register(c)
        page = await c.call(method, {"cursor": signed_cursor(method, when)})
        assert page["next_cursor"] is None


async def test_times_at_the_ends_of_the_range_are_served_or_refused_by_rule(server):
    first, last = "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"
    async with await server.connect() as c:
        host = (await register(c))["user"]["id"]
        assert (await c.call("hosts.search", {"start_at": first, "end_at": last}))["hosts"] is not None
        for start, end in [(first, "0001-01-31T00:00:00Z"), ("9999-12-01T00:00:00Z", last)]:
            assert (await c.call("hosts.availability", {"host_id": host, "from": start, "to": end}))["busy"] == []
        # Whole hours at either end are read; the booking rules refuse them.
        params = {"host_id": host, "start_at": first, "end_at": "0001-01-01T01:00:00Z", "idempotency_key": "k"}
        assert await invalid_fields(c, "bookings.create", params) == {"start_at"}
        params = {"host_id": host, "start_at": "9999-12-31T22:00:00Z", "end_at": "9999-12-31T23:00:00Z", "idempotency_key": "k"}
        assert await invalid_fields(c, "bookings.create", params) == {"start_at"}
