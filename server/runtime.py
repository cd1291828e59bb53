"""Garbage-collector settings for a long-running asyncio process.

With CPython's defaults, a busy server runs the collector often, and each
full pass stalls every call in flight for its whole length: the tail of the
latency. Objects that live as long as the process are taken out of the
collector's reach, and young passes are made rarer.
"""

from __future__ import annotations

import gc

# Young passes after this many new container objects (CPython: 700). Nearly
# everything a call allocates dies by reference counting long before, so
# fewer passes promote fewer short-lived objects into the older generations.
YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Call once the process has started (modules imported, pools and
    models built): what exists then lives as long as the process, so it is
    moved out of the collector's reach (``gc.freeze``), and young passes
    become rarer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
