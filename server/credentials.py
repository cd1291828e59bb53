"""Credentials: password hashing, access tokens (JWT) and refresh tokens (no I/O here)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from protocol.errors import ErrorCode, RpcError

UTC = dt.timezone.utc

# argon2id at OWASP's minimum (19 MiB, t=2, p=1): ~20 ms a hash here, run
# off the event loop so logins never stall other sockets.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
# Verified against when the email is unknown, so that both cases cost the same.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: uuid.UUID
    family_id: uuid.UUID | None
    expires_at: dt.datetime


def issue_access_token(secret: str, ttl_s: int, user_id: uuid.UUID, family_id: uuid.UUID) -> str:
    now = int(dt.datetime.now(UTC).timestamp())
    claims = {"sub": str(user_id), "fam": str(family_id), "iat": now, "exp": now + ttl_s, "typ": "access"}
    return jwt.encode(claims, secret, algorithm="HS256")


def decode_access_token(secret: str, token: str) -> AccessClaims:
    """Raises RpcError token_expired or unauthenticated."""
    if not token:
        raise RpcError(ErrorCode.UNAUTHENTICATED, "empty token")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        if claims.get("typ") != "access":
            raise jwt.InvalidTokenError("not an access token")
        user_id = uuid.UUID(claims["sub"])
        family = uuid.UUID(claims["fam"]) if claims.get("fam") else None
    except jwt.ExpiredSignatureError:
        raise RpcError(ErrorCode.TOKEN_EXPIRED) from None
    except (jwt.InvalidTokenError, ValueError, TypeError, KeyError):
        raise RpcError(ErrorCode.UNAUTHENTICATED, "invalid access token") from None
    return AccessClaims(user_id, family, dt.datetime.fromtimestamp(claims["exp"], UTC))


def new_refresh_token() -> tuple[str, bytes]:
    """An opaque token for the client and the hash we store."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
