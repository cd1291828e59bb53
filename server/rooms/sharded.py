"""The process's pub/sub links to a Redis Cluster: sharded pub/sub, one
``Subscriber`` (server/rooms/subscriber.py) per master, each subscribing
the channels whose slot that master owns. To the hub it looks like one
subscriber: ``connected`` is set while every master's link is up, and a
lost link marks only that master's channels as possibly having missed
messages.

The masters come from the cluster's slot map, read (and retried) when the
subscriber starts, and kept for the life of the process (docs/operations.md
says to restart processes after moving slots); until it is read,
subscriptions wait, as they do for a single Redis that is away, and are
made when the links come up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

import redis.exceptions

from server.redis_cluster import ClusterAddress, Node, SlotMap
from server.rooms.subscriber import CONNECT_TIMEOUT_S, Subscriber

log = logging.getLogger("hangout.rooms")


class ShardedSubscriber:
    def __init__(
        self,
        redis_url: str,
        channels: Callable[[], Iterable[str]],
        on_message: Callable[[str, bytes], None],
        on_confirmed: Callable[[str], None],
        on_lost: Callable[[Iterable[str] | None], None],
    ) -> None:
        self._address = ClusterAddress(redis_url)
        self.slots = SlotMap(self._address, CONNECT_TIMEOUT_S)
        self._channels = channels
        self._on_message = on_message
        self._on_confirmed = on_confirmed
        self._on_lost = on_lost
        self._links: dict[Node, Subscriber] = {}
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()

    def _link(self, channel: str) -> Subscriber | None:
        if not self.slots.loaded:
            return None
        return self._links.get(self.slots.node_of(channel))

    # ---- what the hub asks of a subscriber ---------------------------------

    def subscribe(self, channel: str) -> asyncio.Future | None:
        link = self._link(channel)
        return link.subscribe(channel) if link is not None else None

    def unsubscribe(self, channel: str) -> None:
        link = self._link(channel)
        if link is not None:
            link.unsubscribe(channel)

    def pending(self, channel: str) -> asyncio.Future | None:
        link = self._link(channel)
        return link.pending(channel) if link is not None else None

    def confirmed(self, channel: str) -> bool:
        link = self._link(channel)
        return link is not None and link.confirmed(channel)

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._open(), name="rooms-sharded-subscriber")

    async def _open(self) -> None:
        backoff = 0.05
        while not self.slots.loaded:
            try:
                await self.slots.load()
            except redis.exceptions.ConnectionError as exc:
                log.debug("redis cluster slot map not read: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        for node in self.slots.masters():
            link = Subscriber(
                "", self._channels_of(node), self._on_message, self._on_confirmed,
                self._lost_of(node), node=(*node, self._address.auth), sharded=True)
            link.on_link = self._link_changed
            self._links[node] = link
            await link.start()
        log.info("redis cluster: sharded pub/sub over %d masters", len(self._links))

    def _channels_of(self, node: Node) -> Callable[[], list[str]]:
        return lambda: [c for c in self._channels() if self.slots.node_of(c) == node]

    def _lost_of(self, node: Node) -> Callable[[], None]:
        return lambda: self._on_lost(self._channels_of(node)())

    def _link_changed(self) -> None:
        if self._links and all(link.connected.is_set() for link in self._links.values()):
            self.connected.set()
        else:
            self.connected.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for link in self._links.values():
            await link.stop()
        await self.slots.close()
        self.connected.clear()

    # ---- fault injection (see Subscriber) -----------------------------------

    def hold_confirmations(self) -> list[str]:
        return [c for link in self._links.values() for c in link.hold_confirmations()]

    def release_confirmations(self) -> list[str]:
        return [c for link in self._links.values() for c in link.release_confirmations()]

    async def confirmation_held(self, channel: str) -> list[str]:
        link = self._link(channel)
        if link is None:
            raise ConnectionError("no link to the channel's master")
        return await link.confirmation_held(channel)

    def stay_away(self, away: bool) -> None:
        for link in self._links.values():
            link.stay_away(away)
