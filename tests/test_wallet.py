"""wallet.topup and wallet.transactions against the real stack."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest

from protocol.errors import RpcError
from server.db.wallet import BALANCE_MAX
from tests.booking_support import balance, book, host, key, slot
from tests.conftest import register, verified_user


async def refused(coro) -> RpcError:
    with pytest.raises(RpcError) as info:
        await coro
    return info.value


async def test_topup_credits_at_once_and_pushes_wallet_updated_to_every_device(server, server2, db):
    async with await server.connect() as c:
        session = await register(c)
        other_device = await server2.connect(access_token=session["access_token"])
        result = await c.call("wallet.topup", {"amount": "25.50", "idempotency_key": key()})
        assert result["balance"] == "25.50"
        assert result["replayed"] is False
        t = result["transaction"]
        assert (t["amount"], t["type"]) == ("25.50", "topup")
        topup_id = await db.fetchval("SELECT id FROM topups WHERE user_id = $1", uuid.UUID(session["user"]["id"]))
        assert t["reference_id"] == str(topup_id)
        for client in (c, other_device):
            assert (await client.next_event("wallet.updated"))["balance"] == "25.50"
        # Read-your-writes on the other process, through a replica if it has caught up.
        assert (await other_device.call("users.me"))["balance"] == "25.50"
        assert [x["id"] for x in (await other_device.call("wallet.transactions"))["transactions"]] == [t["id"]]
        await other_device.close()


async def test_integer_amount_is_accepted(server):
    async with await server.connect() as c:
        await register(c)
        assert (await c.call("wallet.topup", {"amount": 10000, "idempotency_key": key()}))["balance"] == "10000.00"


async def test_replay_returns_the_original_transaction_and_moves_no_money(server, server2, db):
    async with await server.connect() as c:
        session = await register(c)
        k = key()
        first = await c.call("wallet.topup", {"amount": "40.00", "idempotency_key": k})
        await c.call("wallet.topup", {"amount": "2.00", "idempotency_key": key()})
        elsewhere = await server2.connect(access_token=session["access_token"])
        again = await elsewhere.call("wallet.topup", {"amount": "40", "idempotency_key": k})
        assert again["replayed"] is True
        assert again["transaction"] == first["transaction"]
        assert again["balance"] == "42.00"  # the current balance, not the one at the time
        assert await balance(db, session["user"]["id"]) == Decimal("42.00")
        await elsewhere.close()


async def test_same_key_with_another_amount_or_from_another_user_is_a_conflict(server, server2):
    async with await server.connect() as a, await server2.connect() as b:
        await register(a)
        await register(b)
        k = key()
        await a.call("wallet.topup", {"amount": "10.00", "idempotency_key": k})
        err = await refused(a.call("wallet.topup", {"amount": "10.01", "idempotency_key": k}))
        assert err.code.value == "idempotency_conflict"
        err = await refused(b.call("wallet.topup", {"amount": "10.00", "idempotency_key": k}))
        assert err.code.value == "idempotency_conflict"
        assert (await b.call("users.me"))["balance"] == "0.00"


async def test_a_topup_past_the_balance_limit_is_invalid_params_and_stores_nothing(server, db):
    """users.balance is DECIMAL(12,2): a wallet holds at most BALANCE_MAX. A
    top-up that would pass it names ``amount``, moves nothing and does not
    keep its key: the same key works once there is room."""
    async with await server.connect() as c:
        user_id = uuid.UUID((await register(c))["user"]["id"])
        await db.execute("UPDATE users SET balance = $2 WHERE id = $1", user_id, BALANCE_MAX - Decimal("5.00"))
        k = key()
        err = await refused(c.call("wallet.topup", {"amount": "5.01", "idempotency_key": k}))
        assert err.code.value == "invalid_params"
        assert [e["field"] for e in err.data["errors"]] == ["amount"]
        assert await balance(db, str(user_id)) == BALANCE_MAX - Decimal("5.00")
        assert await db.fetchval("SELECT count(*) FROM topups WHERE idempotency_key = $1", k) == 0
        assert await db.fetchval("SELECT count(*) FROM transactions WHERE user_id = $1", user_id) == 0
        # Up to the limit exactly is fine.
        full = await c.call("wallet.topup", {"amount": "5.00", "idempotency_key": key()})
        assert Decimal(full["balance"]) == BALANCE_MAX
        # With room again, the refused key is a new top-up, not a replay.
        await db.execute("UPDATE users SET balance = 0 WHERE id = $1", user_id)
        again = await c.call("wallet.topup", {"amount": "5.01", "idempotency_key": k})
        assert (again["balance"], again["replayed"]) == ("5.01", False)


async def test_concurrent_topups_with_one_key_credit_once(server, server2, db):
    async with await server.connect() as c:
        session = await register(c)
        elsewhere = await server2.connect(access_token=session["access_token"])
        k = key()
        results = await asyncio.gather(
            *((c if i % 2 else elsewhere).call("wallet.topup", {"amount": "7.00", "idempotency_key": k}) for i in range(20))
        )
        assert sorted(r["replayed"] for r in results) == [False] + [True] * 19
        assert len({r["transaction"]["id"] for r in results}) == 1
        assert await balance(db, session["user"]["id"]) == Decimal("7.00")
        await elsewhere.close()


@pytest.mark.parametrize(
    "amount",
    ["0", "0.00", "-5.00", "10000.01", "1.001", "abc", "NaN", "Infinity", 0, -1, 10001, 1.5, 10.0, True, None, [], ""],
)
async def test_amount_rules_and_floats_are_refused(server, amount):
    async with await server.connect() as c:
        await register(c)
        err = await refused(c.call("wallet.topup", {"amount": amount, "idempotency_key": key()}))
        assert err.code.value == "invalid_params"
        assert [e["field"] for e in err.data["errors"]] == ["amount"]
        assert (await c.call("users.me"))["balance"] == "0.00"


async def test_key_length_rules(server):
    async with await server.connect() as c:
        await register(c)
        for k in ("", "k" * 256, 5, None):
            err = await refused(c.call("wallet.topup", {"amount": "1.00", "idempotency_key": k}))
            assert [e["field"] for e in err.data["errors"]] == ["idempotency_key"], k
        longest = (key() * 8)[:255]
        assert (await c.call("wallet.topup", {"amount": "1.00", "idempotency_key": longest}))["replayed"] is False


async def test_topup_needs_an_authenticated_socket(server):
    async with await server.connect() as c:
        err = await refused(c.call("wallet.topup", {"amount": "1.00", "idempotency_key": key()}))
        assert err.code.value == "unauthenticated"


async def test_transactions_are_signed_newest_first_in_keyset_pages(server):
    host_client, host_id = await host(server, price="15.00")
    client, _ = await verified_user(server)
    for amount in ("100.00", "20.00", "3.00"):
        await client.call("wallet.topup", {"amount": amount, "idempotency_key": key()})
    b = await book(client, host_id, slot(days=2), hours=2)
    await client.call("bookings.cancel", {"booking_id": b["id"]})

    everything = (await client.call("wallet.transactions", {"limit": 100}))["transactions"]
    assert [(t["type"], t["amount"]) for t in everything] == [
        ("booking_refund", "30.00"), ("booking_payment", "-30.00"),
        ("topup", "3.00"), ("topup", "20.00"), ("topup", "100.00"),
    ]
    assert {t["reference_id"] for t in everything[:2]} == {b["id"]}
    keys = [(t["created_at"], t["id"]) for t in everything]
    assert keys == sorted(keys, reverse=True)

    pages, cursor = [], None
    while True:
        page = await client.call("wallet.transactions", {"limit": 2, **({"cursor": cursor} if cursor else {})})
        pages.append([t["id"] for t in page["transactions"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [[t["id"] for t in everything[i : i + 2]] for i in range(0, 5, 2)]
    assert (await client.call("wallet.transactions", {}))["next_cursor"] is None  # default limit 20
    await client.close()
    await host_client.close()


async def test_transactions_without_a_limit_come_twenty_to_a_page(server):
    async with await server.connect() as c:
        await register(c)
        for i in range(25):
            await c.call("wallet.topup", {"amount": f"{i + 1}.00", "idempotency_key": key()})
        newest_first = [f"{i}.00" for i in range(25, 0, -1)]

        first = await c.call("wallet.transactions")
        assert [t["amount"] for t in first["transactions"]] == newest_first[:20]
        assert first["next_cursor"] is not None
        rest = await c.call("wallet.transactions", {"cursor": first["next_cursor"]})
        assert [t["amount"] for t in rest["transactions"]] == newest_first[20:]
        assert rest["next_cursor"] is None


async def test_transactions_params_are_validated(server):
    async with await server.connect() as c:
        await register(c)
        for params in ({"limit": 0}, {"limit": 101}, {"limit": 2.0}, {"cursor": "%%%"}, {"cursor": "WyJ4Il0"}, {"cursor": 7}):
            err = await refused(c.call("wallet.transactions", params))
            assert err.code.value == "invalid_params", params
            assert [e["field"] for e in err.data["errors"]] == [next(iter(params))], params
        assert (await c.call("wallet.transactions", {"limit": 1}))["transactions"] == []
