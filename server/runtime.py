"""Garbage-collector settings for a long-running asyncio process.

Measured in loadtests/bench_bookings.py (gc.callbacks timing in the server):
with CPython's defaults the collector ran about 1,000 young passes and 8
full passes in 40 s at 1,500 bookings/s, and each full pass (about 30 ms)
stalled every call in flight, which made most of the p99. After
``settle_heap`` the same load saw a few dozen young passes and one or two
full ones.
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
