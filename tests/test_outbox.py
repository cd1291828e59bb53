"""server/outbox.py against the real Redis: commands queued in one loop turn
share a pipeline, keep their order, and fail cleanly."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from urllib.parse import urlsplit, urlunsplit
from redis.exceptions import ConnectionError as RedisConnectionError, ResponseError, TimeoutError as RedisTimeoutError

from server.outbox import Outbox, OutboxClosed, RedisUnavailable
from tests import booking_support
from tests.conftest import ServerProcess, free_port, ops_status, redis_writes_hung


@pytest.fixture
async def outbox(stack):
    box = Outbox(stack.redis_url)
    yield box
    await box.close()


async def test_groups_queued_in_one_turn_share_one_pipeline_and_get_their_own_replies(outbox, redis):
    keys = [f"outbox-test:{uuid.uuid4()}" for _ in range(20)]
    before = outbox.pipelines
    futures = [outbox.submit([("SET", k, i), ("INCR", k)]) for i, k in enumerate(keys)]
    replies = await asyncio.gather(*futures)
    assert outbox.pipelines == before + 1
    assert replies == [[b"OK", i + 1] for i in range(20)]
    assert [int(v) for v in await redis.mget(keys)] == [i + 1 for i in range(20)]
    await redis.delete(*keys)


async def test_commands_run_in_the_order_they_were_queued(outbox, redis):
    k = f"outbox-test:{uuid.uuid4()}"
    channel = f"outbox-test-channel:{uuid.uuid4()}"
    async with redis.pubsub() as sub:
        await sub.subscribe(channel)
        await sub.get_message(timeout=1.0)  # the subscribe confirmation
        # A write then a publish, as a call queues its write position and then
        # its events: whoever receives the publish can already read the write.
        first = outbox.submit([("SET", k, "written")])
        second = outbox.submit([("PUBLISH", channel, "event"), ("GET", k)])
        assert await first == [b"OK"]
        assert await second == [1, b"written"]
    await redis.delete(k)


async def test_an_error_of_one_command_is_returned_in_its_place(outbox, redis):
    k = f"outbox-test:{uuid.uuid4()}"
    await redis.set(k, "not a number")
    bad, good = await asyncio.gather(outbox.submit([("INCR", k)]), outbox.submit([("ECHO", "fine")]))
    assert isinstance(bad[0], ResponseError)
    assert good == [b"fine"]
    await redis.delete(k)


async def test_groups_queued_while_a_pipeline_is_in_flight_go_in_the_next_one(outbox):
    first = outbox.submit([("ECHO", "a")])
    await asyncio.sleep(0)  # the first pipeline is now being sent
    later = [outbox.submit([("ECHO", str(i))]) for i in range(5)]
    before = outbox.pipelines
    assert await first == [b"a"]
    assert await asyncio.gather(*later) == [[str(i).encode()] for i in range(5)]
    assert outbox.pipelines == before + 2


async def test_redis_unreachable_fails_the_groups_with_a_connection_error():
    box = Outbox(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        with pytest.raises((RedisConnectionError, OSError)):
            await box.submit([("PING",)])
        with pytest.raises((RedisConnectionError, OSError)):
            await box.submit([("PING",)])  # and the next one too, not a hang
    finally:
        await box.close()


async def test_a_closed_outbox_refuses_and_fails_what_it_still_held(stack):
    box = Outbox(stack.redis_url)
    held = box.submit([("PING",)])
    await box.close()  # before the loop turn that would have sent it
    with pytest.raises(OutboxClosed):
        await held
    with pytest.raises(OutboxClosed):
        await box.submit([("PING",)])


async def test_a_caller_that_gives_up_does_not_take_the_command_back(outbox, redis):
    k = f"outbox-test:{uuid.uuid4()}"
    fut = outbox.submit([("SET", k, "kept")])
    fut.cancel()  # e.g. the socket of the call closed
    assert await outbox.submit([("GET", k)]) == [b"kept"]
    await redis.delete(k)


async def test_a_hung_redis_is_waited_for_once_then_not_until_it_answers_a_probe(stack, redis):
    box = Outbox(stack.redis_url, timeout_s=0.3, probe_interval_s=0.05)
    seen_while_recovering: list[bool] = []

    async def on_recovered() -> None:
        seen_while_recovering.append(box.available)

    box.on_recovered = on_recovered
    try:
        async with redis_writes_hung(redis) as witness:
            with pytest.raises(RedisTimeoutError):  # the one wait: the socket timeout
                await box.submit([("PUBLISH", "outbox-test", "first")])
            assert not box.available
            with pytest.raises(RedisUnavailable):
                await box.submit([("PUBLISH", "outbox-test", "second")])
            # Refused while Redis still held every write: the refusal did not wait for it.
            assert not witness.done()
            assert seen_while_recovering == []  # the probes hang too
        await asyncio.wait_for(box.wait_available(), 10)
        # on_recovered ran once, before the outbox opened again.
        assert seen_while_recovering == [False]
        assert await box.submit([("ECHO", "back")]) == [b"back"]
        assert box.outages == 1
    finally:
        await box.close()


def _with(url: str, netloc: str | None = None, db: int | None = None) -> str:
    u = urlsplit(url)
    return urlunsplit((u.scheme, netloc or u.netloc, f"/{db}" if db is not None else u.path, "", ""))


async def test_the_database_of_the_url_is_the_one_written(stack):
    box = Outbox(_with(stack.redis_url, db=3))
    other = aioredis.from_url(_with(stack.redis_url, db=3))
    k = f"outbox-test:{uuid.uuid4()}"
    try:
        assert await box.submit([("SET", k, "in db 3")]) == [b"OK"]
        assert await other.get(k) == b"in db 3"
        await other.delete(k)
    finally:
        await box.close()
        await other.aclose()


async def test_a_refused_password_is_a_connection_error(stack):
    u = urlsplit(stack.redis_url)
    box = Outbox(_with(stack.redis_url, netloc=f":wrong@{u.hostname}:{u.port}"), timeout_s=1.0)
    try:
        with pytest.raises(RedisConnectionError, match="refused"):
            await box.submit([("PING",)])
    finally:
        await box.close()


async def test_an_empty_group_is_answered_at_once(outbox):
    assert await asyncio.gather(outbox.submit([]), outbox.submit([("ECHO", "x")])) == [[], [b"x"]]
    assert await outbox.submit([]) == []


# ---- a call's Redis writes, end to end ---------------------------------------


async def _pipelines(proc: ServerProcess) -> int:
    return (await ops_status(proc))["redis"]["pipelines"]


async def test_a_write_call_sends_its_write_position_and_its_events_in_one_round_trip(stack):
    """The write position (read-your-writes) and the events of a call are
    queued in one loop turn and go to Redis together; the reply waits for
    that one round trip, not for one after the other."""
    # Settlement only at start-up: nothing else of this process talks to Redis.
    proc = await ServerProcess(stack, SETTLEMENT_INTERVAL_S="3600").start()
    try:
        host_client, host_id = await booking_support.host(proc)
        booker_client, _ = await booking_support.booker(proc)

        before = await _pipelines(proc)
        booking = await booking_support.book(booker_client, host_id, booking_support.slot(days=3))
        assert (await host_client.next_event("booking.created"))["booking"]["id"] == booking["id"]
        assert (await booker_client.next_event("booking.created"))["booking"]["id"] == booking["id"]
        await booker_client.next_event("wallet.updated")
        assert await _pipelines(proc) == before + 1

        before = await _pipelines(proc)
        await booker_client.call("wallet.topup", {"amount": "5.00", "idempotency_key": booking_support.key()})
        await booker_client.next_event("wallet.updated")
        assert await _pipelines(proc) == before + 1
        await host_client.close()
        await booker_client.close()
    finally:
        await proc.stop()
