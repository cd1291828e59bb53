"""SQL of refresh-token families, and of the session behind an access token."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from server.db.users import USER_COLUMNS


async def start_family(conn: asyncpg.Connection, user_id: uuid.UUID, token_hash: bytes, expires_at: dt.datetime, max_age_s: int) -> uuid.UUID:
    """A new family (session) with its first token; it ends ``max_age_s``
    from now, whatever happens to it later."""
    async with conn.transaction():
        family = await conn.fetchval(
            "INSERT INTO refresh_token_families (user_id, ends_at) VALUES ($1, now() + make_interval(secs => $2)) RETURNING id",
            user_id, float(max_age_s),
        )
        await conn.execute(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at) VALUES ($1, $2, $3, $4)",
            token_hash, family, user_id, expires_at,
        )
    return family


async def rotate(
    conn: asyncpg.Connection, old_hash: bytes, new_hash: bytes, expires_at: dt.datetime
) -> tuple[str, uuid.UUID | None, uuid.UUID | None, dt.datetime | None]:
    """Spend ``old_hash`` and issue ``new_hash`` in its family.

    Returns (outcome, user_id, family_id, when the family ends); outcome is
    ``ok``, ``unknown``, ``revoked``, ``ended`` (past its maximum age),
    ``expired`` or ``reused`` (the family is revoked by this call).
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            """SELECT t.user_id, t.family_id, t.used_at, t.expires_at, f.revoked_at, f.ends_at, f.ends_at <= now() AS ended
               FROM refresh_tokens t JOIN refresh_token_families f ON f.id = t.family_id
               WHERE t.token_hash = $1 FOR UPDATE OF t, f""",
            old_hash,
        )
        if row is None:
            return "unknown", None, None, None
        user_id, family, ends_at = row["user_id"], row["family_id"], row["ends_at"]
        if row["revoked_at"] is not None:
            return "revoked", user_id, family, ends_at
        if row["ended"]:  # over: a reused token has no session left to revoke
            return "ended", user_id, family, ends_at
        if row["used_at"] is not None:
            await conn.execute(
                "UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = 'reuse' WHERE id = $1", family
            )
            return "reused", user_id, family, ends_at
        if row["expires_at"] <= dt.datetime.now(dt.timezone.utc):
            return "expired", user_id, family, ends_at
        await conn.execute("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1", old_hash)
        await conn.execute(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at) VALUES ($1, $2, $3, $4)",
            new_hash, family, user_id, expires_at,
        )
        return "ok", user_id, family, ends_at


async def revoke_family(conn: asyncpg.Connection, family_id: uuid.UUID, user_id: uuid.UUID) -> None:
    await conn.execute(
        """UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = 'logout'
           WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL""",
        family_id, user_id,
    )


async def revoked_among(conn: asyncpg.Connection, families: list[uuid.UUID]) -> list[asyncpg.Record]:
    """``(user_id, id)`` of each of ``families`` that has ended: revoked, or
    past its maximum age. (The cleanup keeps an ended family for an access
    token's lifetime, so it is still found here; see server/cleanup.py.)"""
    return await conn.fetch(
        """SELECT user_id, id FROM refresh_token_families
           WHERE id = ANY($1::uuid[]) AND (revoked_at IS NOT NULL OR ends_at <= now())""",
        families,
    )


async def session_users(conn: asyncpg.Connection, keys: list[tuple[uuid.UUID, uuid.UUID | None]]) -> dict:
    """The users of access tokens, each key a token's ``(user_id,
    family_id)``, in one statement: ``{key: user row}`` for the keys whose
    user exists and whose family (session) has not ended, by logout, by a
    reused refresh token or by its maximum age. Several sockets' upgrades
    share it (``Database.read_one``)."""
    users, families = zip(*keys)
    rows = await conn.fetch(
        f"""SELECT k.i, {USER_COLUMNS}
              FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS k(k_user, k_family, i)
              JOIN users u ON u.id = k.k_user
             WHERE k.k_family IS NULL OR EXISTS (
                   SELECT 1 FROM refresh_token_families f WHERE f.id = k.k_family AND f.user_id = k.k_user
                      AND f.revoked_at IS NULL AND f.ends_at > now())""",
        users, families,
    )
    return {keys[r["i"] - 1]: r for r in rows}


# ---- cleanup (server/cleanup.py) ------------------------------------------
# Each deletes at most ``batch`` rows and skips rows another transaction has
# locked (a refresh in progress, another process's cleanup), so any number
# of processes can run them at once without waiting on each other. A family
# counts as ended ``grace`` after its revocation or its end.

_ENDED = "(f.revoked_at < now() - $1::interval OR f.ends_at < now() - $1::interval)"


def _count(status: str) -> int:
    return int(status.split()[-1])


async def delete_ended_tokens(conn: asyncpg.Connection, grace: dt.timedelta, batch: int) -> int:
    """Tokens, used or not, of families that have ended."""
    return _count(await conn.execute(
        f"""DELETE FROM refresh_tokens WHERE token_hash IN (
              SELECT t.token_hash FROM refresh_token_families f JOIN refresh_tokens t ON t.family_id = f.id
              WHERE {_ENDED} LIMIT $2 FOR UPDATE OF t SKIP LOCKED)""",
        grace, batch,
    ))


async def delete_ended_families(conn: asyncpg.Connection, grace: dt.timedelta, batch: int) -> int:
    """Ended families with no token left. One whose token a refresh holds
    (so the token was skipped above) waits for a later pass: deleting it
    would wait on that token while the refresh waits on the family."""
    return _count(await conn.execute(
        f"""DELETE FROM refresh_token_families WHERE id IN (
              SELECT f.id FROM refresh_token_families f
              WHERE {_ENDED} AND NOT EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family_id = f.id)
              LIMIT $2 FOR UPDATE SKIP LOCKED)""",
        grace, batch,
    ))


async def delete_expired_tokens(conn: asyncpg.Connection, batch: int) -> int:
    """Unused tokens past their expiry, in families still alive: shown
    again, they are unknown, which answers as an expired one does. Used
    tokens of a live family are kept: reuse detection needs them."""
    return _count(await conn.execute(
        """DELETE FROM refresh_tokens WHERE token_hash IN (
             SELECT token_hash FROM refresh_tokens WHERE used_at IS NULL AND expires_at < now()
             LIMIT $1 FOR UPDATE SKIP LOCKED)""",
        batch,
    ))
