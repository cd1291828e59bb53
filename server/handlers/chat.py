"""chat.*: the inbox, joining a room, sending, history, typing, read positions.

Only a booking's two parties may see or touch its conversation; anyone else,
and any unknown id, gets ``not_found``.

Joining is where "no gap, no duplicate" is made: the socket follows the room
first and waits until Redis confirmed the subscription, so every message
committed after that is delivered live; then it reads from the primary (a
lagging replica could miss a message committed, and published, before the
subscription). Messages in both the read and the live stream are dropped from
the stream by the room membership (server/rooms/membership.py).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from protocol.errors import ErrorCode, RpcError
from protocol.models import chat as m
from server import events, messages
from server import cursors
from server.db import chat as chat_db
from server.db import push as push_db
from server.presence_worker import party_presence
from server.rpc import Call, rpc
from server.services import Services

_MESSAGE_FIELDS = ("id", "seq", "sender_id", "content", "created_at", "client_msg_id")


def _not_found() -> RpcError:
    return RpcError(ErrorCode.NOT_FOUND, "no such conversation")


def _message(row: Any) -> m.Message:
    return m.Message.model_validate(dict(row))


async def _on_primary(services: Services, query: Any, *args: Any) -> Any:
    return await services.db.read_primary(query, *args)


def _remember_parties(services: Services, row: Any) -> tuple[uuid.UUID, uuid.UUID]:
    parties = (row["user_id"], row["host_id"])
    services.parties.remember(row["id"], parties)
    return parties


async def _party_conversation(services: Services, user_id: uuid.UUID, conversation_id: uuid.UUID) -> asyncpg.Record:
    """The conversation if ``user_id`` is a party. A replica that has not
    replayed the booking yet (the host did not write it) falls back to the
    primary, so a party is never told not_found because of lag."""
    row = await services.db.read(user_id, chat_db.get_conversation, conversation_id, user_id)
    if row is None:
        row = await _on_primary(services, chat_db.get_conversation, conversation_id, user_id)
    if row is None:
        raise _not_found()
    _remember_parties(services, row)
    return row


async def _parties(services: Services, user_id: uuid.UUID, conversation_id: uuid.UUID,
                   on_primary: bool = False) -> tuple[uuid.UUID, uuid.UUID]:
    """The conversation's (booker, host) if ``user_id`` is one of them, else
    not_found; from memory once this process has read them."""
    parties = services.parties.get(conversation_id)
    if parties is None:
        if on_primary:
            # Merged with other joins at the same moment (a reconnect storm).
            row = await services.db.read_one_primary(chat_db.conversation_parties, conversation_id)
            if row is None:
                raise _not_found()
            parties = _remember_parties(services, row)
        else:
            row = await _party_conversation(services, user_id, conversation_id)
            parties = (row["user_id"], row["host_id"])
    if user_id not in parties:
        raise _not_found()
    return parties


@rpc("chat.conversations")
async def conversations(call: Call, p: m.ConversationsParams) -> m.ConversationsResult:
    after = cursors.after(call.services.config, "chat.conversations", p)
    rows = await call.services.db.read(call.user_id, chat_db.inbox, call.user_id, after, p.limit + 1)
    items = []
    for r in rows[: p.limit]:
        last = None
        if r["m_id"] is not None:
            last = m.Message(conversation_id=r["id"], **{f: r[f"m_{f}"] for f in _MESSAGE_FIELDS})
        items.append(m.InboxConversation(
            id=r["id"], booking_id=r["booking_id"], user_id=r["user_id"], host_id=r["host_id"],
            created_at=r["created_at"], last_seq=r["last_seq"], read_seq=r["read_seq"],
            other_read_seq=r["other_read_seq"], unread=r["unread"], last_message=last,
        ))
    next_cursor = None
    if len(rows) > p.limit:
        tail = rows[p.limit - 1]
        next_cursor = cursors.make(call.services.config, "chat.conversations", p, tail["last_activity_at"], tail["id"])
    return m.ConversationsResult(conversations=items, next_cursor=next_cursor)


def _require_still_bound(call: Call) -> None:
    """A join attaches the socket to the caller's room. If the socket has
    since logged out, authenticated as someone else, or let its token expire,
    it must not be attached: the call fails as a call made now would."""
    if not call.still_bound():
        if call.conn.user_id == call.caller:
            raise RpcError(ErrorCode.TOKEN_EXPIRED)
        raise RpcError(ErrorCode.UNAUTHENTICATED, "the socket is no longer signed in as the caller")


@rpc("chat.join")
async def join(call: Call, p: m.JoinParams) -> m.JoinResult:
    services, hub, user = call.services, call.services.hub, call.user_id
    await _parties(services, user, p.conversation_id, on_primary=True)  # before subscribing: only parties follow a room

    channel = hub.conversation_channel(p.conversation_id)
    _require_still_bound(call)  # the socket may have changed hands during the check
    member, subscribed = hub.join(call.conn, channel, user)
    last_seq: int | None = None
    try:
        if subscribed is not None:
            # Past the wait the join still answers; the room is repaired from
            # PostgreSQL once Redis confirms the subscription.
            done, _ = await asyncio.wait({subscribed}, timeout=services.config.subscribe_wait_s)
            if not done or not subscribed.result():
                hub.mark_stale(channel)  # Redis away or slow: repaired once subscribed
        snap = await services.db.read_one_primary(
            chat_db.join_snapshots, (p.conversation_id, user, p.since_seq, m.JOIN_DEFAULT, m.JOIN_MAX_MISSED)
        )
        if snap is None:
            raise _not_found()
        conv, rows, truncated = snap
        other = conv["host_id"] if conv["user_id"] == user else conv["user_id"]
        result = m.JoinResult(
            conversation=m.Conversation.model_validate(dict(conv)),  # the batch's own columns are ignored
            messages=[m.Message.model_validate(r) for r in rows],
            last_seq=conv["last_seq"],
            truncated=truncated,
            presence=await party_presence(services, user, other),
        )
        _require_still_bound(call)  # re-bound meanwhile: the join was undone with the rest
        last_seq = conv["last_seq"]
    finally:
        held = member.end_join(last_seq)
        if member.done is None and not member.holds:
            hub.drop(member)  # never joined: no position to deliver from
        else:
            # The dispatcher queues this call's reply in the same step as our
            # return, before any callback runs: events held during the read
            # therefore follow the reply, filtered by what it carried.
            asyncio.get_running_loop().call_soon(hub.release, member, held)
    return result


@rpc("chat.leave")
async def leave(call: Call, p: m.LeaveParams) -> dict:
    hub = call.services.hub
    channel = hub.conversation_channel(p.conversation_id)
    if hub.membership(call.conn, channel) is None:
        await _party_conversation(call.services, call.user_id, p.conversation_id)
    hub.unfollow(call.conn, channel)
    return {}


async def _offline_recipient(services: Services, sender: uuid.UUID, conversation_id: uuid.UUID) -> uuid.UUID | None:
    """The other party when the push hook is on and they are offline now
    (server/push.py); None otherwise."""
    push = services.push
    if not push.enabled:
        return None
    booker, host = await _parties(services, sender, conversation_id)
    other = host if sender == booker else booker
    return None if other in await push.online_among([other]) else other


async def _store_and_publish(services: Services, user: uuid.UUID, p: m.SendParams,
                             push_to: uuid.UUID | None) -> m.Message | None:
    if push_to is None:
        # Sends made at the same moment share one transaction (sql/016).
        stored = await services.db.write_merged(
            user, chat_db.SEND, chat_db.send_locks(p.conversation_id),
            p.conversation_id, user, p.content, p.client_msg_id,
        )
    else:
        stored = await services.db.write(
            user, push_db.send_message, p.conversation_id, user, p.content, p.client_msg_id, push_to
        )
    if stored is None:
        return None
    message = _message(stored[0])
    if push_to is not None:
        services.push.queued()
    # Published again on a client_msg_id replay too: if the first publish was
    # lost the room gets it now, and sockets that had it drop it by seq. The
    # write position was queued for Redis before it.
    channel = services.hub.conversation_channel(p.conversation_id)
    await services.hub.publish(channel, messages.message_frame(message), seq=message.seq)
    return message


@rpc("chat.send")
async def send(call: Call, p: m.SendParams) -> m.SendResult:
    services, user = call.services, call.user_id
    push_to = await _offline_recipient(services, user, p.conversation_id)
    # A task of its own, shielded: a sender that goes away (its calls are
    # cancelled) must not leave a message committed and not published.
    message = await asyncio.shield(services.spawn(_store_and_publish(services, user, p, push_to)))
    if message is None:
        raise _not_found()
    return m.SendResult(message=message)


@rpc("chat.history")
async def history(call: Call, p: m.HistoryParams) -> m.HistoryResult:
    services, user = call.services, call.user_id
    args = (p.conversation_id, user, p.before_seq, p.limit + 1)
    rows = await services.db.read(user, chat_db.history, *args)
    if rows is None:  # maybe a replica that has not seen the booking yet
        rows = await _on_primary(services, chat_db.history, *args)
    if rows is None:
        raise _not_found()
    return m.HistoryResult(messages=[_message(r) for r in rows[: p.limit]], has_more=len(rows) > p.limit)


@rpc("chat.read")
async def read(call: Call, p: m.ReadParams) -> m.ReadResult:
    services, user = call.services, call.user_id
    row = await services.db.write(user, chat_db.read_up_to, p.conversation_id, user, p.seq)
    if row is None:
        raise _not_found()
    if p.seq > row["last_seq"]:
        raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": [m.READ_PAST_LAST]})
    if row["moved"]:
        event = m.ReadEvent(conversation_id=p.conversation_id, user_id=user, read_seq=row["read_seq"])
        # Shielded, as a send's publish: the position is committed, so the
        # reader's other devices and the other party must hear of it even if
        # this caller goes away.
        await asyncio.shield(services.spawn(events.to_conversation(services, p.conversation_id, "chat.read", event)))
    return m.ReadResult(read_seq=row["read_seq"])


@rpc("chat.typing")
async def typing(call: Call, p: m.TypingParams) -> dict:
    services, user = call.services, call.user_id
    # A socket that joined was checked then; typing is too frequent to ask
    # the database every time.
    if services.hub.membership(call.conn, services.hub.conversation_channel(p.conversation_id)) is None:
        await _party_conversation(services, user, p.conversation_id)
    await events.to_conversation(
        services, p.conversation_id, "chat.typing", m.TypingEvent(conversation_id=p.conversation_id, user_id=user),
        skip_user=user,
    )
    return {}
