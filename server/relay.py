"""The relay: every committed user event and chat message reaches Redis,
even when the process that committed it died before publishing, or Redis
was down then.

Every process runs one. A process that published an event right after its
commit (server/events.py, into ``Services.published_events``) marks it
published, in one statement per ``RELAY_INTERVAL_S`` for all its calls. Each pass then claims events that
are still unmarked ``RELAY_AFTER_S`` after they were stored
(``FOR UPDATE SKIP LOCKED``: any number of processes share the work, each
event claimed by one at a time), publishes them and marks them. An event may
so be published twice (its fast path's mark came late); sockets give each
seq once. While Redis is away nothing is marked, and the first pass after
it answers publishes the backlog. Marking is also where the pushes of
booking events to users without a socket are queued (server/push.py).

Chat messages have their own gap-free ``seq`` per conversation, and a room
fetches from PostgreSQL any hole that a later message shows
(server/rooms/repair.py). What no later message shows is a room's newest
message lost with its process: each pass, one process (the holder of the
chat mark's lock) publishes again the newest message of every conversation
written to since its last pass, ``RELAY_AFTER_S`` on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING

import asyncpg

from protocol.models.chat import Message
from server import events, messages
from server.db import events as events_db
from server.frames import event_frame
from server.metrics import RELAY_DELAY_SECONDS, TALLY
from server.periodic import Periodic, PeriodicWorker

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("hangout.relay")

RELAY_INTERVAL_S = 0.5
RELAY_AFTER_S = 1.5  # well past a fast path's publish and its mark
BATCH = 500
MAX_BATCHES = 20  # per pass; the next pass goes on


class Relay(PeriodicWorker):
    """Background worker owned by ``Services`` (``start``/``stop``)."""

    def __init__(self, services: "Services", interval_s: float = RELAY_INTERVAL_S) -> None:
        self.services = services
        self._loop = Periodic("relay", self.run_pass, interval_s, log)
        self.relayed = 0  # events this process published late, for tests and logs

    async def run_pass(self) -> None:
        await self.flush_marks()
        relayed = await self.relay_unpublished()
        if relayed:
            log.info("relayed %d user events", relayed)
        await self.services.db.write(None, events_db.relay_chat, dt.timedelta(seconds=RELAY_AFTER_S), BATCH,
                                     self._publish_messages)

    async def flush_marks(self) -> None:
        marks = self.services.published_events[:]
        del self.services.published_events[:len(marks)]
        if marks:
            push = self.services.push
            online = await push.online_if_enabled(list({user for user, _ in marks}))
            # Lost on failure: the relay then publishes them again, harmlessly
            # (and queues their pushes then).
            if await self.services.db.write(None, events_db.mark_published, marks, online):
                push.queued()

    async def relay_unpublished(self) -> int:
        total = 0
        for _ in range(MAX_BATCHES):
            n = await self.services.db.write(
                None, events_db.relay_unpublished, dt.timedelta(seconds=RELAY_AFTER_S), BATCH, self._publish,
                self.services.push.online_if_enabled,
            )
            total += n
            if n < BATCH:
                break
        self.relayed += total
        if total:
            self.services.push.queued()
        return total

    async def _publish(self, rows: list[asyncpg.Record]) -> bool:
        hub = self.services.hub
        items = [(hub.user_channel(r["user_id"]), r["seq"],
                  event_frame(r["event"], events.stored_payload(r["event"], r["data"], r["seq"]), r["seq"]))
                 for r in rows]
        sent = await hub.publish_numbered(items)
        if sent:
            TALLY.relayed_late += len(rows)
            for r in rows:
                RELAY_DELAY_SECONDS.observe(r["age_s"])  # its age when claimed
        return sent

    async def _publish_messages(self, rows: list[asyncpg.Record]) -> bool:
        hub = self.services.hub
        sent = await asyncio.gather(*(
            hub.publish(hub.conversation_channel(r["conversation_id"]),
                        messages.message_frame(Message.model_validate(dict(r))), seq=r["seq"])
            for r in rows))
        return all(sent)
