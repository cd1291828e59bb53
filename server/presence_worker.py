"""Keeping presence (server/presence.py) and telling the other parties.

Every process runs one ``PresenceWorker``, owned by ``Services``. It writes
its sockets' counts to Redis as soon as they change (going online is
immediate), renews its heartbeat, and sweeps: takes offline the users whose
delay has passed and the users of processes that died. The process that
made a change announces it: ``users.last_seen_at`` in PostgreSQL and
``chat.presence`` to every conversation the user is a party of.

Two processes may announce two changes of one user at the same moment,
and their publishes may reach Redis in either order. After publishing, the
announcer reads the user's latest change: if a later one was made
meanwhile, it is published again, after this one, so the last event every
socket gets is the current state. PostgreSQL keeps the later change by its
version (server/db/presence.py).

Redis away: counts wait in memory and are written when it answers; users
keep the state they had; a process given up for dead meanwhile writes all
its counts again. PostgreSQL away: changes are made in Redis but not
announced (``chat.join`` still reads them from Redis).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from typing import TYPE_CHECKING

from protocol.models.chat import Presence as PresenceModel
from protocol.models.chat import PresenceEvent
from server.db import presence as presence_db
from server.frames import event_frame
from server.outbox import UNREACHABLE
from server.periodic import Periodic, PeriodicWorker, raise_if_cancelled
from server.presence import REDIS_ERRORS, Change

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("hangout.presence")

RETRY_S = 1.0  # a flush that failed is tried again after this
ANNOUNCE_ROUNDS = 3  # announcing again a change made meanwhile, at most this often
DEPART_TIMEOUT_S = 2.0


class PresenceWorker(PeriodicWorker):
    """Background worker owned by ``Services`` (``start``/``stop``): the
    sweep is its ``Periodic``; the heartbeat and the flusher are its own."""

    def __init__(self, services: "Services") -> None:
        cfg = services.config
        self.services = services
        self.presence = services.presence
        self._loop = Periodic("presence-sweep", self.sweep, cfg.presence_sweep_interval_s, log)
        self._heartbeat = Periodic("presence-heartbeat", self.beat, cfg.presence_heartbeat_s, log)
        self._flusher: asyncio.Task | None = None
        self._redis_failing = False

    async def start(self) -> None:
        await self._heartbeat.start(first_pass_now=True)  # beats before the first flush
        self._flusher = asyncio.create_task(self._flush_forever(), name="presence-flush")
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self._heartbeat.stop()
        try:
            await asyncio.wait_for(self.presence.depart(), DEPART_TIMEOUT_S)
        except REDIS_ERRORS as exc:
            # Its heartbeat key then expires, and another process sweeps its users.
            log.warning("presence: could not give up this process's sockets: %r", exc)

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        if not self._redis_failing:  # once per outage: a sweep runs every second
            log.warning("presence: %s failed: %r", what, exc)
        self._redis_failing = True

    async def beat(self) -> None:
        try:
            if await self.presence.beat():
                await self.presence.resync()
        except REDIS_ERRORS as exc:
            self._redis_failed("heartbeat", exc)

    async def _resync(self) -> None:
        """The flush found this process given up for dead: every count again."""
        try:
            await self.presence.resync()
        except REDIS_ERRORS as exc:
            self._redis_failed("writing every socket count again", exc)

    async def sweep(self) -> None:
        try:
            changes = await self.presence.sweep()
        except REDIS_ERRORS as exc:
            self._redis_failed("sweep", exc)
            return
        self._redis_failing = False
        self._announce_soon(changes)

    async def _flush_forever(self) -> None:
        while True:
            await self.presence.wait_dirty()
            try:
                lost, changes = await self.presence.flush()
                raise_if_cancelled()
            except REDIS_ERRORS as exc:
                self._redis_failed("writing socket counts", exc)
                if isinstance(exc, UNREACHABLE):
                    self.services.outbox.unreachable(exc)
                await asyncio.sleep(RETRY_S)
                await self.services.outbox.wait_available()  # probed by the outbox meanwhile
                continue
            self._redis_failing = False
            if lost:
                await self._resync()
            self._announce_soon(changes)

    def _announce_soon(self, changes: list[Change]) -> None:
        """Announce on a task of the process's own: a users row locked for
        a while, or a slow database, delays no other change."""
        if changes:
            self.services.spawn(self.announce(changes))

    async def announce(self, changes: list[Change]) -> None:
        """Publish and store changes; then, in case a later change of the
        same users was published before these, that one again."""
        for _ in range(ANNOUNCE_ROUNDS):
            if not changes:
                return
            published, stored = await asyncio.gather(self._publish(changes), self._store(changes),
                                                     return_exceptions=True)
            for what, outcome in (("publishing", published), ("storing", stored)):
                if isinstance(outcome, BaseException):  # the database away: the state in Redis stands
                    log.warning("presence: %s %d changes failed: %r", what, len(changes), outcome)
            try:
                latest = await self.presence.latest([c.user_id for c in changes])
            except REDIS_ERRORS as exc:
                self._redis_failed("reading the latest changes", exc)
                return
            changes = [latest[c.user_id] for c in changes
                       if c.user_id in latest and latest[c.user_id].version > c.version]

    async def _store(self, changes: list[Change]) -> None:
        rows = sorted(((c.user_id, c.last_seen_at, c.changed_at) for c in changes), key=lambda r: r[0].bytes)
        await self.services.db.write(None, presence_db.record_changes, rows)

    async def _publish(self, changes: list[Change]) -> None:
        services = self.services
        hub = services.hub
        by_user = {c.user_id: c for c in changes}
        shared = await services.db.read_primary(presence_db.conversations_of, list(by_user))
        sends = []
        for conv in shared:
            for party in (conv["user_id"], conv["host_id"]):
                change = by_user.get(party)
                if change is None:
                    continue
                frame = event_frame("chat.presence", PresenceEvent(
                    conversation_id=conv["id"], user_id=party, online=change.online,
                    last_seen_at=change.last_seen_at))
                sends.append(hub.publish(hub.conversation_channel(conv["id"]), frame, skip_user=party))
        await asyncio.gather(*sends)


async def party_presence(services: "Services", viewer: uuid.UUID, user_id: uuid.UUID) -> PresenceModel:
    """``user_id``'s presence as ``viewer`` is shown it: from Redis, with
    ``last_seen_at`` from PostgreSQL where Redis no longer has it. With Redis
    not answering, the last state PostgreSQL has; never an error."""
    online: bool | None = None
    latest: Change | None = None
    if services.outbox.available:  # else Redis is known to be away: no wait
        try:
            online, latest = await services.presence.state(user_id)
        except REDIS_ERRORS as exc:
            if isinstance(exc, UNREACHABLE):
                services.outbox.unreachable(exc)  # the next calls do not wait for it
            online = None
    if online:
        return PresenceModel(user_id=user_id, online=True, last_seen_at=None)
    if latest is not None and not latest.online:
        return PresenceModel(user_id=user_id, online=False, last_seen_at=latest.last_seen_at)
    row = await services.db.read(viewer, presence_db.last_seen, user_id)
    last_seen: dt.datetime | None = row["last_seen_at"] if row else None
    changed: dt.datetime | None = row["presence_changed_at"] if row else None
    if online is None and last_seen is None and changed is not None:
        return PresenceModel(user_id=user_id, online=True, last_seen_at=None)  # as last stored
    # Offline with no offline change stored: Redis lost it, or its write is
    # under way; the time they came online is the best known.
    return PresenceModel(user_id=user_id, online=False, last_seen_at=last_seen or changed)
