"""server/runtime.py: the collector settings a server process runs with."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_settle_heap_freezes_what_exists_and_makes_young_passes_rarer():
    script = (
        "import gc, json\n"
        "from server.runtime import settle_heap, YOUNG_THRESHOLD\n"
        "before = gc.get_threshold()\n"
        "settle_heap()\n"
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold(), before, YOUNG_THRESHOLD]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout


    frozen, after, before, young = json.loads(out)
    assert frozen > 1000  # the imported modules and what they built
    assert after == [young, before[1], before[2]]
    assert young > before[0]
