"""Methods that exist only in test servers: ``server/app.py`` imports this
module when ``HANGOUT_TEST_METHODS=1`` (never set in production). They reach
dispatcher paths that no real method may reach on purpose."""

from __future__ import annotations

from protocol.errors import ErrorCode, RpcError
from protocol.models.common import Params
from server.rpc import Call, rpc


class CrashParams(Params):
    pass


@rpc("test.crash", CrashParams, auth=False)
async def crash(call: Call, p: CrashParams) -> dict:
    """A handler with a bug: the dispatcher must answer ``internal`` with a
    correlation id, log it, and keep the socket."""
    raise RuntimeError("deliberate bug for the internal-error test")


class SocketsParams(Params):
    pass


@rpc("test.sockets", SocketsParams, auth=False)
async def sockets(call: Call, p: SocketsParams) -> dict:
    """The process's sockets as the outgoing side sees them, by user."""
    return {
        "sockets": [
            {"user_id": str(c.user_id), "replies": c.replies, "calls_in_flight": c.calls_in_flight,
             "queued_replies": c.queued_replies,
             "reading_paused": c.reading_paused}
            for c in call.services.connections if c.user_id is not None
        ]
    }


class FailParams(Params):
    fail: bool


@rpc("test.fail_position_lookups", FailParams, auth=False)
async def fail_position_lookups(call: Call, p: FailParams) -> dict:
    """Fault injection: while on, reading the primary's WAL position after a
    commit fails as if the primary had stopped answering just then."""
    from server.db.pools import _Batcher

    async def unavailable(_keys: list, _required: int) -> dict:
        raise RpcError(ErrorCode.UNAVAILABLE, "injected by test.fail_position_lookups")

    call.services.db._heads = _Batcher(unavailable, max_running=1) if p.fail else None
    return {}


class SessionParams(Params):
    user_id: str
    family_id: str


@rpc("test.hear_session_ended", SessionParams, auth=False)
async def hear_session_ended(call: Call, p: SessionParams) -> dict:
    """This process hears that a session ended, as from server/sessions.py's
    channel, without the session being revoked in the database: what a
    process sees when the news overtakes its own check of the session."""
    import uuid

    call.services.sessions.send_event(uuid.UUID(p.user_id).bytes + uuid.UUID(p.family_id).bytes)
    return {}
