"""Strict inputs over a real socket: money strings, names and chat content,
and cursors that only work for the page, method and filters they were made for.
Each rule is shown at its boundary: what just passes, and what is refused
as ``invalid_params`` naming its field."""

from __future__ import annotations

import base64
import json
import unicodedata
import uuid

import pytest

from protocol.errors import RpcError
from protocol.models.common import WHITE_SPACE, has_control
from tests.booking_support import book, booker, host, key, slot
from tests.chat_helpers import open_room
from tests.conftest import PASSWORD, ServerProcess, new_email, register, verified_user

# Each refused by the 2nd edition's money rule, though Decimal() would read most.
BAD_MONEY = ["1e2", "１２", "1_0", " 5", "5 ", "5.", ".5", "5\n", "+5", "-5", "5.001", "٥", "0x10", "NaN", "Infinity"]


async def refused_fields(client, method: str, params: dict) -> set[str]:
    with pytest.raises(RpcError) as info:
        await client.call(method, params)
    assert info.value.code.value == "invalid_params", info.value
    return {e["field"] for e in info.value.data["errors"]}


def gender_tag() -> str:
    """A gender no other test uses, to scope searches in the shared database."""
    return "g" + uuid.uuid4().hex[:12]


# ---- money ----------------------------------------------------------------------


async def test_money_strings_other_than_plain_ascii_digits_are_invalid_params(server):
    client, _ = await verified_user(server)
    async with client:
        for amount in BAD_MONEY:
            params = {"amount": amount, "idempotency_key": key()}
            assert await refused_fields(client, "wallet.topup", params) == {"amount"}, repr(amount)
            assert await refused_fields(client, "users.update", {"price_per_hour": amount}) == {"price_per_hour"}
            assert await refused_fields(client, "hosts.search", {"min_price": amount}) == {"min_price"}
        # What the rule allows: digits, with one or two places or none; an integer.
        for amount, credited in [("5", "5.00"), ("5.5", "5.50"), ("0.05", "0.05"), (7, "7.00"), ("0010000.00", "10000.00")]:
            reply = await client.call("wallet.topup", {"amount": amount, "idempotency_key": key()})
            assert reply["transaction"]["amount"] == credited
        me = await client.call("users.update", {"price_per_hour": "12.5"})
        assert me["price_per_hour"] == "12.50"


# ---- names ------------------------------------------------------------------------


def register_params(**fields) -> dict:
    return {"email": new_email(), "password": PASSWORD, "name": "Ann", "gender": "female", **fields}


REFUSED_NAMES = [
    " ", "\u3000\u00a0\n", "a\nb", "a\tb", "\x00", "\x7fx", "x\x85y", "\u202eevil", "\u202ax", "\u2066x\u2069",
    # Python's str.strip() would trim these separators; they are control characters, not White_Space.
    "\x1cBob", "Bob\x1f",
]


@pytest.mark.parametrize("name", REFUSED_NAMES, ids=repr)
async def test_a_blank_name_or_one_holding_control_characters_is_invalid_params(server, name):
    async with await server.connect() as c:
        assert await refused_fields(c, "auth.register", register_params(name=name)) == {"name"}
        assert await refused_fields(c, "auth.register", register_params(gender=name)) == {"gender"}
        await register(c)
        assert await refused_fields(c, "users.update", {"name": name, "gender": name}) == {"name", "gender"}
        assert await refused_fields(c, "hosts.search", {"gender": name}) == {"gender"}


async def test_names_are_trimmed_of_white_space_and_measured_after_trimming(server):
    async with await server.connect() as c:
        # 255 and 20 characters once trimmed: the limits themselves pass.
        name, gender = "n" * 255, "g" * 20
        user = (await c.call("auth.register", register_params(name=f"\u3000 {name}\n\t", gender=f"\u2003{gender} ")))["user"]
        assert (user["name"], user["gender"]) == (name, gender)
        user = await c.call("users.update", {"name": "\u00a0 Zoë Ünal \u2029", "gender": " x "})
        assert (user["name"], user["gender"]) == ("Zoë Ünal", "x")
        # Inside a name, white space stays as it is.
        assert (await c.call("users.update", {"name": "A\u3000B"}))["name"] == "A\u3000B"
        # One more than the limit, even with white space around it, is refused.
        params = {"name": f" {'n' * 256} ", "gender": f" {'g' * 21} "}
        assert await refused_fields(c, "users.update", params) == {"name", "gender"}
        assert await refused_fields(c, "auth.register", register_params(**params)) == {"name", "gender"}


