"""Presence: whether a user has an authenticated socket on any process.

Redis holds the state every process shares. While a user is online (by the
contract's debounced rule: going online is immediate, going offline waits
until no socket of theirs has been authenticated for 5 s) the key
``online:{user_id}`` exists; it is deleted when they go offline.
``online_among`` is what other parts of the server (the push hook) ask.
"""

from __future__ import annotations

import uuid
from typing import Iterable

import redis.asyncio as aioredis


def online_key(user_id: uuid.UUID) -> str:
    return f"online:{user_id}"


class Presence:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def online_among(self, user_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """The users of ``user_ids`` who are online now. Raises the Redis
        client's error when Redis does not answer: the caller decides what
        an unknown state means."""
        users = list(dict.fromkeys(user_ids))
        if not users:
            return set()
        found = await self.redis.mget([online_key(u) for u in users])
        return {u for u, v in zip(users, found) if v is not None}
