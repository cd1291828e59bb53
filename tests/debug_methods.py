"""Methods that exist only in test servers (``tests/server_with_test_methods.py``,
which imports this module). They reach dispatcher paths that no real method
may reach on purpose. Being outside the contract, each declares its own
``MethodSpec`` (``test_only``)."""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel

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
    from server.db.errors import DatabaseUnavailable

    error = DatabaseUnavailable("injected by test.fail_position_lookups") if p.fail else None
    call.services.db.positions.fail_head_lookups(error)
    return {}


class MergedWrite(Params):
    """Which merged write a test method acts on."""
    write: str = "bookings.create"  # or "chat.send"


def _merged_writes(call: Call, write: str):
    """(batcher, its query_many) of ``write``'s merged calls."""
    from server.db import bookings as bookings_db
    from server.db import chat as chat_db

    merged = {"bookings.create": bookings_db.CREATE, "chat.send": chat_db.SEND}[write]
    return call.services.db.write_batcher(merged), merged.query_many


class FailMergedParams(MergedWrite):
    fail: bool


@test_only("test.fail_merged_writes", FailMergedParams)
async def fail_merged_writes(call: Call, p: FailMergedParams) -> dict:
    """Fault injection: while on, every merged batch (two calls or more) of
    ``write`` fails in the database, as a deadlock would end it."""

    async def failing(conn, _calls: list) -> None:
        await conn.execute("SELECT 1 / 0")

    batcher, query_many = _merged_writes(call, p.write)
    batcher.query_many = failing if p.fail else query_many
    return {}


class HoldMergedParams(MergedWrite):
    hold: bool


@test_only("test.hold_merged_writes", HoldMergedParams)
async def hold_merged_writes(call: Call, p: HoldMergedParams) -> dict:
    """While on, calls of ``write`` wait for a batch and none is sent;
    turned off, those waiting go, as one batch (at most
    ``WriteBatcher.MAX_BATCH``)."""
    batcher, _ = _merged_writes(call, p.write)
    if p.hold:
        batcher.hold()
    else:
        batcher.release()
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
    subscriptions are held back, as if Redis were slow to answer SUBSCRIBE
    (start the server with a long ``SUBSCRIBE_WAIT_S`` for ``bind`` to wait
    for them); turned off, the held ones are passed on in order. Returns the
    channels held so far."""
    subscriber = call.services.hub.subscriber
    held = subscriber.hold_confirmations() if p.hold else subscriber.release_confirmations()
    return {"held": held}


class HeldParams(Params):
    channel: str


@test_only("test.subscription_held", HeldParams)
async def subscription_held(call: Call, p: HeldParams) -> dict:
    """Answers once test.hold_subscriptions has held the confirmation of
    ``channel`` (at most 10 s), with the channels held."""
    import asyncio

    held = await asyncio.wait_for(call.services.hub.subscriber.confirmation_held(p.channel), 10.0)
    return {"held": held}


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
        sessions.caught_up.clear()
        hub.subscriber.stay_away(True)
        async with asyncio.timeout(5.0):
            while hub.connected.is_set():
                await asyncio.sleep(0.01)
        return {}
    hub.subscriber.stay_away(False)
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
    await asyncio.wait_for(call.services.hub.resend_done(), 10.0)
    return {"resent": call.services.hub.resent}


# ---- a process that dies between commit and publish ------------------------
# The seams of tests/test_event_relay.py: each commits a real change through
# the server's own database layer (its events stored in the same
# transaction), then ends the process at once, before anything is published.


class TopupThenExitParams(Params):
    user_id: str
    amount: str


@test_only("test.topup_then_exit", TopupThenExitParams)
async def topup_then_exit(call: Call, p: TopupThenExitParams) -> dict:
    """``wallet.topup`` for ``user_id``, committed, then ``os._exit(1)``."""
    import hashlib
    import os
    import uuid
    from decimal import Decimal

    from server.db import wallet as wallet_db

    key = uuid.uuid4().hex
    await call.services.db.write(None, wallet_db.topup, uuid.UUID(p.user_id), Decimal(p.amount), key,
                                 hashlib.sha256(key.encode()).digest())
    os._exit(1)


class SendThenExitParams(Params):
    conversation_id: str
    user_id: str
    content: str


@test_only("test.send_then_exit", SendThenExitParams)
async def send_then_exit(call: Call, p: SendThenExitParams) -> dict:
    """``chat.send`` as ``user_id``, committed, then ``os._exit(1)``."""
    import os
    import uuid

    from server.db import chat as chat_db

    await call.services.db.write(None, chat_db.send_message, uuid.UUID(p.conversation_id), uuid.UUID(p.user_id),
                                 p.content, None)
    os._exit(1)
