"""users.me, users.update and users.get."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from protocol.client import Client
from protocol.errors import ErrorCode, RpcError
from tests.booking_support import book, booker, slot
from tests.conftest import (
    get_when_replicated,
    post_kyc,
    register,
    replica_caught_up,
    until_replica_has_replayed,
    verified_user,
)

PUBLIC_FIELDS = {"id", "name", "gender", "kyc_status", "price_per_hour", "created_at"}
OWN_FIELDS = PUBLIC_FIELDS | {"email", "balance", "event_seq"}


async def error_of(client: Client, method: str, params: dict | None = None) -> dict:
    reply = await client.call_raw(method, params)
    assert "error" in reply, reply
    return reply["error"]


async def test_me_returns_the_own_user_with_email_and_balance(server):
    async with await server.connect() as c:
        s = await register(c, name="Cleo", gender="nonbinary")
        me = await c.call("users.me")
        assert set(me) == OWN_FIELDS
        assert me == s["user"]
        assert me["name"] == "Cleo" and me["gender"] == "nonbinary"
        assert me["balance"] == "0.00"
        assert me["price_per_hour"] is None
        assert isinstance(me["created_at"], dt.datetime) and me["created_at"].tzinfo is not None
        assert uuid.UUID(me["id"]).hex == me["id"].replace("-", "") and me["id"] == me["id"].lower()


async def test_update_changes_name_and_gender_and_returns_the_own_user(server):
    async with await server.connect() as c:
        await register(c)
        updated = await c.call("users.update", {"name": "New Name", "gender": "male"})
        assert set(updated) == OWN_FIELDS
        assert (updated["name"], updated["gender"]) == ("New Name", "male")
        assert await c.call("users.me") == updated


async def test_update_with_nothing_returns_the_user_unchanged(server):
    async with await server.connect() as c:
        s = await register(c)
        assert await c.call("users.update", {}) == s["user"]
        assert await c.call("users.update") == s["user"]  # params omitted
        assert await c.call("users.update", {"unknown_key": 1}) == s["user"]  # unknown keys are ignored


async def test_setting_a_price_needs_verified_kyc(server):
    async with await server.connect() as c:
        s = await register(c)
        err = await error_of(c, "users.update", {"price_per_hour": "50.00"})
        assert err["code"] == "kyc_required"
        # Not even half-applied alongside another change.
        err = await error_of(c, "users.update", {"name": "Renamed", "price_per_hour": "50.00"})
        assert err["code"] == "kyc_required"
        assert (await c.call("users.me"))["name"] == s["user"]["name"]
        assert (await post_kyc(server, s["user"]["id"], "rejected")).status == 200
        assert (await error_of(c, "users.update", {"price_per_hour": "50.00"}))["code"] == "kyc_required"


async def test_a_null_price_is_allowed_to_anyone(server):
    async with await server.connect() as c:
        await register(c)
        assert (await c.call("users.update", {"price_per_hour": None}))["price_per_hour"] is None


async def test_a_verified_user_sets_and_clears_a_price(server):
    c, _ = await verified_user(server)
    async with c:
        assert (await c.call("users.update", {"price_per_hour": "25.5"}))["price_per_hour"] == "25.50"
        assert (await c.call("users.update", {"price_per_hour": 40}))["price_per_hour"] == "40.00"
        assert (await c.call("users.me"))["price_per_hour"] == "40.00"
        assert (await c.call("users.update", {"price_per_hour": None}))["price_per_hour"] is None


@pytest.mark.parametrize("price, stored", [("1.00", "1.00"), ("10000.00", "10000.00"), (1, "1.00"), (10000, "10000.00"), ("99.9", "99.90")])
async def test_prices_within_1_and_10000_are_accepted(verified_host, price, stored):
    assert (await verified_host.call("users.update", {"price_per_hour": price}))["price_per_hour"] == stored


@pytest.mark.parametrize(
    "price",
    ["0.99", "10000.01", "0", "-5", "1.001", "abc", "", "NaN", "Infinity", 25.0, 0.5, True, [], {}, "1" * 40, 2**64 - 1, -(2**63),
     " 99.99 ", "1e2"],
    ids=repr,
)
async def test_prices_out_of_range_malformed_or_floats_are_invalid_params(verified_host, price):
    err = await error_of(verified_host, "users.update", {"price_per_hour": price})
    assert err["code"] == "invalid_params"
    assert [e["field"] for e in err["data"]["errors"]] == ["price_per_hour"]


@pytest.fixture(scope="module")
async def verified_host(server):
    c, _ = await verified_user(server)
    yield c
    await c.close()


@pytest.mark.parametrize(
    "params, fields",
    [
        ({"name": None}, ["name"]),
        ({"gender": None}, ["gender"]),
        ({"name": ""}, ["name"]),
        ({"name": "n" * 256}, ["name"]),
        ({"gender": "g" * 21}, ["gender"]),
        ({"name": 5, "gender": ["x"], "price_per_hour": 1.5}, ["gender", "name", "price_per_hour"]),
        ({"name": "a\x00b"}, ["name"]),
    ],
    ids=["null-name", "null-gender", "empty-name", "long-name", "long-gender", "all-wrong", "nul-char"],
)
async def test_update_names_every_invalid_field(server, params, fields):
    async with await server.connect() as c:
        s = await register(c)
        err = await error_of(c, "users.update", params)
        assert err["code"] == "invalid_params"
        assert sorted(e["field"] for e in err["data"]["errors"]) == fields
        assert await c.call("users.me") == s["user"]  # nothing changed


async def test_get_returns_only_public_fields_never_email_or_balance(server):
    async with await server.connect() as a, await server.connect() as b:
        host = await register(a, name="Host", gender="female")
        await register(b)
        public = await get_when_replicated(b, host["user"]["id"])
        assert set(public) == PUBLIC_FIELDS
        assert public == {k: v for k, v in host["user"].items() if k in PUBLIC_FIELDS}
        # The same rule when looking at oneself.
        assert set(await a.call("users.get", {"user_id": host["user"]["id"]})) == PUBLIC_FIELDS


async def test_get_of_an_unknown_user_is_not_found(server):
    async with await server.connect() as c:
        await register(c)
        assert (await error_of(c, "users.get", {"user_id": str(uuid.uuid4())}))["code"] == "not_found"


# "+", whitespace and "_" are read by int(s, 16), so uuid.UUID alone would
# take the first three as 02345678-1234-1234-1234-123456789abc.
@pytest.mark.parametrize("user_id", [
    "not-a-uuid", "", 42, None, "1234", str(uuid.uuid4())[:-1],
    "+2345678123412341234123456789abc", " 2345678a-1234-1234-1234-123456789ab",
    "2345678_123412341234123456789abc", "2345678a-1234-1234-1234-123456789abc ",
], ids=repr)
async def test_get_with_an_id_that_is_not_a_uuid_is_invalid_params(server, user_id):
    async with await server.connect() as c:
        await register(c)
        err = await error_of(c, "users.get", {"user_id": user_id})
        assert err["code"] == "invalid_params"
        assert [e["field"] for e in err["data"]["errors"]] == ["user_id"]


async def test_get_without_a_user_id_is_invalid_params(server):
    async with await server.connect() as c:
        await register(c)
        err = await error_of(c, "users.get", {})
        assert err["code"] == "invalid_params"
        assert err["data"]["errors"][0]["field"] == "user_id"


async def test_user_updated_is_exactly_the_users_own_view_after_kyc_and_update(server):
    async with await server.connect() as c:
        s = await register(c)
        assert (await post_kyc(server, s["user"]["id"], "verified")).status == 200
        after_kyc = (await c.next_event("user.updated"))["user"]
        me = await c.call("users.me")
        assert set(after_kyc) == set(me) == OWN_FIELDS  # email and balance included
        assert after_kyc == me

        updated = await c.call("users.update", {"name": "Priced", "price_per_hour": "30.00"})
        after_update = (await c.next_event("user.updated"))["user"]
        me = await c.call("users.me")
        assert set(after_update) == set(me) == OWN_FIELDS
        assert after_update == me == updated


async def test_user_updated_from_users_update_reaches_only_that_users_sockets(server, server2):
    async with (
        await server.connect() as own1,
        await server.connect() as stranger1,
        await server2.connect() as stranger2,
    ):
        s = await register(own1)
        uid = s["user"]["id"]
        await register(stranger1)
        await register(stranger2)
        async with await server2.connect(access_token=s["access_token"]) as own2:
            assert (await own2.call("users.me"))["id"] == uid
            await own1.call("users.update", {"name": "Only Mine"})
            for own in (own1, own2):
                event = await own.next_event("user.updated")
                assert (event["user"]["id"], event["user"]["name"]) == (uid, "Only Mine")
            # "Nothing" without sleeping: each process reads every published
            # event from its one Redis subscriber connection, in order, and
            # hands it to all the sockets it concerns in one go. The user has
            # a socket on both processes and both got the event, so both
            # processes have already dispatched it; had a stranger's socket on
            # either been a recipient, the event would sit in its outgoing
            # queue ahead of the reply to any call the stranger makes now
            # (replies and events share one queue, sent in order).
            for stranger in (stranger1, stranger2):
                await stranger.call("users.me")
                assert [e for e in stranger.drain_events() if e[0] == "user.updated"] == []


@pytest.mark.parametrize("status", ["rejected", "pending"])
async def test_a_host_leaving_verified_keeps_the_price_but_is_not_bookable_until_verified_again(
    server, db, replica_db, status
):
    gender = "g" + uuid.uuid4().hex[:12]  # lets a search find this host alone
    host, hs = await verified_user(server, price="42.00", gender=gender)
    booker_client, _ = await booker(server)
    host_id = hs["user"]["id"]
    async with host, booker_client:
        assert (await host.next_event("user.updated"))["user"]["price_per_hour"] == "42.00"
        await until_replica_has_replayed(server, await replica_caught_up(db, replica_db))
        assert [h["id"] for h in (await booker_client.call("hosts.search", {"gender": gender}))["hosts"]] == [host_id]

        assert (await post_kyc(server, host_id, status)).status == 200
        event = (await host.next_event("user.updated"))["user"]
        assert (event["kyc_status"], event["price_per_hour"]) == (status, "42.00")
        me = await host.call("users.me")
        assert (me["kyc_status"], me["price_per_hour"]) == (status, "42.00")  # the price is kept
        with pytest.raises(RpcError) as refused:
            await book(booker_client, host_id, slot())
        assert refused.value.code is ErrorCode.HOST_NOT_BOOKABLE
        await until_replica_has_replayed(server, await replica_caught_up(db, replica_db))
        assert (await booker_client.call("hosts.search", {"gender": gender}))["hosts"] == []

        # Verified again: bookable at the price kept.
        assert (await post_kyc(server, host_id, "verified")).status == 200
        assert (await host.next_event("user.updated"))["user"]["price_per_hour"] == "42.00"
        assert (await book(booker_client, host_id, slot()))["amount"] == "42.00"
