"""hosts.search and hosts.availability against the real stack, and the
EXPLAIN proof that the search walks its indexes at scale."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid

import msgpack
import pytest

from loadtests import explain_search
from protocol.errors import RpcError
from tests.booking_support import book, booker, host, key, slot
from tests.conftest import post_kyc, register, replica_caught_up, verified_user

H = dt.timedelta(hours=1)


async def refused(coro) -> RpcError:
    with pytest.raises(RpcError) as info:
        await coro
    return info.value


def gender() -> str:
    """A gender no other test uses, to scope searches in the shared database."""
    return "g" + uuid.uuid4().hex[:12]


def ids(hosts: list[dict]) -> list[str]:
    return [h["id"] for h in hosts]


async def test_search_filters_orders_by_price_then_id_and_pages(server, server2, db, replica_db):
    g = gender()
    prices = ["10.00", "20.00", "20.00", "30.00", "40.00"]
    hosts = await asyncio.gather(*(host(server if i % 2 else server2, price=p, gender=g) for i, p in enumerate(prices)))
    me, me_id = await host(server, price="20.00", gender=g)  # never in my own results
    no_price, _ = await host(server, price=None, gender=g)
    unverified, unverified_id = await host(server, price="15.00", gender=g)
    assert (await post_kyc(server, unverified_id, "rejected")).status == 200
    other_gender, _ = await host(server, price="20.00", gender=gender())
    await replica_caught_up(db, replica_db)  # the searches read other users' writes

    listed = sorted(((p, uid) for (_, uid), p in zip(hosts, prices)), key=lambda x: (float(x[0]), x[1]))
    expected = [uid for _, uid in listed]
    found = (await me.call("hosts.search", {"gender": g}))["hosts"]
    assert ids(found) == expected
    assert [h["price_per_hour"] for h in found] == sorted(prices, key=float)
    assert set(found[0]) == {"id", "name", "gender", "kyc_status", "price_per_hour", "created_at"}  # public only

    # Price bounds are inclusive; money may be given as an integer.
    bounded = (await me.call("hosts.search", {"gender": g, "min_price": "20.00", "max_price": 30}))["hosts"]
    assert ids(bounded) == [uid for p, uid in listed if 20 <= float(p) <= 30]
    assert (await me.call("hosts.search", {"gender": g, "min_price": "40.01"}))["hosts"] == []

    # Keyset pages cover the list exactly once, in order.
    pages, cursor = [], None
    while True:
        page = await me.call("hosts.search", {"gender": g, "limit": 2, **({"cursor": cursor} if cursor else {})})
        pages.append(ids(page["hosts"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [expected[0:2], expected[2:4], expected[4:5]]

    # Another searcher sees me too.
    seen_by_other = (await hosts[0][0].call("hosts.search", {"gender": g, "min_price": 20, "max_price": 20}))["hosts"]
    assert me_id in ids(seen_by_other)
    for c in [c for c, _ in hosts] + [me, no_price, unverified, other_gender]:
        await c.close()


async def test_search_gives_twenty_hosts_a_page_by_default(server, db, replica_db):
    g = gender()
    hosts = await asyncio.gather(*(host(server, price="10.00", gender=g) for _ in range(21)))
    me, _ = await booker(server, balance=None)
    await replica_caught_up(db, replica_db)
    first = await me.call("hosts.search", {"gender": g})
    assert len(first["hosts"]) == 20 and first["next_cursor"] is not None
    rest = await me.call("hosts.search", {"gender": g, "cursor": first["next_cursor"]})
    assert len(rest["hosts"]) == 1 and rest["next_cursor"] is None
    assert sorted(ids(first["hosts"] + rest["hosts"])) == sorted(uid for _, uid in hosts)
    for c in [c for c, _ in hosts] + [me]:
        await c.close()


async def test_search_with_a_range_returns_only_hosts_free_for_all_of_it(server, server2, db, replica_db):
    g = gender()
    (a, a_id), (b, b_id), (c, c_id) = await asyncio.gather(
        host(server, price="10.00", gender=g), host(server2, price="20.00", gender=g), host(server, price="30.00", gender=g)
    )
    elsewhere_client, elsewhere = await host(server2, price="5.00", gender=gender())
    customer, _ = await booker(server)
    await b.call("wallet.topup", {"amount": "100.00", "idempotency_key": key()})
    ten = slot(days=9)
    booking_of_a = await book(customer, a_id, ten, hours=2)  # a hosts 10-12
    await book(b, elsewhere, ten + H)  # b is a booker 11-12
    await replica_caught_up(db, replica_db)

    async def free(start, end) -> list[str]:
        return ids((await customer.call("hosts.search", {"gender": g, "start_at": start, "end_at": end}))["hosts"])

    assert await free(ten + H, ten + 2 * H) == [c_id]
    assert await free(ten - H, ten + H) == [b_id, c_id]  # overlaps a's booking by one hour
    assert await free(ten + 2 * H, ten + 3 * H) == [a_id, b_id, c_id]  # back-to-back is free
    assert await free(ten - H, ten) == [a_id, b_id, c_id]
    # A range is any two times with end after start, as RFC 3339 strings too.
    assert await free((ten + 30 * dt.timedelta(minutes=1)).isoformat(), (ten + H).isoformat()) == [b_id, c_id]
    await customer.call("bookings.cancel", {"booking_id": booking_of_a["id"]})  # the customer's own write
    assert await free(ten + H, ten + 2 * H) == [a_id, c_id]
    for client in (a, b, c, elsewhere_client, customer):
        await client.close()


async def test_search_params_are_validated(server):
    async with await server.connect() as me:
        await register(me)
        start = slot(days=1)
        for params, field in (
            ({"start_at": start}, "end_at"),
            ({"end_at": start}, "start_at"),
            ({"start_at": start, "end_at": start}, "end_at"),
            ({"start_at": start, "end_at": start - H}, "end_at"),
            ({"start_at": start.replace(tzinfo=None).isoformat(), "end_at": start + H}, "start_at"),
            ({"limit": 0}, "limit"),
            ({"limit": 101}, "limit"),
            ({"min_price": 10.5}, "min_price"),
            ({"max_price": "1.234"}, "max_price"),
            ({"min_price": "0"}, "min_price"),  # money inputs are > 0
            ({"max_price": -5}, "max_price"),
            ({"gender": ""}, "gender"),
            ({"cursor": "not a cursor"}, "cursor"),
            ({"cursor": "WyIxMC4wMCJd"}, "cursor"),  # a list of the wrong length
        ):
            err = await refused(me.call("hosts.search", params))
            assert err.code.value == "invalid_params", params
            assert [e["field"] for e in err.data["errors"]] == [field], params
        assert (await me.call("hosts.search", {"limit": 100, "gender": gender()})) == {"hosts": [], "next_cursor": None}


async def test_search_needs_authentication(server):
    async with await server.connect() as c:
        assert (await refused(c.call("hosts.search", {}))).code.value == "unauthenticated"


async def test_availability_lists_active_bookings_as_host_or_booker_in_order(server, server2, db, replica_db):
    (h, h_id), (other_client, other) = await asyncio.gather(host(server, price="10.00"), host(server2, price="10.00"))
    customer, _ = await booker(server2)
    await h.call("wallet.topup", {"amount": "100.00", "idempotency_key": key()})
    day = slot(days=12)
    late = await book(customer, h_id, day + 5 * H, hours=2)
    early = await book(customer, h_id, day + H)
    await book(h, other, day + 3 * H)  # busy as a booker too
    gone = await book(customer, h_id, day + 8 * H)
    await customer.call("bookings.cancel", {"booking_id": gone["id"]})
    await replica_caught_up(db, replica_db)  # h's own booking is another user's write

    async def busy(frm, to) -> list[tuple]:
        result = await customer.call("hosts.availability", {"host_id": h_id, "from": frm, "to": to})
        return [(x["start_at"], x["end_at"]) for x in result["busy"]]

    assert await busy(day, day + 24 * H) == [
        (early["start_at"], early["end_at"]), (day + 3 * H, day + 4 * H), (late["start_at"], late["end_at"])
    ]
    # Overlap is half-open: a booking ending at `from` is not listed, one ending after it is.
    assert await busy(day + 2 * H, day + 5 * H) == [(day + 3 * H, day + 4 * H)]
    assert await busy(day + 6 * H, day + 7 * H) == [(late["start_at"], late["end_at"])]
    assert await busy(day + 9 * H, day + 10 * H) == []
    for client in (h, other_client, customer):
        await client.close()


async def test_availability_rules(server):
    client, session = await verified_user(server)
    me = session["user"]["id"]
    start = slot(days=1)
    assert (await client.call("hosts.availability", {"host_id": me, "from": start, "to": start + 31 * 24 * H})) == {"busy": []}
    for params, field in (
        ({"host_id": me, "from": start, "to": start + 31 * 24 * H + dt.timedelta(seconds=1)}, "to"),
        ({"host_id": me, "from": start, "to": start}, "to"),
        ({"host_id": me, "to": start}, "from"),
        ({"host_id": "nope", "from": start, "to": start + H}, "host_id"),
    ):
        err = await refused(client.call("hosts.availability", params))
        assert err.code.value == "invalid_params", params
        assert [e["field"] for e in err.data["errors"]] == [field], params
    err = await refused(client.call("hosts.availability", {"host_id": str(uuid.uuid4()), "from": start, "to": start + H}))
    assert err.code.value == "not_found"
    await client.close()


@pytest.mark.skipif(os.environ.get("SKIP_EXPLAIN") == "1", reason="SKIP_EXPLAIN=1")
async def test_search_uses_the_bookable_index_and_the_busy_gist_index_at_scale(stack):
    """100,000 users and 200,000 bookings in a scratch database: every form
    of the search (no range, range, price bounds, gender, keyset page),
    planned for its actual parameters and as a generic prepared plan, walks
    idx_users_bookable_price_id and probes booking_busy's GiST index,
    and never scans either table."""
    report = await explain_search.run(stack.direct_database_url, users=100_000, bookings=200_000)
    for case in report:
        assert not case.problems, f"{case.name}:\n{case.plan}"


async def test_range_bounds_below_the_microsecond_are_read_rounded_down(server, db, replica_db):
    """A Timestamp keeps nanoseconds that a datetime cannot; a search or an
    availability range is read to the microsecond, rounded down."""
    g = gender()
    (h, h_id), (customer, _) = await asyncio.gather(host(server, price="10.00", gender=g), booker(server))
    day = slot(days=14)
    await book(customer, h_id, day + H)  # busy 01:00-02:00
    await replica_caught_up(db, replica_db)  # the host's price is another user's write

    def ts(when: dt.datetime, nanoseconds: int) -> msgpack.Timestamp:
        return msgpack.Timestamp(int(when.timestamp()), nanoseconds)

    async def busy(frm, to) -> list:
        result = await customer.call("hosts.availability", {"host_id": h_id, "from": frm, "to": to})
        return [(x["start_at"], x["end_at"]) for x in result["busy"]]

    assert await busy(ts(day, 999), ts(day + 3 * H, 1)) == [(day + H, day + 2 * H)]
    assert await busy(ts(day + 2 * H, 999), ts(day + 3 * H, 999)) == []  # read as from 02:00
    assert await busy(ts(day, 999), ts(day + H, 999)) == []  # read as to 01:00
    found = await customer.call("hosts.search", {"gender": g, "start_at": ts(day + 2 * H, 1), "end_at": ts(day + 3 * H, 1)})
    assert [x["id"] for x in found["hosts"]] == [h_id]
    for client in (h, customer):
        await client.close()
