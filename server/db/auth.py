"""SQL of refresh-token families, and of the session behind an access token."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from server.db.users import USER_COLUMNS


async def start_family(conn: asyncpg.Connection, user_id: uuid.UUID, token_hash: bytes, expires_at: dt.datetime) -> uuid.UUID:
    async with conn.transaction():
        family = await conn.fetchval("INSERT INTO refresh_token_families (user_id) VALUES ($1) RETURNING id", user_id)
        await conn.execute(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at) VALUES ($1, $2, $3, $4)",
            token_hash, family, user_id, expires_at,
        )
    return family


async def rotate(conn: asyncpg.Connection, old_hash: bytes, new_hash: bytes, expires_at: dt.datetime) -> tuple[str, uuid.UUID | None, uuid.UUID | None]:
    """Spend ``old_hash`` and issue ``new_hash`` in its family.

    Returns (outcome, user_id, family_id); outcome is ``ok``, ``unknown``,
    ``revoked``, ``expired`` or ``reused`` (the family is revoked by this call).
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            """SELECT t.user_id, t.family_id, t.used_at, t.expires_at, f.revoked_at
               FROM refresh_tokens t JOIN refresh_token_families f ON f.id = t.family_id
               WHERE t.token_hash = $1 FOR UPDATE OF t, f""",
            old_hash,
        )
        if row is None:
            return "unknown", None, None
        user_id, family = row["user_id"], row["family_id"]
        if row["revoked_at"] is not None:
            return "revoked", user_id, family
        if row["used_at"] is not None:
            await conn.execute(
                "UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = 'reuse' WHERE id = $1", family
            )
            return "reused", user_id, family
        if row["expires_at"] <= dt.datetime.now(dt.timezone.utc):
            return "expired", user_id, family
        await conn.execute("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1", old_hash)
        await conn.execute(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at) VALUES ($1, $2, $3, $4)",
            new_hash, family, user_id, expires_at,
        )
        return "ok", user_id, family


async def revoke_family(conn: asyncpg.Connection, family_id: uuid.UUID, user_id: uuid.UUID) -> None:
    await conn.execute(
        """UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = 'logout'
           WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL""",
        family_id, user_id,
    )


async def revoked_among(conn: asyncpg.Connection, families: list[uuid.UUID]) -> list[asyncpg.Record]:
    """``(user_id, id)`` of each of ``families`` that has been revoked."""
    return await conn.fetch(
        "SELECT user_id, id FROM refresh_token_families WHERE id = ANY($1::uuid[]) AND revoked_at IS NOT NULL",
        families,
    )


async def session_user(conn: asyncpg.Connection, user_id: uuid.UUID, family_id: uuid.UUID | None) -> asyncpg.Record | None:
    """The user of an access token, or None when the user is gone or the
    token's family (its session) was revoked by logout or by a reused
    refresh token."""
    return await conn.fetchrow(
        f"""SELECT {USER_COLUMNS} FROM users u WHERE u.id = $1
            AND ($2::uuid IS NULL OR EXISTS (
              SELECT 1 FROM refresh_token_families f WHERE f.id = $2 AND f.user_id = $1 AND f.revoked_at IS NULL))""",
        user_id, family_id,
    )
