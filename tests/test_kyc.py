"""KYC status changes: the signed webhook and the operator command, and the
``user.updated`` event they push to the user's sockets on every process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import aiohttp
import pytest

from tests.conftest import ROOT, ServerProcess, new_email, post_kyc, register, sign


async def post_raw(server: ServerProcess, body: bytes, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(server.http + "/webhooks/kyc", data=body, headers=headers or {}) as r:
            await r.read()
            return r.status


async def post_signed(server: ServerProcess, body: bytes) -> int:
    return await post_raw(server, body, {"X-Signature": sign(body)})


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


async def test_a_bad_or_missing_signature_is_401_and_changes_nothing(server, db, pending_user):
    client, user = pending_user
    body = json.dumps({"user_id": user["id"], "status": "rejected"}).encode()
    good = sign(body)
    for headers in (
        {},
        {"X-Signature": ""},
        {"X-Signature": good[len("sha256="):]},  # no scheme
        {"X-Signature": "sha1=" + good[len("sha256="):]},
        {"X-Signature": sign(body, secret="not-the-webhook-secret")},
        {"X-Signature": sign(body + b" ")},  # signature of another body
        {"X-Signature": good[:-2]},
        {"X-Signature": "sha256=" + "zz" * 32},
    ):
        assert await post_raw(server, body, headers) == 401, headers
    non_ascii = (
        f"POST /webhooks/kyc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Signature: sha256=".encode()
        + "é".encode() * 32
        + b"\r\n\r\n"
        + body
    )
    assert await raw_http_status(server, non_ascii) == 401
    # The signature is checked before anything in the body: an unsigned
    # malformed body or unknown user tells the caller nothing else.
    for unsigned in (b"not json", json.dumps({"user_id": str(uuid.uuid4()), "status": "verified"}).encode()):
        assert await post_raw(server, unsigned, {"X-Signature": sign(unsigned, secret="not-the-webhook-secret")}) == 401
    assert await kyc_status_in_db(db, user["id"]) == "pending"
    # Nothing was pushed: the first event the socket gets is from the good call.
    assert (await post_kyc(server, user["id"], "verified")).status == 200
    assert (await client.next_event("user.updated"))["user"]["kyc_status"] == "verified"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b'"a string"',
        b"{",
        b"\xff\xfe",
        b'{"status": "verified"}',
        b'{"user_id": null, "status": "verified"}',
        b'{"user_id": 12, "status": "verified"}',
        b'{"user_id": "not-a-uuid", "status": "verified"}',
        # int(s, 16) reads these, so uuid.UUID alone names another user.
        b'{"user_id": "+2345678123412341234123456789abc", "status": "verified"}',
        b'{"user_id": "2345678_123412341234123456789abc", "status": "verified"}',
        b"[" * 100_000,  # too deep for the parser
        b'{"user_id": "USER", "status": "verified", "score": NaN}',
        b'{"user_id": "USER", "status": "verified", "score": Infinity}',
        b'{"user_id": "USER", "status": "approved"}',
        b'{"user_id": "USER", "status": "VERIFIED"}',
        b'{"user_id": "USER"}',
        b'{"user_id": "USER", "status": null}',
    ],
)
async def test_a_signed_malformed_body_is_400_and_changes_nothing(server, db, pending_user, body):
    _, user = pending_user
    body = body.replace(b"USER", user["id"].encode())
    assert await post_signed(server, body) == 400
    assert await kyc_status_in_db(db, user["id"]) == "pending"


async def test_an_unknown_user_is_404(server):
    body = json.dumps({"user_id": str(uuid.uuid4()), "status": "verified"}).encode()
    assert await post_signed(server, body) == 404


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
        DATABASE_URL=stack.database_url,
        DATABASE_REPLICA_URLS=",".join(stack.replica_urls),
        REDIS_URL=stack.redis_url,
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
