"""KYC status changes: the signed webhook and the operator command, and the
``user.updated`` event they push to the user's sockets on every process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import sys
import time
import uuid

import aiohttp
import pytest

from server.config import DEV_KYC_SECRET

from tests.conftest import ROOT, ServerProcess, kyc_body, new_email, post_kyc, register, sign


async def post_raw(server: ServerProcess, body: bytes, headers: dict[str, str] | list | None = None) -> int:
    return (await post_for_json(server, body, headers))[0]


async def post_for_json(
    server: ServerProcess, body: bytes, headers: dict[str, str] | list | None = None, signed: bool = False
) -> tuple[int, dict]:
    if signed:
        headers = {"X-Signature": sign(body)}
    async with aiohttp.ClientSession() as s:
        async with s.post(server.http + "/webhooks/kyc", data=body, headers=headers or {}) as r:
            return r.status, await r.json(content_type=None)


async def post_signed(server: ServerProcess, body: bytes, t: int | None = None) -> int:
    return await post_raw(server, body, {"X-Signature": sign(body, t=t)})


async def raw_http_status(server: ServerProcess, request: bytes) -> int:
    """For headers an HTTP client library will not send (non-ASCII bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


async def kyc_status_in_db(db, user_id: str) -> str:
    return await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", uuid.UUID(user_id))


@pytest.fixture
async def pending_user(server):
    c = await server.connect()
    s = await register(c)
    yield c, s["user"]
    await c.close()


def first_edition_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(DEV_KYC_SECRET.encode(), body, hashlib.sha256).hexdigest()


async def test_a_bad_or_missing_signature_is_401_and_changes_nothing(server, db, pending_user):
    client, user = pending_user
    body = kyc_body(user["id"], "rejected")
    good = sign(body)
    t, _, digest = good.partition(",sha256=")
    now = int(time.time())
    for headers in (
        {},
        {"X-Signature": ""},
        {"X-Signature": first_edition_signature(body)},  # the first edition's form
        {"X-Signature": "sha256=" + digest},  # no time
        {"X-Signature": digest},  # no scheme
        {"X-Signature": f"{t},sha1={digest}"},
        {"X-Signature": f"{t},sha256={digest},"},
        {"X-Signature": f" {t},sha256={digest}x"},
        {"X-Signature": f"sha256={digest},{t}"},  # parts swapped
        {"X-Signature": f"{t}, sha256={digest}"},
        {"X-Signature": sign(body, secret="not-the-webhook-secret")},
        {"X-Signature": sign(body + b" ")},  # signature of another body
        {"X-Signature": f"t={now + 1},sha256={digest}"},  # the time is signed too
        {"X-Signature": good[:-2]},
        {"X-Signature": f"{t},sha256=" + "zz" * 32},
        # t strictly digits: no sign, space, fraction, exponent or other digits
        {"X-Signature": sign(body, t=f"+{now}")},
        {"X-Signature": sign(body, t=f" {now}")},
        {"X-Signature": sign(body, t=f"{now}.0")},
        {"X-Signature": sign(body, t="1.7e9")},
        {"X-Signature": sign(body, t="".join(chr(0x0660 + int(d)) for d in str(now)))},  # Arabic-Indic digits
        {"X-Signature": sign(body, t="9" * 5000)},
        {"X-Signature": sign(body, t="")},
    ):
        assert await post_raw(server, body, headers) == 401, headers
    # One signature header, not several (a proxy may add or merge them).
    assert await post_raw(server, body, [("X-Signature", good), ("X-Signature", good)]) == 401
    non_ascii = (
        f"POST /webhooks/kyc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Signature: {t},sha256=".encode()
        + "é".encode() * 32
        + b"\r\n\r\n"
        + body
    )
    assert await raw_http_status(server, non_ascii) == 401
    # The signature is checked before anything in the body: an unsigned
    # malformed body or unknown user tells the caller nothing else.
    for unsigned in (b"not json", kyc_body(str(uuid.uuid4()), "verified")):
        assert await post_raw(server, unsigned, {"X-Signature": sign(unsigned, secret="not-the-webhook-secret")}) == 401
    assert await kyc_status_in_db(db, user["id"]) == "pending"
    assert await db.fetchval("SELECT count(*) FROM kyc_events WHERE user_id = $1", uuid.UUID(user["id"])) == 0
    # Nothing was pushed: the first event the socket gets is from the good call.
    assert (await post_kyc(server, user["id"], "verified")).status == 200
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"


async def test_the_hex_digest_may_be_upper_case(server, db, pending_user):
    _, user = pending_user
    body = kyc_body(user["id"], "verified")
    t, _, digest = sign(body).partition(",sha256=")
    assert await post_raw(server, body, {"X-Signature": f"{t},sha256={digest.upper()}"}) == 200
    assert await kyc_status_in_db(db, user["id"]) == "verified"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b'"a string"',
        b"{",
        b"\xff\xfe",
        b'{"event_id": "EVT", "status": "verified"}',
        b'{"event_id": "EVT", "user_id": null, "status": "verified"}',
        b'{"event_id": "EVT", "user_id": 12, "status": "verified"}',
        b'{"event_id": "EVT", "user_id": "not-a-uuid", "status": "verified"}',
        # int(s, 16) reads these, so uuid.UUID alone names another user.
        b'{"event_id": "EVT", "user_id": "+2345678123412341234123456789abc", "status": "verified"}',
        b'{"event_id": "EVT", "user_id": "2345678_123412341234123456789abc", "status": "verified"}',
        b"[" * 100_000,  # too deep for the parser
        b'{"event_id": "EVT", "user_id": "USER", "status": "verified", "score": NaN}',
        b'{"event_id": "EVT", "user_id": "USER", "status": "verified", "score": Infinity}',
        b'{"event_id": "EVT", "user_id": "USER", "status": "approved"}',
        b'{"event_id": "EVT", "user_id": "USER", "status": "VERIFIED"}',
        b'{"event_id": "EVT", "user_id": "USER"}',
        b'{"event_id": "EVT", "user_id": "USER", "status": null}',
        # event_id: a string of 1-255 characters, none a control character
        b'{"user_id": "USER", "status": "verified"}',
        b'{"event_id": null, "user_id": "USER", "status": "verified"}',
        b'{"event_id": 12, "user_id": "USER", "status": "verified"}',
        b'{"event_id": ["e"], "user_id": "USER", "status": "verified"}',
        b'{"event_id": "", "user_id": "USER", "status": "verified"}',
        b'{"event_id": "' + b"e" * 256 + b'", "user_id": "USER", "status": "verified"}',
        b'{"event_id": "' + "\u00e9".encode() * 256 + b'", "user_id": "USER", "status": "verified"}',
        b'{"event_id": "evt\\u0000", "user_id": "USER", "status": "verified"}',
        b'{"event_id": "evt\\n", "user_id": "USER", "status": "verified"}',
        b'{"event_id": "evt\\ud800", "user_id": "USER", "status": "verified"}',  # a lone surrogate
    ],
)
async def test_a_signed_malformed_body_is_400_and_changes_nothing(server, db, pending_user, body):
    client, user = pending_user
    event_id = f"evt_{uuid.uuid4().hex}"
    body = body.replace(b"USER", user["id"].encode()).replace(b"EVT", event_id.encode())
    assert await post_signed(server, body) == 400
    assert await kyc_status_in_db(db, user["id"]) == "pending"
    assert await db.fetchval("SELECT count(*) FROM kyc_events WHERE user_id = $1", uuid.UUID(user["id"])) == 0
    await client.call("users.me")  # a reply follows every event queued before it
    assert client.drain_events() == []


