"""Apply ``sql/NNN_*.sql`` in order, each once, under an advisory lock."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger("hangout.migrate")

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
LOCK_KEY = 0x68616E67  # "hang": one lock for every process that migrates


async def migrate(database_url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations; returns the versions applied by this call."""
    conn = await asyncpg.connect(database_url)
    applied_now: list[str] = []
    try:
        # Session lock: a second process waits here, then finds nothing to do.
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                 version TEXT PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in sorted(sql_dir.glob("*.sql")):
            version = path.stem
            if version in done:
                continue
            log.info("applying migration %s", version)
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied_now.append(version)
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        finally:
            await conn.close()
    return applied_now
