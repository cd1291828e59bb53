"""The push hook: a signed POST to ``PUSH_WEBHOOK_URL`` for each
``chat.message`` and ``booking.*`` event meant for a user who has no socket,
so that the app's backend can wake the phone (docs/push.md).

Who is offline: presence (server/presence.py) asked at the time of the
event. When Redis does not answer, the user counts as offline: a push to a
user who had a socket after all costs a notification the app drops, one
never sent costs a message the user does not see.

Durable: a push is a row of ``push_outbox`` (sql/015) committed with what
it reports, delivered later by any process (server/push_delivery.py).
- A chat message to an offline recipient is stored with its push in one
  transaction (server/db/push.py ``send_message``); to an online one it
  stays the single statement it always was.
- A booking event is stored by the booking's own SQL (sql/012), which knows
  nothing of presence. Its push is written in the statement that marks the
  event published, once it has been published to Redis: by the relay's
  flush of the marks a process collects right after its commits, or by the
  relay when it publishes the event late. A process that dies between the
  commit and that statement leaves the event unmarked, and the relay then
  publishes it and writes the push; an event marked twice is pushed once.
  The cost is up to one relay interval (0.5 s) before the push is queued,
  and during a Redis outage booking pushes wait with the events until Redis
  answers; the booking procedures stay as they are.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable, Collection, Iterable

from redis.exceptions import RedisClusterException, RedisError

from server.config import Config
from server.outbox import Outbox
from server.presence import Presence

log = logging.getLogger("hangout.push")

class PushHook:
    """What the rest of the server asks of the push hook: whether it is on,
    who of some users is offline, and to deliver what it just queued."""

    def __init__(self, config: Config, presence: Presence, outbox: Outbox) -> None:
        self.enabled = config.push_webhook_url is not None
        self.presence = presence
        self.outbox = outbox
        self.on_queued: Callable[[], None] = lambda: None

    async def online_among(self, users: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Who of ``users`` is online; nobody when Redis does not answer."""
        if not self.outbox.available:  # known to be away: no need to wait for a timeout
            return set()
        try:
            return await self.presence.online_among(users)
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as err:
            log.warning("presence unknown (%s): pushing as if offline", err)
            return set()

    async def online_if_enabled(self, users: list[uuid.UUID]) -> Collection[uuid.UUID] | None:
        """``online_among`` when the hook is on; None (push nothing) when off."""
        return await self.online_among(users) if self.enabled else None

    def queued(self) -> None:
        """Some push was just committed: deliver without waiting for the poll."""
        self.on_queued()