@pytest.mark.parametrize("length, char", [(1, "e"), (255, "e"), (255, "\u00e9"), (40, " ")])
async def test_an_event_id_of_1_to_255_characters_is_accepted(server, db, pending_user, length, char):
    _, user = pending_user
    event_id = (uuid.uuid4().hex + char * 255)[:length]
    # A one-character id cannot be made unique: forget an earlier run's.
    await db.execute("DELETE FROM kyc_events WHERE event_id = $1", event_id)
    assert (await post_kyc(server, user["id"], "verified", event_id=event_id)).status == 200
    assert await kyc_status_in_db(db, user["id"]) == "verified"
    assert await db.fetchval("SELECT user_id FROM kyc_events WHERE event_id = $1", event_id) == uuid.UUID(user["id"])


async def test_an_unknown_user_is_404_and_records_nothing(server, db):
    event_id = f"evt_{uuid.uuid4().hex}"
    assert await post_signed(server, kyc_body(str(uuid.uuid4()), "verified", event_id)) == 404
    assert await db.fetchval("SELECT count(*) FROM kyc_events WHERE event_id = $1", event_id) == 0


async def test_a_status_change_is_200_stored_and_pushed_as_user_updated(server, db, pending_user):
    client, user = pending_user
    resp = await post_kyc(server, user["id"], "verified")
    assert resp.status == 200
    event = await client.next_event("user.updated")
    assert event["user"]["id"] == user["id"]
    assert event["user"]["kyc_status"] == "verified"
    assert event["user"]["email"] == user["email"]  # the user's own view
    assert await kyc_status_in_db(db, user["id"]) == "verified"
    assert (await client.call("users.me"))["kyc_status"] == "verified"  # read-your-writes for the user


