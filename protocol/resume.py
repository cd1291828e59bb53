"""What a client keeps to come back after a lost socket without a gap or a
repeat, free of any I/O so that the asyncio client (``protocol.reconnect``)
and the load test's gevent client share it.

- ``Backoff``: exponential backoff with full jitter. Many clients that lost
  the same server at once retry spread over the whole window rather than
  in waves at the same instants.
- ``SeqWindow``: one numbered stream (the user's events, or one
  conversation's messages): every seq up to ``through`` was taken, and some
  above it. ``take`` says whether a seq is new; resuming from ``through``
  (``events.resume`` / ``chat.join`` ``since_seq``) leaves no gap even when
  seqs arrived out of order.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable


class Backoff:
    """The n-th wait (from 0) is uniform in [0, min(cap, base * 2**n)]."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: Callable[[], float] = random.random) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng

    def ceiling(self) -> float:
        """The longest the next wait may be."""
        return min(self.cap, self.base * 2 ** min(self.failures, 64))

    def next(self) -> float:
        """The wait before the next attempt; each call counts a failure."""
        wait = self._rng() * self.ceiling()
        self.failures += 1
        return wait

    def reset(self) -> None:
        self.failures = 0


class SeqWindow:
    """The seqs of one stream a client has taken."""

    def __init__(self, through: int = 0) -> None:
        self.through = through
        self._above: set[int] = set()

    def take(self, seq: int) -> bool:
        """Whether ``seq`` is new (and from now on taken)."""
        if seq <= self.through or seq in self._above:
            return False
        self._above.add(seq)
        while self.through + 1 in self._above:
            self.through += 1
            self._above.discard(self.through)
        return True

    def take_all(self, seqs: Iterable[int]) -> list[int]:
        """The new ones among ``seqs``, in their order."""
        return [seq for seq in seqs if self.take(seq)]

    def skip_to(self, seq: int) -> None:
        """Everything up to ``seq`` counts as taken (a stream followed from
        there, or history the server no longer keeps)."""
        if seq > self.through:
            self.through = seq
            self._above = {s for s in self._above if s > seq}
            while self.through + 1 in self._above:
                self.through += 1
                self._above.discard(self.through)

    @property
    def highest(self) -> int:
        return max(self._above, default=self.through)
