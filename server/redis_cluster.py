"""Redis Cluster: where each key and channel lives, and the redis-py client.

``REDIS_URL=redis+cluster://[user:password@]host:port,host:port,...`` names
some nodes of a cluster (any of them will do: the rest are found from
them). The process then spreads its Redis work over the cluster's masters:

- fan-out uses sharded pub/sub (``SPUBLISH`` / ``SSUBSCRIBE``): a channel
  lives on the master that owns its key slot, so publishing and subscribing
  cost only that master (server/outbox_cluster.py, server/rooms/sharded.py);
- write positions and rate limits are single keys, spread by slot;
- presence keeps all its keys under one hash tag, ``{presence}``, since its
  scripts change many users' keys atomically (server/presence.py).

The outbox and the pub/sub links each read the slot map (``SlotMap``) when
they start and again when the cluster shows it changed: a ``MOVED`` reply,
a channel unsubscribed by its master, a node that stops answering
(docs/operations.md, "Redis Cluster").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence
from urllib.parse import unquote, urlparse

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

log = logging.getLogger("hangout.redis")

SCHEME = "redis+cluster"
Node = tuple[str, int]


def is_cluster(redis_url: str) -> bool:
    return redis_url.startswith(SCHEME + "://")


class ClusterAddress:
    """The seed nodes and credentials of a ``redis+cluster://`` URL."""

    __slots__ = ("nodes", "username", "password", "auth")

    def __init__(self, redis_url: str) -> None:
        rest = redis_url[len(SCHEME) + 3:]
        userinfo, _, hosts = rest.rpartition("@")
        hosts = hosts.split("/", 1)[0].split("?", 1)[0]
        self.nodes: list[Node] = []
        for part in filter(None, hosts.split(",")):
            url = urlparse(f"redis://{part}")
            self.nodes.append((url.hostname or "127.0.0.1", url.port or 6379))
        if not self.nodes:
            raise ValueError("names no node")
        user, _, password = userinfo.partition(":")
        self.username, self.password = unquote(user), unquote(password)
        self.auth: tuple[str, ...] | None = (
            ("AUTH", *([self.username] if self.username else []), self.password) if self.password else None)


def client(redis_url: str, timeout_s: float) -> aioredis.Redis:
    """redis-py's client for ``REDIS_URL``: a ``RedisCluster`` on a cluster
    (it routes each command by its key's slot), else a plain ``Redis``."""
    if not is_cluster(redis_url):
        return aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                 health_check_interval=0, max_connections=256)
    address = ClusterAddress(redis_url)
    return _SeededCluster(startup_nodes=[ClusterNode(h, p) for h, p in address.nodes],
                        username=address.username or None, password=address.password or None,
                        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                        max_connections=256)  # type: ignore[return-value]


class _SeededCluster(RedisCluster):
    """redis-py forgets each node that failed a command as a node to start
    from; once every node has failed (the whole cluster restarted) it could
    never connect again. The nodes of ``REDIS_URL`` are put back before each
    new start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seeds = dict(self.nodes_manager.startup_nodes)

    async def initialize(self) -> "RedisCluster":
        if self._initialize:
            for name, node in self._seeds.items():
                self.nodes_manager.startup_nodes.setdefault(name, node)
        return await super().initialize()


def slot_of(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def routing_key(command: Sequence[Any]) -> Any:
    """The key (or sharded channel) that decides where ``command`` goes:
    the first key of an ``EVAL``/``EVALSHA``, else its first argument."""
    name = command[0].upper() if isinstance(command[0], str) else command[0].decode().upper()
    if name in ("EVAL", "EVALSHA"):
        return command[3] if int(command[2]) > 0 else None
    return command[1] if len(command) > 1 else None


class SlotMap:
    """Which master owns each of the 16384 slots, from ``CLUSTER SLOTS``."""

    def __init__(self, address: ClusterAddress, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._owner: list[Node] = []
        self._refreshing: asyncio.Task | None = None

    @property
    def loaded(self) -> bool:
        return bool(self._owner)

    def node_of(self, key: Any) -> Node:
        if key is None:
            return self._owner[0]
        return self._owner[slot_of(key if isinstance(key, (str, bytes)) else str(key))]

    def snapshot(self) -> list[Node]:
        """The owner of each slot now, to compare with after a ``load``."""
        return list(self._owner)

    def masters(self) -> list[Node]:
        return list(dict.fromkeys(self._owner))

    async def load(self) -> None:
        """Read the map from the first node that answers with every slot
        assigned (known masters first, then the seeds). A node that has just
        started may not know the others' slots yet: its map is not taken."""
        last: BaseException | None = None
        for host, port in dict.fromkeys([*self.masters(), *self.address.nodes]):
            try:
                async with asyncio.timeout(self.timeout_s):
                    slots = await _ask((host, port), self.address.auth, ("CLUSTER", "SLOTS"))
            except (OSError, asyncio.TimeoutError, redis.exceptions.RedisError) as exc:
                last = exc
                continue
            owner: list[Node | None] = [None] * 16384
            for start, end, master, *_ in slots:
                node = (master[0].decode() or host, int(master[1]))
                owner[start:end + 1] = [node] * (end - start + 1)
            if None in owner:
                last = redis.exceptions.ConnectionError(f"{host}:{port} does not know every slot's master yet")
                continue
            self._owner = owner  # type: ignore[assignment]
            return
        raise redis.exceptions.ConnectionError(f"no cluster node answers CLUSTER SLOTS: {last!r}")

    def refresh_soon(self) -> None:
        """Read the map again in the background (after ``MOVED`` or a lost
        node); one read at a time."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh(), name="redis-slots")

    async def _refresh(self) -> None:
        try:
            await self.load()
        except redis.exceptions.ConnectionError as exc:
            log.warning("redis cluster: slot map not refreshed: %r", exc)

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)


async def _ask(node: Node, auth: tuple[str, ...] | None, command: tuple[Any, ...]) -> Any:
    reader, writer = await asyncio.open_connection(*node)
    try:
        commands = [*([auth] if auth else []), command]
        writer.write(b"".join(map(hiredis.pack_command, commands)))
        parser = hiredis.Reader(replyError=redis.exceptions.ResponseError)
        replies: list[Any] = []
        while len(replies) < len(commands):
            data = await reader.read(65536)
            if not data:
                raise redis.exceptions.ConnectionError("redis closed the connection")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[-1]
    finally:
        writer.close()