async def test_setting_the_same_status_again_is_200_and_pushes_nothing(server, pending_user):
    client, user = pending_user
    assert (await post_kyc(server, user["id"], "pending")).status == 200  # already pending
    assert (await post_kyc(server, user["id"], "verified")).status == 200
    assert (await post_kyc(server, user["id"], "verified")).status == 200  # again
    assert (await post_kyc(server, user["id"], "rejected")).status == 200
    statuses = [(await client.next_event("user.updated"))["user"]["kyc_status"] for _ in range(2)]
    assert statuses == ["verified", "rejected"]  # one event per change, none for a repeat


async def test_the_same_status_still_records_the_event_id(server, db, pending_user):
    client, user = pending_user
    event_id = f"evt_{uuid.uuid4().hex}"
    status, reply = await post_for_json(server, kyc_body(user["id"], "pending", event_id), None, signed=True)
    assert status == 200 and reply["changed"] is False and reply["already_applied"] is False
    assert await db.fetchval("SELECT status FROM kyc_events WHERE event_id = $1", event_id) == "pending"
    await client.call("users.me")
    assert client.drain_events() == []


async def test_a_replay_within_the_window_is_200_and_changes_nothing(server, db, pending_user):
    client, user = pending_user
    body = kyc_body(user["id"], "verified")
    headers = {"X-Signature": sign(body)}
    status, first = await post_for_json(server, body, headers)
    assert status == 200 and first["changed"] is True
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"
    for _ in range(3):  # the same bytes, the same signature
        status, again = await post_for_json(server, body, headers)
        assert status == 200
        assert again["changed"] is False and again["already_applied"] is True
    assert await kyc_status_in_db(db, user["id"]) == "verified"
    await client.call("users.me")  # a reply follows every event queued before it
    assert client.drain_events() == []


async def test_a_replayed_verification_after_a_rejection_leaves_the_user_rejected(server, server2, db, pending_user):
    client, user = pending_user
    captured = kyc_body(user["id"], "verified")
    captured_headers = {"X-Signature": sign(captured)}
    assert await post_raw(server, captured, captured_headers) == 200
    assert (await post_kyc(server, user["id"], "rejected")).status == 200  # a later event
    assert [(await client.next_event("user.updated"))["user"]["kyc_status"] for _ in range(2)] == ["verified", "rejected"]
    for target in (server, server2):  # the attacker replays the captured request, to either process
        status, reply = await post_for_json(target, captured, captured_headers)
        assert status == 200 and reply["already_applied"] is True and reply["status"] == "rejected"
    assert await kyc_status_in_db(db, user["id"]) == "rejected"
    assert (await client.call("users.me"))["kyc_status"] == "rejected"
    assert client.drain_events() == []


async def test_an_applied_event_id_sent_again_with_another_status_changes_nothing(server, db, pending_user):
    client, user = pending_user
    event_id = f"evt_{uuid.uuid4().hex}"
    assert (await post_kyc(server, user["id"], "verified", event_id=event_id)).status == 200
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"
    assert (await post_kyc(server, user["id"], "rejected", event_id=event_id)).status == 200  # freshly signed
    assert await kyc_status_in_db(db, user["id"]) == "verified"
    await client.call("users.me")
    assert client.drain_events() == []


