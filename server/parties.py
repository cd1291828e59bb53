"""The two parties of conversations this process has seen: a conversation's
booker and host never change, so once read they answer "is this user a
party?" without a round trip (chat.join before it follows the room, and
chat.send when it must know who the other party is)."""

from __future__ import annotations

import collections
import uuid

Pair = tuple[uuid.UUID, uuid.UUID]  # (booker, host)


class Parties:
    """The parties of at most ``kept`` conversations, the least recently
    used forgotten first."""

    def __init__(self, kept: int = 100_000) -> None:
        self.kept = kept
        self._pairs: collections.OrderedDict[uuid.UUID, Pair] = collections.OrderedDict()

    def get(self, conversation_id: uuid.UUID) -> Pair | None:
        found = self._pairs.get(conversation_id)
        if found is not None:
            self._pairs.move_to_end(conversation_id)
        return found

    def remember(self, conversation_id: uuid.UUID, pair: Pair) -> None:
        self._pairs[conversation_id] = pair
        self._pairs.move_to_end(conversation_id)
        while len(self._pairs) > self.kept:
            self._pairs.popitem(last=False)
