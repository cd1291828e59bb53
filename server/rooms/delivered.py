"""Which of its user's numbered events a socket has been given.

A user event can reach a socket twice: the process that committed it
publishes it, and the relay (server/relay.py) publishes again what it does
not know to be published. The socket passes on each ``seq`` once.

Only recent seqs are remembered (``WINDOW``): a publish that comes late
comes within seconds, while far fewer than ``WINDOW`` newer events of one
user can arrive meanwhile. Below the window, everything counts as given.
"""

from __future__ import annotations

import heapq

WINDOW = 1024


class Delivered:
    __slots__ = ("_seen", "_order", "_floor")

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._order: list[int] = []  # a heap of the seqs in ``_seen``
        self._floor = 0  # every seq up to this one counts as given

    def take(self, seq: int) -> bool:
        """True the first time ``seq`` is offered: the socket gets it."""
        if seq <= self._floor or seq in self._seen:
            return False
        self._seen.add(seq)
        heapq.heappush(self._order, seq)
        if len(self._order) > WINDOW:
            self._floor = heapq.heappop(self._order)
            self._seen.discard(self._floor)
        return True