async def test_an_email_holding_control_characters_is_invalid_params(server):
    async with await server.connect() as c:
        for email in ["a\x01b@example.test", "a@exa\u202emple.test", "a@example.test\x7f"]:
            assert await refused_fields(c, "auth.register", register_params(email=email)) == {"email"}


# ---- chat content ------------------------------------------------------------------


async def test_chat_content_may_hold_tab_newline_and_cr_but_no_other_control_character(server):
    room = await open_room(server)
    try:
        sender = room.booker.client
        params = {"conversation_id": room.conversation_id}
        for content in ["a\x00b", "\x01", "bell\x07", "\x1b[31mred", "x\x7f", "x\x85", "\x0b", "\x0c"]:
            assert await refused_fields(sender, "chat.send", {**params, "content": content}) == {"content"}, repr(content)
        # Stored exactly as sent: not trimmed; bidi controls are right-to-left text's own.
        for content in ["line one\r\n\tline two\n", "   ", "\u202eשלום\u202c", "x" * 4000]:
            assert (await sender.call("chat.send", {**params, "content": content}))["message"]["content"] == content
        assert await refused_fields(sender, "chat.send", {**params, "content": "x" * 4001}) == {"content"}
        assert await refused_fields(sender, "chat.send", {**params, "content": ""}) == {"content"}
    finally:
        await room.close()


# ---- cursors ------------------------------------------------------------------------


def tampered(cursor: str, at: int) -> str:
    """``cursor`` with one bit of byte ``at`` flipped (negative: from the end)."""
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[at] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


def unsigned(*values) -> str:
    """A cursor as a client could write one: base64 JSON, no tag."""
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


async def ledger_of_three(client) -> None:
    for amount in ("1.00", "2.00", "3.00"):
        await client.call("wallet.topup", {"amount": amount, "idempotency_key": key()})


async def test_a_cursor_pages_only_for_its_own_method_and_filters(server):
    g = gender_tag()
    hosts = [await host(server, price=price, gender=g) for price in ("10.00", "20.00", "30.00")]
    client, _ = await booker(server, balance=None)
    try:
        await ledger_of_three(client)
        first = await client.call("hosts.search", {"gender": g, "limit": 1})
        cursor = first["next_cursor"]
        # The same filters, however written, and another limit: the next page.
        for same in [{"gender": f" {g}\u3000", "limit": 1}, {"gender": g, "limit": 2, "max_price": None}]:
            page = await client.call("hosts.search", {**same, "cursor": cursor})
            assert page["hosts"][0]["id"] == hosts[1][1]
        bounded = await client.call("hosts.search", {"gender": g, "min_price": "10", "limit": 1})
        page = await client.call("hosts.search", {"gender": g, "min_price": "10.00", "cursor": bounded["next_cursor"]})
        assert [h["id"] for h in page["hosts"]] == [hosts[1][1], hosts[2][1]]
        # Other filters: refused, not a page of some other list.
        for other in [{"gender": gender_tag()}, {}, {"gender": g, "min_price": "10.00"}, {"gender": g, "max_price": 30}]:
            assert await refused_fields(client, "hosts.search", {**other, "cursor": cursor}) == {"cursor"}, other
        # Another method's cursor, even one whose sort key has the same shape.
        ledger = (await client.call("wallet.transactions", {"limit": 1}))["next_cursor"]
        for method in ("bookings.list", "chat.conversations", "hosts.search"):
            assert await refused_fields(client, method, {"cursor": ledger}) == {"cursor"}, method
        assert (await client.call("wallet.transactions", {"cursor": ledger}))["transactions"]
    finally:
        await client.close()
        for c, _ in hosts:
            await c.close()


async def test_bookings_list_cursors_are_bound_to_role_and_status(server):
    h, host_id = await host(server, price="10.00")
    client, _ = await booker(server, balance="100.00")
    try:
        for day in (1, 2, 3):
            await book(client, host_id, slot(days=day))
        cursor = (await client.call("bookings.list", {"role": "booker", "limit": 1}))["next_cursor"]
        assert len((await client.call("bookings.list", {"role": "booker", "cursor": cursor}))["bookings"]) == 2
        for other in [{"role": "host"}, {"role": "any"}, {}, {"role": "booker", "status": "confirmed"}]:
            assert await refused_fields(client, "bookings.list", {**other, "cursor": cursor}) == {"cursor"}, other
    finally:
        await client.close()
        await h.close()


