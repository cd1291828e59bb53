"""Redis Cluster (``REDIS_URL=redis+cluster://...``): fan-out over sharded
pub/sub on every master, the outbox split by master, and the URL checked at
start. The cluster tests run with ``make test-cluster`` (the dev stack's
three masters); the URL check runs everywhere."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from server import redis_cluster
from server.config import Config, ConfigError
from server.outbox_cluster import ClusterOutbox
from server.redis_cluster import ClusterAddress, SlotMap, slot_of
from server.rooms.sharded import ShardedSubscriber
from tests.chat_helpers import collect_messages, messages_until, open_room, subscriber_count, wait_subscribers
from tests.conftest import ON_CLUSTER, wait_subscriber_connected

on_cluster = pytest.mark.skipif(not ON_CLUSTER, reason="needs the dev stack's Redis Cluster (make test-cluster)")


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://127.0.0.1:notaport"])
def test_a_malformed_cluster_url_stops_the_server_naming_redis_url(monkeypatch, url):
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Config.from_env()


def test_a_cluster_url_names_its_seed_nodes_and_credentials():
    address = ClusterAddress("redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2,10.0.0.3:7002")
    assert address.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("10.0.0.3", 7002)]
    assert address.auth == ("AUTH", "app", "s@cret")


async def channels_on_every_master(slots: SlotMap, prefix: str) -> dict[tuple[str, int], str]:
    """One channel named ``prefix`` + a uuid per master."""
    found: dict[tuple[str, int], str] = {}
    for _ in range(1000):  # three masters: a handful of draws each
        channel = f"{prefix}{uuid.uuid4()}"
        found.setdefault(slots.node_of(channel), channel)
        if len(found) == len(slots.masters()):
            return found
    raise AssertionError(f"no channel found on some master: {found}")


@on_cluster
async def test_one_pipeline_across_masters_gets_its_replies_in_place_and_reaches_sharded_subscribers(stack, redis):
    box = ClusterOutbox(stack.redis_url)
    keys: dict = {}
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    followed: list[str] = []
    sub = ShardedSubscriber(stack.redis_url, lambda: followed, lambda c, p: got.put_nowait((c, p)),
                            lambda c: None, lambda channels: None)
    await sub.start()
    try:
        await asyncio.wait_for(sub.connected.wait(), 10)
        assert len(sub.slots.masters()) == 3
        channels = await channels_on_every_master(sub.slots, "cluster-test:")
        keys = await channels_on_every_master(sub.slots, "cluster-test-key:")
        for channel in channels.values():
            followed.append(channel)
            assert await asyncio.wait_for(sub.subscribe(channel), 5) is True
        # A write on each master then a publish on each, in one submit: each
        # reply comes back in its command's place.
        commands = [("SET", k, "written") for k in keys.values()]
        commands += [("PUBLISH", c, c.encode()) for c in channels.values()]
        replies = await box.submit(commands)
        assert replies == [b"OK"] * 3 + [1] * 3
        received = {}
        for _ in channels:
            channel, payload = await asyncio.wait_for(got.get(), 5)
            received[channel] = payload
        assert received == {c: c.encode() for c in channels.values()}
        for channel in channels.values():
            assert await subscriber_count(redis, channel) == 1  # sharded, on its own master
    finally:
        await sub.stop()
        await box.close()
        if keys:
            await redis.delete(*keys.values())


@on_cluster
async def test_a_write_to_a_slot_being_moved_follows_ask_to_the_master_importing_it(stack):
    """While a slot moves between masters (``redis-cli --cluster reshard``),
    the master it leaves answers ``ASK`` for a key it no longer holds: the
    outbox sends the command there after ``ASKING``, so a write position
    (an EVAL on ``ryw:<user>``) is recorded and not left an error in its
    place. The other commands of the pipeline keep their places."""
    slots = SlotMap(ClusterAddress(stack.redis_url), 2.0)
    await slots.load()
    key = f"cluster-test-ask:{uuid.uuid4()}"
    slot = slot_of(key)
    source = slots.node_of(key)
    target = next(node for node in slots.masters() if node != source)
    other = f"cluster-test-key:{uuid.uuid4()}"
    # One connection each: ASKING holds for the next command on its connection only.
    src = aioredis.Redis(host=source[0], port=source[1], single_connection_client=True)
    dst = aioredis.Redis(host=target[0], port=target[1], single_connection_client=True)
    box = ClusterOutbox(stack.redis_url)
    src_id, dst_id = (await src.execute_command("CLUSTER", "MYID")), (await dst.execute_command("CLUSTER", "MYID"))
    await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    try:
        replies = await box.submit([("SET", other, "stays"), ("SET", key, "moved"), ("GET", other)])
        assert replies == [b"OK", b"OK", b"stays"]
        assert await src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        await dst.execute_command("ASKING")
        assert await dst.get(key) == b"moved"
    finally:
        await dst.execute_command("ASKING")
        await dst.delete(key)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        await box.close()
        await slots.close()
        for conn in (src, dst):
            await conn.aclose()
        cleanup = redis_cluster.client(stack.redis_url, 5.0)
        await cleanup.delete(other)
        await cleanup.aclose()


@on_cluster
async def test_rooms_on_every_master_deliver_across_processes_over_sharded_pub_sub(stack, server, server2, redis):
    slots = SlotMap(ClusterAddress(stack.redis_url), 2.0)
    await slots.load()
    rooms = {}
    try:
        for _ in range(30):  # each room lands on one of three masters
            room = await open_room(server, server2)
            node = slots.node_of(f"c:{room.conversation_id}")
            if node in rooms:
                await room.close()
                continue
            rooms[node] = room
            if len(rooms) == 3:
                break
        assert len(rooms) == 3, "rooms did not cover every master"
        for room in rooms.values():
            conv = room.conversation_id
            await room.booker.client.call("chat.join", {"conversation_id": conv})
            await room.host.client.call("chat.join", {"conversation_id": conv})
            await wait_subscribers(redis, f"c:{conv}", 2)  # one per process
            # Nothing on the classic pub/sub of any node: fan-out is sharded.
            numsub = await redis.execute_command("PUBSUB", "NUMSUB", f"c:{conv}", target_nodes=RedisCluster.ALL_NODES)
            assert all(reply[1] == 0 for reply in numsub.values()), numsub
        for room in rooms.values():
            sent = await room.host.client.call("chat.send", {"conversation_id": room.conversation_id,
                                                             "content": "across masters"})
            seq = sent["message"]["seq"]
            assert (await messages_until(room.booker.client, seq))[-1] == seq
    finally:
        for room in rooms.values():
            await room.close()


@on_cluster
async def test_the_cluster_client_connects_again_after_every_node_failed_it(stack):
    """redis-py drops each node that failed a command from the nodes it
    starts from (a cluster restart, a pause longer than the timeout fails
    them all); the client of server/redis_cluster.py starts again from the
    nodes of REDIS_URL."""
    client = redis_cluster.client(stack.redis_url, 2.0)
    try:
        assert await client.ping()
        client.nodes_manager.startup_nodes.clear()  # what failures on every node leave
        await client.aclose()  # as redis-py does after a failure: start again on the next command
        assert await client.set(f"cluster-test:{uuid.uuid4()}", 1, ex=10)
    finally:
        await client.aclose()


async def move_slot(redis: RedisCluster, slot: int, source: ClusterNode, target: ClusterNode) -> None:
    """Move ``slot`` and its keys from ``source`` to ``target`` the way
    ``redis-cli --cluster reshard`` does, then tell every master."""
    source_id = await redis.execute_command("CLUSTER", "MYID", target_nodes=source)
    target_id = await redis.execute_command("CLUSTER", "MYID", target_nodes=target)
    await redis.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id, target_nodes=target)
    await redis.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id, target_nodes=source)
    for _ in range(1000):  # a slot holds a few keys of the tests at most
        keys = await redis.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100, target_nodes=source)
        if not keys:
            break
        await redis.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys,
                                    target_nodes=source)
    for node in [target, source, *(n for n in redis.get_primaries() if n.name not in (source.name, target.name))]:
        await redis.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id, target_nodes=node)


async def until_shard_subscribers(redis: RedisCluster, channel: str, node: ClusterNode, expected: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # a bounded poll: nothing outside the servers announces a subscription
        reply = await redis.execute_command("PUBSUB", "SHARDNUMSUB", channel, target_nodes=node)
        if reply[1] == expected:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{channel} on {node.name}: {reply[1]} subscribers"
        await asyncio.sleep(0.05)


@on_cluster
async def test_a_room_whose_slot_moves_to_another_master_keeps_delivering_across_processes(stack, server, server2,
                                                                                          redis):
    await redis.initialize()
    room = await open_room(server, server2)
    conv = room.conversation_id
    channel = f"c:{conv}"
    source = redis.get_node_from_key(channel)
    target = next(n for n in redis.get_primaries() if n.name != source.name)
    moved = False
    try:
        await room.booker.client.call("chat.join", {"conversation_id": conv})
        await room.host.client.call("chat.join", {"conversation_id": conv})
        await until_shard_subscribers(redis, channel, source, 2)  # one per process
        await move_slot(redis, slot_of(channel), source, target)
        moved = True
        # The old master dropped both processes' subscriptions; each made it
        # again on the new one, and the message goes there.
        await until_shard_subscribers(redis, channel, target, 2)
        sent = await room.host.client.call("chat.send", {"conversation_id": conv, "content": "after the move"})
        seq = sent["message"]["seq"]
        assert (await messages_until(room.booker.client, seq))[-1] == seq
    finally:
        if moved:
            await move_slot(redis, slot_of(channel), target, source)
        await room.close()


@on_cluster
async def test_a_command_answered_moved_is_sent_to_the_new_master_at_once(stack, redis):
    await redis.initialize()
    box = ClusterOutbox(stack.redis_url)
    key = f"cluster-test:{uuid.uuid4()}"
    source = redis.get_node_from_key(key)
    target = next(n for n in redis.get_primaries() if n.name != source.name)
    moved = False
    try:
        assert await box.submit([("SET", key, "before")]) == [b"OK"]  # the outbox has read the slot map
        await move_slot(redis, slot_of(key), source, target)
        moved = True
        assert await box.submit([("GET", key), ("SET", key, "after")]) == [b"before", b"OK"]
        assert await redis.execute_command("GET", key, target_nodes=target) == b"after"
    finally:
        if moved:
            await move_slot(redis, slot_of(key), target, source)
        await redis.delete(key)
        await box.close()


@on_cluster
async def test_one_master_restarting_empty_loses_no_acknowledged_message_on_it_or_elsewhere(stack, server, server2):
    """The master of one room restarts (without data, like every master
    here); another room lives on another master. Calls commit meanwhile,
    and afterwards every socket has every message once, in both rooms."""
    slots = SlotMap(ClusterAddress(stack.redis_url), 2.0)
    await slots.load()
    rooms: list = []
    try:
        rooms.append(await open_room(server, server2))
        restarted = slots.node_of(f"c:{rooms[0].conversation_id}")
        for _ in range(20):  # two masters in three do not host the first room
            room = await open_room(server, server2)
            if slots.node_of(f"c:{room.conversation_id}") != restarted:
                rooms.append(room)
                break
            await room.close()
        assert len(rooms) == 2, "no room found on another master"
        for room in rooms:
            for party in (room.booker, room.host):
                await party.client.call("chat.join", {"conversation_id": room.conversation_id})
        node = next(n for n in stack.cluster_redis.nodes if n.port == restarted[1])
        try:
            await asyncio.to_thread(node.stop)
            for room in rooms:  # calls commit and answer while the master is away
                for i in range(3):
                    await room.host.client.call("chat.send", {"conversation_id": room.conversation_id,
                                                              "content": f"during {i}"})
        finally:
            await asyncio.to_thread(stack.start_redis)  # the node, then the cluster's state ok
        for s in (server, server2):
            await wait_subscriber_connected(s)
        for room in rooms:
            await room.host.client.call("chat.send", {"conversation_id": room.conversation_id, "content": "after"})
        for room in rooms:
            seqs = await collect_messages(room.booker.client, 4)
            assert sorted(seqs) == [1, 2, 3, 4], seqs
    finally:
        for room in rooms:
            await room.close()
