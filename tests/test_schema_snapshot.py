"""sql/schema/functions.md shows every function, procedure and trigger as
the migrations make them: a migration that changes one without the snapshot
being regenerated fails here."""

from __future__ import annotations

import difflib

import pytest

from server.db.snapshot import REGENERATE, SNAPSHOT, fresh_definitions


async def test_the_snapshot_is_what_a_freshly_migrated_database_has(stack):
    expected = await fresh_definitions(stack.direct_database_url)
    current = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    if current != expected:
        diff = "".join(difflib.unified_diff(
            current.splitlines(keepends=True), expected.splitlines(keepends=True),
            f"{SNAPSHOT.name} (in the repository)", f"{SNAPSHOT.name} (from the migrations)",
        ))
        pytest.fail(f"{SNAPSHOT} is out of date; regenerate it with `{REGENERATE}`:\n{diff}")
