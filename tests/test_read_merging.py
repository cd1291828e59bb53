"""Concurrent users.get calls share one query (Database.read_one): each
caller still gets exactly its own answer, and read-your-writes holds."""

import asyncio
import uuid

from tests.conftest import get_when_replicated, register


async def test_pipelined_lookups_each_get_their_own_user(server):
    async with await server.connect() as me, await server.connect() as other:
        others = [await register(other, name=f"Person {i}") for i in range(6)]
        await register(me)
        for o in others:  # other users may see a new user a little later
            await get_when_replicated(me, o["user"]["id"])
        unknown = [str(uuid.uuid4()) for _ in range(3)]
        ids = [o["user"]["id"] for o in others] * 3 + unknown
        replies = await asyncio.gather(*(me.call_raw("users.get", {"user_id": i}) for i in ids))
        for user_id, reply in zip(ids, replies):
            if user_id in unknown:
                assert reply["error"]["code"] == "not_found"
            else:
                assert reply["result"]["id"] == user_id
                assert "email" not in reply["result"]
        names = {o["user"]["id"]: o["user"]["name"] for o in others}
        assert all(r["result"]["name"] == names[i] for i, r in zip(ids, replies) if i not in unknown)


async def test_own_profile_in_a_merged_lookup_shows_the_callers_write(server):
    async with await server.connect() as me, await server.connect() as other:
        friend = await register(other)
        s = await register(me, name="Before")
        await get_when_replicated(me, friend["user"]["id"])
        await get_when_replicated(other, s["user"]["id"])
        await me.call("users.update", {"name": "After"})
        # The caller's own look-up rides in a batch with other callers' and
        # other users': the batch is read where the caller's write is visible.
        replies = await asyncio.gather(
            other.call("users.get", {"user_id": s["user"]["id"]}),
            *(me.call("users.get", {"user_id": friend["user"]["id"]}) for _ in range(5)),
            me.call("users.get", {"user_id": s["user"]["id"]}),
        )
        assert replies[-1]["name"] == "After"