async def test_deliveries_of_one_event_at_once_apply_it_once(server, server2, db, pending_user):
    client, user = pending_user
    body = kyc_body(user["id"], "verified")
    headers = {"X-Signature": sign(body)}
    replies = await asyncio.gather(*(post_for_json(target, body, headers) for target in (server, server2) * 4))
    assert [status for status, _ in replies] == [200] * 8
    assert sorted(reply["changed"] for _, reply in replies) == [False] * 7 + [True]
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"
    await client.call("users.me")
    assert client.drain_events() == []


async def post_at(server: ServerProcess, user_id: str, status: str, offset: int) -> tuple[int, str]:
    """A delivery signed at ``offset`` seconds from now: (HTTP status, event id).
    Retried when the clock's second turns during the request, so that the
    server's whole-second clock read the same second as ``t`` was made from."""
    for _ in range(10):
        event_id = f"evt_{uuid.uuid4().hex}"
        before = int(time.time())
        code = await post_signed(server, kyc_body(user_id, status, event_id), t=before + offset)
        if int(time.time()) == before:
            return code, event_id
    raise AssertionError("every attempt crossed a second")


@pytest.mark.parametrize("offset", [-300, 300])
async def test_a_signature_300_s_from_the_server_clock_is_accepted(server, db, pending_user, offset):
    client, user = pending_user
    code, event_id = await post_at(server, user["id"], "verified", offset)
    assert code == 200
    assert await kyc_status_in_db(db, user["id"]) == "verified"
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"


@pytest.mark.parametrize("offset", [-301, 301, -10**9])
async def test_a_signature_more_than_300_s_from_the_server_clock_is_401(server, db, pending_user, offset):
    client, user = pending_user
    code, event_id = await post_at(server, user["id"], "verified", offset)
    assert code == 401
    assert await kyc_status_in_db(db, user["id"]) == "pending"
    assert await db.fetchval("SELECT count(*) FROM kyc_events WHERE event_id = $1", event_id) == 0
    await client.call("users.me")
    assert client.drain_events() == []


async def test_user_updated_reaches_the_users_sockets_on_every_process(server, server2):
    async with await server.connect() as on_one:
        s = await register(on_one)
        async with await server2.connect(access_token=s["access_token"]) as on_two, await server2.connect() as stranger:
            await register(stranger)
            assert (await post_kyc(server2, s["user"]["id"], "verified")).status == 200
            for client in (on_one, on_two):
                assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"
            await stranger.call("users.me")  # a reply follows every event queued before it
            assert stranger.drain_events() == []


def kyc_command(stack, *args: str) -> asyncio.subprocess.Process:
    env = dict(
        os.environ,
        **stack.server_env(),
        LOG_LEVEL="WARNING",
    )
    return asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "kyc", *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_the_operator_command_sets_the_status_and_pushes_user_updated(stack, db, pending_user):
    client, user = pending_user
    proc = await kyc_command(stack, f"  {user['email'].upper()} ", "verified")
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "verified" in out.decode()
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"
    assert await kyc_status_in_db(db, user["id"]) == "verified"


async def test_the_operator_command_with_an_unknown_email_exits_non_zero_with_a_message(stack):
    email = new_email()
    proc = await kyc_command(stack, email, "verified")
    out, err = await proc.communicate()
    assert proc.returncode != 0
    assert email in err.decode()


async def test_the_operator_command_refuses_an_unknown_status(stack, pending_user):
    _, user = pending_user
    proc = await kyc_command(stack, user["email"], "approved")
    _, err = await proc.communicate()
    assert proc.returncode != 0
    assert "approved" in err.decode()


async def test_the_operator_command_with_the_status_already_set_exits_0_and_pushes_nothing(stack, server, db, pending_user):
    client, user = pending_user
    assert (await post_kyc(server, user["id"], "verified")).status == 200
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"
    proc = await kyc_command(stack, user["email"], "verified")  # already verified
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert await kyc_status_in_db(db, user["id"]) == "verified"
    # Had the command published, its PUBLISH (done before it exited) would
    # reach the server's subscriber connection ahead of this change's.
    assert (await post_kyc(server, user["id"], "rejected")).status == 200
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "rejected"
