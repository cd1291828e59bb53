"""Methods that exist only in test servers (``tests/server_with_test_methods.py``,
which imports this module). They reach dispatcher paths that no real method
may reach on purpose. Being outside the contract, each declares its own
``MethodSpec`` (``test_only``)."""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel

from protocol.errors import ErrorCode, RpcError
from protocol.methods import MethodSpec
from protocol.models.common import Params
from server.rpc import Call, Handler, rpc


def test_only(name: str, params: type[BaseModel]) -> Callable[[Handler], Handler]:
    """Register a test-only method: no auth needed, a plain dict for a result."""
    return rpc(MethodSpec(name, params, dict, auth=False))


class CrashParams(Params):
    pass


@test_only("test.crash", CrashParams)
async def crash(call: Call, p: CrashParams) -> dict:
    """A handler with a bug: the dispatcher must answer ``internal`` with a
    correlation id, log it, and keep the socket."""
    raise RuntimeError("deliberate bug for the internal-error test")


class SocketsParams(Params):
    pass


@test_only("test.sockets", SocketsParams)
async def sockets(call: Call, p: SocketsParams) -> dict:
    """The process's sockets as the outgoing side sees them, by user."""
    return {
        "sockets": [
            {"user_id": str(c.user_id), **c.stats()}
            for c in call.services.connections if c.user_id is not None
        ]
    }


class FailParams(Params):
    fail: bool


@test_only("test.fail_position_lookups", FailParams)
async def fail_position_lookups(call: Call, p: FailParams) -> dict:
    """Fault injection: while on, reading the primary's WAL position after a
    commit fails as if the primary had stopped answering just then."""
    from server.db.pools import _Batcher

    async def unavailable(_keys: list, _required: int) -> dict:
        raise RpcError(ErrorCode.UNAVAILABLE, "injected by test.fail_position_lookups")

    call.services.db._heads = _Batcher(unavailable, max_running=1) if p.fail else None
    return {}


@test_only("test.fail_merged_writes", FailParams)
async def fail_merged_writes(call: Call, p: FailParams) -> dict:
    """Fault injection: while on, every merged batch of bookings.create calls
    (two or more) fails in the database, as a deadlock would end it."""
    from server.db import bookings as bookings_db
    from server.db.pools import _WriteBatcher

    async def failing(conn, _calls: list) -> None:
        await conn.execute("SELECT 1 / 0")

    db = call.services.db
    if p.fail:
        db._merged_writes[bookings_db.create_many] = _WriteBatcher(db, bookings_db.create, failing)
    else:
        db._merged_writes.pop(bookings_db.create_many, None)
    return {}


class HoldMergedParams(Params):
    hold: bool


@test_only("test.hold_merged_writes", HoldMergedParams)
async def hold_merged_writes(call: Call, p: HoldMergedParams) -> dict:
    """While on, bookings.create calls wait for a batch and none is sent;
    turned off, those waiting go, as one batch (at most
    ``_WriteBatcher.MAX_BATCH``)."""
    import asyncio

    from server.db import bookings as bookings_db
    from server.db.pools import _WriteBatcher

    batcher = call.services.db._write_batcher(bookings_db.create, bookings_db.create_many)
    batcher.max_running = 0 if p.hold else _WriteBatcher.MAX_RUNNING
    if not p.hold:
        asyncio.get_running_loop().call_soon(batcher._send)
    return {}


class SessionParams(Params):
    user_id: str
    family_id: str


@test_only("test.hear_session_ended", SessionParams)
async def hear_session_ended(call: Call, p: SessionParams) -> dict:
    """This process hears that a session ended, as from server/sessions.py's
    channel, without the session being revoked in the database: what a
    process sees when the news overtakes its own check of the session."""
    import uuid

    call.services.sessions.send_event(uuid.UUID(p.user_id).bytes + uuid.UUID(p.family_id).bytes)
    return {}


class HoldParams(Params):
    hold: bool


@test_only("test.hold_subscriptions", HoldParams)
async def hold_subscriptions(call: Call, p: HoldParams) -> dict:
    """Fault injection: while on, Redis's confirmations of this process's new
    subscriptions are held back, as if Redis were slow to answer SUBSCRIBE,
    (start the server with ``SUBSCRIBE_WAIT_S`` long enough for ``bind`` to
    wait for them); turned off, the held ones are passed on in order. Returns the channels held so
    far."""
    import asyncio

    hub = call.services.hub
    if p.hold:
        state = hub.__dict__.setdefault(
            "_test_hold", {"held": [], "seen": asyncio.Event()})

        def hold(channel: str) -> None:
            state["held"].append(channel)
            state["seen"].set()

        hub._confirmed = hold
        return {"held": state["held"]}
    state = hub.__dict__.pop("_test_hold")
    hub.__dict__.pop("_confirmed", None)  # the class's own again
    for channel in state["held"]:
        hub._confirmed(channel)
    return {"held": state["held"]}


class HeldParams(Params):
    channel: str


@test_only("test.subscription_held", HeldParams)
async def subscription_held(call: Call, p: HeldParams) -> dict:
    """Answers once test.hold_subscriptions has held the confirmation of
    ``channel`` (at most 10 s), with the channels held."""
    import asyncio

    state = call.services.hub.__dict__["_test_hold"]
    async with asyncio.timeout(10.0):
        while p.channel not in state["held"]:
            state["seen"].clear()
            await state["seen"].wait()
    return {"held": state["held"]}


@test_only("test.hold_subscriber_away", HoldParams)
async def hold_subscriber_away(call: Call, p: HoldParams) -> dict:
    """Fault injection: with ``hold``, this process loses its Redis pub/sub
    link and cannot make it again, as if Redis were away from it alone
    (publishing still works); answers once the link is down. Without, it may
    connect again; answers once it has, and the sessions of its sockets
    have been checked (``Sessions.resubscribed``)."""
    import asyncio

    hub, sessions = call.services.hub, call.services.sessions
    if p.hold:
        hub.__dict__["_test_port"] = hub._port
        hub._port = 1  # nothing listens there
        sessions.caught_up.clear()
        if hub._writer is not None:
            hub._writer.transport.abort()
        async with asyncio.timeout(5.0):
            while hub.connected.is_set():
                await asyncio.sleep(0.01)
        return {}
    hub._port = hub.__dict__.pop("_test_port")
    await asyncio.wait_for(hub.connected.wait(), 10.0)
    await asyncio.wait_for(sessions.caught_up.wait(), 10.0)
    return {}


class NoParams(Params):
    pass


@test_only("test.redis_unreachable", NoParams)
async def redis_unreachable(call: Call, p: NoParams) -> dict:
    """This process's outbox takes Redis for unreachable (publishes fail at
    once) until its next probe is answered (``REDIS_PROBE_INTERVAL_S``)."""
    call.services.outbox.unreachable(RuntimeError("injected by test.redis_unreachable"))
    return {}


@test_only("test.outbox_reopened", NoParams)
async def outbox_reopened(call: Call, p: NoParams) -> dict:
    """Answers once the outbox sends again and the news of ended sessions it
    could not publish meanwhile has been published, with how many
    publishes the process has sent late."""
    import asyncio

    await asyncio.wait_for(call.services.outbox.wait_available(), 10.0)
    resend = call.services.hub._resend
    if resend is not None:
        await asyncio.wait_for(asyncio.shield(resend), 10.0)
    return {"resent": call.services.hub.resent}
