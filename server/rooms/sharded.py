"""The process's pub/sub links to a Redis Cluster: sharded pub/sub, one
``Subscriber`` (server/rooms/subscriber.py) per master, each subscribing
the channels whose slot that master owns. To the hub it looks like one
subscriber: ``connected`` is set while every master's link is up, and a
lost link marks only that master's channels as possibly having missed
messages.

The masters come from the cluster's slot map, read (and retried) when the
subscriber starts; until it is read, subscriptions wait, as they do for a
single Redis that is away, and are made when the links come up. When a
master unsubscribes a channel we still follow (its slot moved away) or
refuses a subscription, the map is read again: the channels whose master
changed are subscribed on their new master (a link is opened to a master
not seen before) and repaired from PostgreSQL once confirmed. While a
master's link is down the map is read every second, so that a replica
promoted in its place is followed the same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

import redis.exceptions

from server.redis_cluster import ClusterAddress, Node, SlotMap, slot_of
from server.rooms.subscriber import CONNECT_TIMEOUT_S, Subscriber

log = logging.getLogger("hangout.rooms")

WATCH_INTERVAL_S = 1.0  # how often the slot map is read while a master's link is down


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
        self._remapping: asyncio.Task | None = None
        self._remap_again = False
        self._watches: dict[Node, asyncio.Task] = {}
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
            await self._open_link(node)
        log.info("redis cluster: sharded pub/sub over %d masters", len(self._links))

    async def _open_link(self, node: Node) -> None:
        link = Subscriber(
            "", self._channels_of(node), self._on_message, self._on_confirmed,
            self._lost_of(node), node=(*node, self._address.auth), sharded=True)
        link.on_link = self._link_changed
        link.on_dropped = self._dropped
        self._links[node] = link
        await link.start()

    # ---- following the slot map --------------------------------------------

    def _dropped(self, channel: str | None) -> None:
        if channel is not None and channel not in self._channels():
            return  # our own unsubscribe
        if self._remapping is not None and not self._remapping.done():
            self._remap_again = True  # the map may have changed again meanwhile
            return
        self._remapping = asyncio.get_running_loop().create_task(self._remap(), name="rooms-sharded-remap")

    async def _remap(self) -> None:
        while True:
            self._remap_again = False
            before = self.slots.snapshot()
            try:
                await self.slots.load()
            except redis.exceptions.ConnectionError as exc:
                log.debug("redis cluster: slot map not read again: %r", exc)
                return
            await self._follow_moves(before)
            if not self._remap_again:
                return

    async def _follow_moves(self, before: list[Node]) -> None:
        masters = self.slots.masters()
        for node in masters:
            if node not in self._links:
                await self._open_link(node)
        moved = [c for c in self._channels() if before[slot_of(c)] != self.slots.node_of(c)]
        if moved:
            log.warning("redis cluster: %d channels moved to another master", len(moved))
            self._on_lost(moved)  # what was published meanwhile is fetched back once confirmed
        for channel in moved:
            link = self._link(channel)
            if link is not None:
                link.subscribe(channel)  # else subscribed when its link comes up
        for node in [n for n in self._links if n not in masters]:
            await self._links.pop(node).stop()
        self._link_changed()

    def _channels_of(self, node: Node) -> Callable[[], list[str]]:
        return lambda: [c for c in self._channels() if self.slots.node_of(c) == node]

    def _lost_of(self, node: Node) -> Callable[[], None]:
        def lost() -> None:
            self._on_lost(self._channels_of(node)())
            watch = self._watches.get(node)
            if node in self._links and (watch is None or watch.done()):
                self._watches[node] = asyncio.get_running_loop().create_task(
                    self._while_down(node), name="rooms-sharded-watch")
        return lost

    async def _while_down(self, node: Node) -> None:
        """A master that stays away may have been replaced by its replica
        (a failover): read the map again every second until its link is back
        or the map no longer lists it (its channels then move)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            link = self._links.get(node)
            if link is None or link.connected.is_set():
                return
            self._dropped(None)

    def _link_changed(self) -> None:
        if self._links and all(link.connected.is_set() for link in self._links.values()):
            self.connected.set()
        else:
            self.connected.clear()

    async def stop(self) -> None:
        for task in (self._remapping, self._task, *self._watches.values()):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        links, self._links = self._links, {}  # no watch starts for links stopped here
        for link in links.values():
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
