"""Chat: conversations between a booking's two parties, messages, typing."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, field_validator

from protocol.models.common import Cursor, EmptyResult, Id, Limit, Params, Result, Time

MAX_CONTENT = 4000
JOIN_DEFAULT = 50  # latest messages returned by chat.join without since_seq
JOIN_MAX_MISSED = 500  # at most this many missed messages; more => truncated
HISTORY_DEFAULT = 50

# seq is a PostgreSQL BIGINT; anything larger cannot name a message.
Seq = Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]


class Message(Result):
    id: Id
    conversation_id: Id
    seq: int
    sender_id: Id
    content: str
    created_at: Time
    client_msg_id: Optional[Id]


class Conversation(Result):
    id: Id
    booking_id: Id
    user_id: Id  # the booker
    host_id: Id
    created_at: Time
    last_seq: int


class InboxConversation(Conversation):
    last_message: Optional[Message]


class ConversationsParams(Params):
    limit: Limit = 20
    cursor: Optional[Cursor] = None


class ConversationsResult(Result):
    conversations: list[InboxConversation]
    next_cursor: Optional[str]


class JoinParams(Params):
    conversation_id: Id
    since_seq: Optional[Seq] = None


class JoinResult(Result):
    conversation: Conversation
    messages: list[Message]  # oldest first
    last_seq: int
    truncated: bool


class LeaveParams(Params):
    conversation_id: Id


class SendParams(Params):
    conversation_id: Id
    content: Annotated[str, Field(min_length=1, max_length=MAX_CONTENT)]
    client_msg_id: Optional[Id] = None

    @field_validator("content")
    @classmethod
    def _storable(cls, v: str) -> str:
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail the insert.
        if "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v


class SendResult(Result):
    message: Message


class HistoryParams(Params):
    conversation_id: Id
    before_seq: Optional[Annotated[int, Field(ge=1, le=2**63 - 1, strict=True)]] = None
    limit: Limit = HISTORY_DEFAULT


class HistoryResult(Result):
    messages: list[Message]  # newest first
    has_more: bool


class TypingParams(Params):
    conversation_id: Id


class MessageEvent(Result):
    message: Message


class TypingEvent(Result):
    conversation_id: Id
    user_id: Id


METHODS = {
    "chat.conversations": (ConversationsParams, ConversationsResult),
    "chat.join": (JoinParams, JoinResult),
    "chat.leave": (LeaveParams, EmptyResult),
    "chat.send": (SendParams, SendResult),
    "chat.history": (HistoryParams, HistoryResult),
    "chat.typing": (TypingParams, EmptyResult),
}
EVENTS = {"chat.message": MessageEvent, "chat.typing": TypingEvent}
