"""chat.* methods and the chat.message, chat.typing and chat.read events.

Decisions where the contract is silent:
- After ``chat.join`` a socket gets each message of the room once, by
  ``seq``: a message both in the join's reply and published meanwhile is not
  sent again, and the reply comes before any ``chat.message`` of that room.
  A message whose live publish was lost (Redis away or hanging, a process
  stopped between commit and publish) is fetched from the database and
  delivered late, once the loss shows (Redis back: the room's newest
  unsent message is published again; or a later seq arrived), so events
  may come out of seq order; clients order by ``seq``. Only a process that
  stopped between commit and publish leaves it to the next message or a
  re-join with ``since_seq``.
- ``chat.join`` again on a joined socket (e.g. with ``since_seq`` after a
  reconnect) answers as asked; live delivery goes on without repeats.
- ``since_seq`` is 0 or more; at or past ``last_seq`` it returns no
  messages. ``before_seq`` is 1 or more.
- The sender's own joined sockets get its ``chat.message`` too, possibly
  before the ``chat.send`` reply.
- A ``client_msg_id`` seen before from the same sender in the conversation
  returns the stored message (its first content) and stores nothing.
- ``content`` is 1-4000 Unicode code points, stored exactly as sent: it
  is not trimmed, and content of only white space is a message like any
  other. Tab, newline and carriage return are its only control characters
  (NUL and the other Cc characters are refused); bidirectional controls are
  allowed, as right-to-left text needs them.
- ``chat.typing`` works without joining; it reaches the other party's
  joined sockets, never the typist's own.
- ``chat.leave`` of a room the socket has not joined is ``{}`` for a party.
  Closing the socket, ``auth.logout`` or re-authenticating as someone else
  leaves every room. An expired access token pauses the socket's rooms: no
  ``chat.message`` until it authenticates again as the same user, and then
  the messages it missed, without a new ``chat.join``.
- ``chat.conversations`` lists every conversation of the caller, as booker
  or host, whatever its booking's status: by last activity (the last message,
  or the conversation's creation), newest first. ``last_message`` is the one
  with the highest ``seq``. A conversation that gets a message while a client
  pages moves to the front, so later pages may miss or repeat it.
- Read positions (``chat.read``): ``seq`` is checked against the
  conversation's ``last_seq`` after the caller is known to be a party, so a
  stranger gets ``not_found`` whatever the ``seq``; a ``seq`` past
  ``last_seq`` is ``invalid_params`` naming ``seq`` (``seq`` 0 already fails
  validation). Calling it needs no ``chat.join``. The ``chat.read`` event is
  pushed only when the call moved the position: a call at or below it
  answers the position as it is and pushes nothing. Two devices of one user
  reading at once may push in either order, so a client keeps the highest
  ``read_seq`` it has seen per user. Sending a message does not move the
  sender's read position; ``unread`` never counts the caller's own messages.
  The event is not durable: a client that missed it (socket closed, token
  expired, Redis away) gets the figures again from ``chat.join`` or
  ``chat.conversations``, where the caller's own position is read-your-writes
  and the other party's may lag a little.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, field_validator

from protocol import cursors
from protocol.methods import MethodSpec
from protocol.models.common import EmptyResult, Id, Limit, PageParams, Params, Result, Time, check_content

MAX_CONTENT = 4000
JOIN_DEFAULT = 50  # latest messages returned by chat.join without since_seq
JOIN_MAX_MISSED = 500  # at most this many missed messages; more => truncated
HISTORY_DEFAULT = 50

# seq is a PostgreSQL BIGINT; anything larger cannot name a message.
Seq = Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]
MessageSeq = Annotated[int, Field(ge=1, le=2**63 - 1, strict=True)]

# The invalid_params error of a chat.read past the conversation's last message.
READ_PAST_LAST = {"field": "seq", "reason": "must be at most the conversation's last_seq"}


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
    read_seq: int  # the caller's read position, 0 before any chat.read
    other_read_seq: int  # the other party's
    unread: int  # the other party's messages with seq above read_seq


class InboxConversation(Conversation):
    last_message: Optional[Message]


class ConversationsParams(PageParams):
    """The caller's inbox, a page at a time."""

    cursor_key = (cursors.TIME, cursors.ID)  # last_activity_at then id, as the list is ordered


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
        return check_content(v)


class SendResult(Result):
    message: Message


class HistoryParams(Params):
    conversation_id: Id
    before_seq: Optional[MessageSeq] = None
    limit: Limit = HISTORY_DEFAULT


class HistoryResult(Result):
    messages: list[Message]  # newest first
    has_more: bool


class TypingParams(Params):
    conversation_id: Id


class ReadParams(Params):
    conversation_id: Id
    seq: MessageSeq  # read up to and including this message


class ReadResult(Result):
    read_seq: int  # the caller's position after the call


class MessageEvent(Result):
    message: Message


class TypingEvent(Result):
    conversation_id: Id
    user_id: Id


class ReadEvent(Result):
    conversation_id: Id
    user_id: Id  # the reader
    read_seq: int


METHODS = (
    MethodSpec("chat.conversations", ConversationsParams, ConversationsResult),
    MethodSpec("chat.join", JoinParams, JoinResult),
    MethodSpec("chat.leave", LeaveParams, EmptyResult),
    MethodSpec("chat.send", SendParams, SendResult),
    MethodSpec("chat.history", HistoryParams, HistoryResult),
    MethodSpec("chat.typing", TypingParams, EmptyResult),
    MethodSpec("chat.read", ReadParams, ReadResult),
)
EVENTS = {"chat.message": MessageEvent, "chat.typing": TypingEvent, "chat.read": ReadEvent}
