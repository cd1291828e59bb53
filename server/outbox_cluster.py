"""The outbox (server/outbox.py) on a Redis Cluster.

Each pipeline is split by the master that owns each command's key (or
channel), with one connection per master, and the parts go out at once.
``PUBLISH`` becomes ``SPUBLISH``: a sharded channel costs only the master
that owns it, not every node of the cluster.

Order across masters: a call's write position and its events may live on
different masters, and the position must be recorded before a client can
see the event (a read on it must find the write). So a pipeline that spans
more than one master sends its other commands first and its publishes once
those are answered; one that stays on one master is sent as one, in order.
A command answered ``MOVED`` (its slot moved to another master) is sent
there once more at once, and the slot map is read again meanwhile; one
answered ``ASK`` (its slot is being moved, and its key is already on the
master it is moving to) is sent there once, after ``ASKING``.
Availability is the whole cluster's: a master that does not answer closes
the outbox, and the probe asks every master.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import redis.exceptions

from server.outbox import PROBE_CHANNEL, UNREACHABLE, Command, Outbox, _Wire, exchange, open_wire
from server.redis_cluster import ClusterAddress, Node, SlotMap, routing_key, slot_of


def _sharded(command: Command) -> Command:
    return ("SPUBLISH", *command[1:]) if command[0] == "PUBLISH" else command


class ClusterOutbox(Outbox):
    def _address(self, redis_url: str) -> None:
        address = ClusterAddress(redis_url)
        self._hello = [address.auth] if address.auth else []
        self._wires: dict[Node, _Wire] = {}
        self._locks: dict[Node, asyncio.Lock] = {}
        self.slots: SlotMap | None = None
        self._cluster = address

    def _slot_map(self) -> SlotMap:
        if self.slots is None:
            self.slots = SlotMap(self._cluster, self._timeout)
        return self.slots

    async def _wire_to(self, node: Node) -> _Wire:
        wire = self._wires.get(node)
        if wire is not None and not wire.closed:
            return wire
        async with self._locks.setdefault(node, asyncio.Lock()):
            wire = self._wires.get(node)
            if wire is None or wire.closed:
                wire = self._wires[node] = await open_wire(*node, self._hello, self._timeout)
            return wire

    async def _send_to(self, node: Node, commands: list[Command]) -> list[Any]:
        try:
            return await exchange(await self._wire_to(node), commands, self._timeout)
        except UNREACHABLE:
            self._slot_map().refresh_soon()  # the master may have failed over
            raise

    async def _roundtrip(self, commands: Sequence[Command]) -> list[Any]:
        if not commands:
            return []
        slots = self._slot_map()
        if not slots.loaded:
            await slots.load()
        sharded = [_sharded(c) for c in commands]
        nodes = [slots.node_of(routing_key(c)) for c in sharded]
        if len(set(nodes)) == 1:
            results = await self._send_to(nodes[0], sharded)
        else:
            results = [None] * len(sharded)
            writes = [i for i, c in enumerate(sharded) if c[0] != "SPUBLISH"]
            publishes = [i for i, c in enumerate(sharded) if c[0] == "SPUBLISH"]
            for phase in (writes, publishes):
                await self._phase(sharded, nodes, phase, results)
        moved = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.ResponseError)
                 and str(r).startswith(("MOVED", "ASK"))]
        if moved:
            # Only a MOVED says the map is out of date: during a slot's move
            # the map still names the master it leaves, rightly.
            if any(str(results[i]).startswith("MOVED") for i in moved):
                slots.refresh_soon()
            await self._follow_moved(sharded, moved, results)
        return results

    async def _follow_moved(self, commands: list[Command], moved: list[int], results: list[Any]) -> None:
        """Send each command answered ``MOVED slot host:port`` or ``ASK slot
        host:port`` once more, to the master named (after a MOVED the slot
        map catches up in the background). An ``ASK``ed command goes right after an
        ``ASKING``, which lets the master that is importing the slot answer
        that one command; the replies to the ``ASKING``s are dropped."""
        by_node: dict[Node, list[tuple[int, bool]]] = {}
        for i in moved:
            kind, _, where = str(results[i]).split(" ")[:3]
            host, _, port = where.rpartition(":")
            by_node.setdefault((host, int(port)), []).append((i, kind == "ASK"))
        for node, ids in by_node.items():
            sent = [c for i, asked in ids for c in ((("ASKING",), commands[i]) if asked else (commands[i],))]
            replies = iter(await self._send_to(node, sent))
            for i, asked in ids:
                if asked:
                    next(replies)
                results[i] = next(replies)

    async def _phase(self, commands: list[Command], nodes: list[Node], indexes: list[int],
                     results: list[Any]) -> None:
        by_node: dict[Node, list[int]] = {}
        for i in indexes:
            by_node.setdefault(nodes[i], []).append(i)
        parts = list(by_node.items())
        replies = await asyncio.gather(*(self._send_to(node, [commands[i] for i in ids]) for node, ids in parts),
                                       return_exceptions=True)
        for (_, ids), got in zip(parts, replies):
            if isinstance(got, BaseException):
                raise got
            for i, reply in zip(ids, got):
                results[i] = reply

    async def _probe_once(self) -> None:
        slots = self._slot_map()
        await slots.load()  # a master may have changed meanwhile
        masters = slots.masters()
        replies = await asyncio.gather(
            *(self._send_to(node, [("SPUBLISH", _probe_channel(slots, node), b"")]) for node in masters),
            return_exceptions=True)
        for got in replies:
            if isinstance(got, BaseException):
                raise got

    def _abort_wires(self, exc: BaseException) -> None:
        for wire in self._wires.values():
            wire.abort(exc)

    async def close(self) -> None:
        await super().close()
        if self.slots is not None:
            await self.slots.close()


def _probe_channel(slots: SlotMap, node: Node) -> str:
    """A probe channel that lives on ``node`` (a hash tag picks its slot)."""
    for i in range(100_000):
        channel = f"{PROBE_CHANNEL}{{{i}}}"
        if slots.node_of(channel) == node:
            return channel
    return f"{PROBE_CHANNEL}{{{slot_of(PROBE_CHANNEL)}}}"
