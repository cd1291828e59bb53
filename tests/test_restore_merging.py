"""What a client reads when it comes back (the session check at the upgrade,
``events.resume``, ``chat.join``) is merged with the same reads of other
sockets at the same moment, as after a process died (Database.read_one,
read_one_primary). Each caller still gets exactly the answer it would get
alone, and a caller who may not see a row gets none of anyone else's."""

from __future__ import annotations

import asyncio
import uuid

from protocol.errors import ErrorCode
from tests.chat_helpers import expect_error, open_room, send_many
from tests.conftest import register
from tests.test_auth import upgrade_status

SNAPSHOT = ("conversation", "messages", "last_seq", "truncated")


def snapshot(join: dict) -> dict:
    return {k: join[k] for k in SNAPSHOT}


async def test_joins_made_together_each_get_their_own_room(server):
    first, second = await open_room(server), await open_room(server)
    try:
        await send_many(first.booker.client, first.conversation_id, 7)
        await send_many(second.host.client, second.conversation_id, 3)
        joins = [  # (socket owner, params)
            (first.booker, {"conversation_id": first.conversation_id}),
            (first.booker, {"conversation_id": first.conversation_id, "since_seq": 4}),
            (first.host, {"conversation_id": first.conversation_id, "since_seq": 0}),
            (first.host, {"conversation_id": first.conversation_id, "since_seq": 9}),
            (second.booker, {"conversation_id": second.conversation_id, "since_seq": 1}),
            (second.host, {"conversation_id": second.conversation_id}),
        ]
        sockets = [await party.socket(server) for party, _ in joins]
        outsider = await second.booker.socket(server)  # not a party of the first room
        together = await asyncio.gather(
            *(s.call("chat.join", params) for s, (_, params) in zip(sockets, joins)),
            expect_error(ErrorCode.NOT_FOUND, outsider.call("chat.join", {"conversation_id": first.conversation_id})),
        )
        alone = [await (await party.socket(server)).call("chat.join", params) for party, params in joins]
        for got, expected in zip(together, alone):
            assert snapshot(got) == snapshot(expected)
        assert [m["seq"] for m in together[1]["messages"]] == [5, 6, 7]
        assert together[3]["messages"] == [] and together[3]["last_seq"] == 7
        assert [m["seq"] for m in together[4]["messages"]] == [2, 3]
        # Each party's own view of the read figures: the booker sent the 7.
        assert (together[0]["conversation"]["unread"], together[2]["conversation"]["unread"]) == (0, 7)
    finally:
        await first.close()
        await second.close()


async def test_resumes_made_together_each_get_their_own_events(server):
    async with await server.connect() as a, await server.connect() as b:
        await register(a)
        await register(b)
        for i in range(4):
            await a.call("wallet.topup", {"amount": f"{i + 1}.00", "idempotency_key": uuid.uuid4().hex})
        await b.call("wallet.topup", {"amount": "9.00", "idempotency_key": uuid.uuid4().hex})
        a_last = (await a.call("users.me"))["event_seq"]
        b_last = (await b.call("users.me"))["event_seq"]
        calls = [(a, 0), (a, 2), (a, a_last), (a, a_last + 5), (b, 0), (b, b_last - 1)]
        together = await asyncio.gather(*(c.call("events.resume", {"since_seq": s}) for c, s in calls))
        alone = [await c.call("events.resume", {"since_seq": s}) for c, s in calls]
        assert together == alone
        assert [e["seq"] for e in together[1]["events"]] == list(range(3, a_last + 1))
        assert together[3]["truncated"] and together[3]["events"] == []
        assert {e["data"]["balance"] for e in together[4]["events"]} == {"9.00"}
        assert [r["last_seq"] for r in together] == [a_last] * 4 + [b_last] * 2


async def test_upgrades_made_together_each_bind_their_own_user_and_refuse_an_ended_session(server):
    async with await server.connect() as a, await server.connect() as b, await server.connect() as c:
        sessions = [await register(x) for x in (a, b, c)]
        assert await c.call("auth.logout") == {}
        ended = sessions[2]["access_token"]
        live = sessions[:2] * 3

        async def me(session: dict) -> str:
            async with await server.connect(access_token=session["access_token"]) as s:
                return (await s.call("users.me"))["id"]

        results = await asyncio.gather(
            *(me(s) for s in live),
            upgrade_status(server, headers={"Authorization": f"Bearer {ended}"}),
            upgrade_status(server, params={"access_token": ended}),
        )
        assert results[:-2] == [s["user"]["id"] for s in live]
        assert results[-2:] == [401, 401]