async def test_a_cursor_with_any_byte_changed_is_invalid_params(server):
    async with await server.connect() as c:
        await register(c)
        await ledger_of_three(c)
        cursor = (await c.call("wallet.transactions", {"limit": 1}))["next_cursor"]
        length = len(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        for at in range(length):
            assert await refused_fields(c, "wallet.transactions", {"cursor": tampered(cursor, at)}) == {"cursor"}, at
        for cut in (cursor[:-1], cursor[1:], cursor + "A", cursor + "\n", f" {cursor}"):
            assert await refused_fields(c, "wallet.transactions", {"cursor": cut}) == {"cursor"}
        assert len((await c.call("wallet.transactions", {"cursor": cursor}))["transactions"]) == 2


@pytest.mark.parametrize("method", ["hosts.search", "wallet.transactions", "bookings.list", "chat.conversations"])
async def test_cursors_a_client_wrote_are_invalid_params_even_holding_absurd_values(server, method):
    """The attack that was ``internal`` with a traceback: a cursor the server
    never made, holding a number no Decimal context holds, NaN, infinities."""
    some_id = str(uuid.uuid4())
    written = [unsigned(v, some_id) for v in ("1e1000000", "NaN", "-Infinity", 1e308, 10**30, "10.00")]
    written += [unsigned("2030-01-01T00:00:00+00:00", some_id), "A" * 512, "-_-_", "=", "x"]
    async with await server.connect() as c:
        await register(c)
        for cursor in written:
            assert await refused_fields(c, method, {"cursor": cursor}) == {"cursor"}, cursor
            # Named with every other failing field, in one reply.
            assert await refused_fields(c, method, {"cursor": cursor, "limit": 0}) == {"cursor", "limit"}
        assert await refused_fields(c, method, {"cursor": "A" * 513}) == {"cursor"}


async def test_a_forged_cursor_is_named_beside_filters_that_are_invalid_themselves(server):
    async with await server.connect() as c:
        await register(c)
        params = {"cursor": unsigned("10.00", str(uuid.uuid4())), "gender": " ", "min_price": "1e2", "limit": 101}
        assert await refused_fields(c, "hosts.search", params) == {"cursor", "gender", "min_price", "limit"}
        params = {"cursor": unsigned("x"), "role": "nobody"}
        assert await refused_fields(c, "bookings.list", params) == {"cursor", "role"}


async def test_a_cursor_made_before_the_secret_changed_is_invalid_params(server, stack):
    async with await server.connect() as c:
        session = await register(c)
        await ledger_of_three(c)
        old = (await c.call("wallet.transactions", {"limit": 1}))["next_cursor"]
    rotated = await ServerProcess(stack, JWT_SECRET="a-rotated-secret-" + uuid.uuid4().hex).start()
    try:
        async with await rotated.connect() as c:
            await c.call("auth.login", {"email": session["user"]["email"], "password": PASSWORD})
            assert await refused_fields(c, "wallet.transactions", {"cursor": old}) == {"cursor"}
            new = (await c.call("wallet.transactions", {"limit": 1}))["next_cursor"]
            assert len((await c.call("wallet.transactions", {"cursor": new}))["transactions"]) == 2
    finally:
        await rotated.stop()


def test_names_are_trimmed_of_unicode_white_space_which_str_isspace_is_not():
    """Python's ``str.strip()`` also strips U+001C-U+001F; White_Space (25
    code points) does not hold them, and a name must not hold them at all."""
    is_space = {c for c in map(chr, range(0x110000)) if c.isspace()}
    assert len(WHITE_SPACE) == 25 and set(WHITE_SPACE) <= is_space
    assert is_space - set(WHITE_SPACE) == set("\x1c\x1d\x1e\x1f")
    controls = {c for c in map(chr, range(0x110000)) if unicodedata.category(c) == "Cc"}
    bidi = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
    assert {c for c in map(chr, range(0x110000)) if has_control(c)} == controls | bidi
