"""What a process shares between its sockets: config, pools, Redis, the hub,
the password-hashing threads, and the background tasks it owns."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Coroutine, Protocol

import redis.asyncio as aioredis

from server import messages, redis_cluster
from server.config import Config
from server.credentials import PasswordHashing
from server.deadlines import Deadlines
from server.db import auth as auth_db
from server.db.database import Database
from server.edge import SocketCounts
from server.limits import WindowLimit
from server.outbox import Outbox
from server.outbox_cluster import ClusterOutbox
from server.parties import Parties
from server.presence import Presence
from server.push import PushHook
from server.rooms import Hub
from server.sessions import Sessions

log = logging.getLogger("hangout")


class ServedSocket(Protocol):
    """What the process needs of a socket it serves (``server.socket.Connection``)."""

    @property
    def user_id(self) -> uuid.UUID | None: ...

    @property
    def token_family(self) -> uuid.UUID | None: ...

    async def drain(self, timeout: float) -> None: ...

    def stats(self) -> dict[str, int | bool]: ...


@dataclass
class Services:
    config: Config
    redis: aioredis.Redis
    outbox: Outbox
    db: Database
    hub: Hub
    sessions: Sessions
    hashing: PasswordHashing
    # auth.register and auth.login per client address (server/limits.py)
    address_checks: WindowLimit
    presence: Presence
    push: PushHook
    # User events published right after their commit, (user, seq), that the
    # relay (server/relay.py) is to mark published.
    published_events: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    connections: set[ServedSocket] = field(default_factory=set)
    parties: Parties = field(default_factory=Parties)
    # Sockets from their admission (server/http.py) to their teardown.
    sockets: SocketCounts = field(default_factory=SocketCounts)
    # The sockets' timers: ping checks, token expiries, sign-in deadlines.
    deadlines: Deadlines = field(default_factory=Deadlines)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _workers: list[Any] = field(default_factory=list)

    @classmethod
    def build(cls, config: Config) -> "Services":
        cluster = redis_cluster.is_cluster(config.redis_url)
        client = redis_cluster.client(config.redis_url, config.redis_timeout_s)
        outbox = (ClusterOutbox if cluster else Outbox)(config.redis_url, timeout_s=config.redis_timeout_s,
                        probe_interval_s=config.redis_probe_interval_s)
        db = Database(config, client, outbox)
        outbox.on_recovered = db.raise_floor
        hub = Hub(config.redis_url, outbox, backfill=functools.partial(messages.conversation_backfill, db))
        presence = Presence(client, config.presence_offline_after_s, config.presence_ttl_s, cluster=cluster)
        services = cls(config=config, redis=client, outbox=outbox, db=db, hub=hub,
                       sessions=Sessions(hub, config.access_token_ttl_s),
                       hashing=PasswordHashing(config.hash_concurrency, config.hash_max_wait_s),
                       address_checks=WindowLimit(client, "auth-address", config.auth_max_per_address,
                                                  config.auth_address_window_s, lambda: outbox.available,
                                                  remember_refusals=True),
                       presence=presence, push=PushHook(config, presence, outbox))

        def bound() -> list[tuple[uuid.UUID, uuid.UUID]]:
            return [(c.user_id, c.token_family) for c in services.connections
                    if c.user_id is not None and c.token_family is not None]

        services.sessions.check_with(bound, functools.partial(db.read_primary, auth_db.revoked_among))
        return services

    async def start(self) -> None:
        await self.db.start()
        await self.hub.start()
        self.sessions.start()

    def add_worker(self, worker: Any) -> None:
        """A worker has ``start()`` and ``stop()``; stopped before the pools close."""
        self._workers.append(worker)

    async def start_workers(self) -> None:
        for w in self._workers:
            await w.start()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run a short task owned by the process (cancelled at shutdown)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def close(self) -> None:
        for w in reversed(self._workers):
            await w.stop()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.deadlines.close()
        await self.hashing.close()
        await self.sessions.stop()
        await self.hub.stop()
        await self.db.close()
        await self.outbox.close()
        await self.redis.aclose()
