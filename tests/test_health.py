"""/healthz and /readyz (its details from /status on the metrics port), and
what a client sees when the primary or Redis is unreachable.

The primary is made unreachable for one server process only, by putting a
TCP relay (``PrimaryLink``) between that process and the real primary (or
PgBouncer, when the stack has one): the rest of the stack, and every other
process, keeps running.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from protocol.errors import RpcError
from tests.conftest import (ServerProcess, ops_status, port_of, post_kyc, readyz, register, until_not_ready,
                            wait_subscriber_connected)


async def wait_until_ready(server: ServerProcess, timeout: float = 15.0) -> dict:
    """Bounded poll: readiness is a state, there is no event to await."""
    deadline = time.monotonic() + timeout
    while True:
        status, _ = await readyz(server)
        body = await ops_status(server)
        if status == 200 and all(r["ok"] for r in body["replicas"]):
            return body
        assert time.monotonic() < deadline, f"not ready again: {body}"
        await asyncio.sleep(0.1)


class PrimaryLink:
    """A TCP relay to the primary that a test can cut.

    ``silence()``: the primary stops answering (connections stay open,
    nothing is forwarded, new connections are accepted and never served).
    ``sever()``: the primary is down (every connection is reset and new ones
    are refused). ``restore()``: traffic flows again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> "PrimaryLink":
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, database_url: str) -> str:
        return database_url.replace(f":{self.target_port}/", f":{self.port}/")

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        await self._flowing.wait()
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.add(up_w)
        for src, dst in ((client_r, up_w), (up_r, client_w)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()

    def silence(self) -> None:
        self._flowing.clear()

    async def sever(self) -> None:
        self._flowing.clear()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        if self._server is None or not self._server.is_serving():
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self._flowing.set()

    async def close(self) -> None:
        await self.sever()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture(scope="module")
async def link(stack):
    link = await PrimaryLink(port_of(stack.database_url)).start()
    yield link
    await link.close()


@pytest.fixture(scope="module")
async def linked_server(stack, link):
    """A server process that reaches the primary through ``link`` only."""
    proc = await ServerProcess(stack, DATABASE_URL=link.url(stack.database_url)).start()
    yield proc
    await link.restore()
    await proc.stop()


# ---- health ----------------------------------------------------------------


async def test_healthz_answers_ok_without_touching_dependencies(server):
    async with aiohttp.ClientSession() as s:
        async with s.get(server.http + "/healthz") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok"}


async def test_readyz_and_status_report_primary_each_replica_with_its_lag_and_redis(server, stack):
    status, public = await readyz(server)
    assert status == 200
    assert public == {"ready": True, "checks": {"primary": True, "replicas": True, "redis": True}}
    body = await ops_status(server)
    assert body["ready"] is True and body["checks"] == public["checks"]
    assert body["primary"]["ok"] is True and body["primary"]["waiting"] == 0
    assert set(body["primary"]["merged_writes"]) == {"batches", "calls", "failed", "waiting"}
    assert body["redis"]["ok"] is True
    assert len(body["replicas"]) == len(stack.replica_urls)
    for replica in body["replicas"]:
        assert replica["ok"] is True
        assert isinstance(replica["lag_bytes"], int) and replica["lag_bytes"] >= 0
        assert replica["error"] is None
        assert f":{port_of(stack.replica_urls[0])}/" in replica["url"]
        assert "@" not in replica["url"]  # no credentials in a health page
    assert isinstance(body["pid"], int)


async def test_readyz_is_503_while_redis_is_unreachable(server, server2, stack):
    await asyncio.to_thread(stack.stop_redis)
    try:
        body = await until_not_ready(server)
        details = await ops_status(server)
        assert body["checks"]["redis"] is False and details["redis"]["ok"] is False
        assert details["primary"]["ok"] is True
    finally:
        await asyncio.to_thread(stack.start_redis)
    await wait_until_ready(server)
    # Both session servers have their hub back before the next test: a user
    # channel subscribed while a hub reconnects would miss events.
    for s in (server, server2):
        await wait_subscriber_connected(s)


async def test_readyz_is_503_while_the_primary_does_not_answer(linked_server, link):
    await wait_until_ready(linked_server)
    link.silence()
    try:
        body = await until_not_ready(linked_server)
        details = await ops_status(linked_server)
        assert body["checks"]["primary"] is False and details["primary"]["ok"] is False
        assert body["checks"]["redis"] is True
    finally:
        await link.restore()
    await wait_until_ready(linked_server)


async def test_readyz_is_503_while_the_primary_is_down(linked_server, link):
    await wait_until_ready(linked_server)
    await link.sever()
    try:
        body = await until_not_ready(linked_server)
        details = await ops_status(linked_server)
        assert body["checks"]["primary"] is False and details["primary"]["ok"] is False
    finally:
        await link.restore()
    await wait_until_ready(linked_server)


# ---- writes without a primary ----------------------------------------------


@pytest.mark.parametrize("outage", ["does_not_answer", "is_down"])
async def test_a_write_while_the_primary_is_unreachable_is_unavailable_within_5s(linked_server, link, outage):
    async with await linked_server.connect() as c:
        await register(c)
        if outage == "does_not_answer":
            link.silence()
        else:
            await link.sever()
        try:
            started = time.monotonic()
            with pytest.raises(RpcError) as err:
                await c.call("users.update", {"name": "Never Stored"})
            assert err.value.code == "unavailable"
            assert time.monotonic() - started < 5
        finally:
            await link.restore()
        # Nothing is broken for good: once the primary answers, writes work.
        await wait_until_ready(linked_server)
        assert (await c.call("users.update", {"name": "Stored"}))["name"] == "Stored"


async def test_the_kyc_webhook_answers_503_while_the_primary_is_down(linked_server, link):
    async with await linked_server.connect() as c:
        user_id = (await register(c))["user"]["id"]
        await link.sever()
        try:
            resp = await post_kyc(linked_server, user_id, "verified")
            assert resp.status == 503
        finally:
            await link.restore()
        await wait_until_ready(linked_server)
        # The provider's retry then lands.
        assert (await post_kyc(linked_server, user_id, "verified")).status == 200
        assert (await c.next_event("user.updated"))["user"]["kyc_status"] == "verified"
