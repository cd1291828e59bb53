"""auth.*: register, login, authenticate, refresh, logout."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, Any

from protocol.errors import ErrorCode, RpcError
from protocol.models import auth as m
from protocol.models.users import OwnUser
from server import credentials
from server.db import auth as auth_db
from server.db import users as users_db
from server.limits import WindowLimit
from server.rpc import Call, rpc

if TYPE_CHECKING:
    from server.services import Services


async def _open_session(call: Call, user: OwnUser) -> m.SessionResult:
    cfg = call.services.config
    refresh, refresh_hash = credentials.new_refresh_token()
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=cfg.refresh_token_ttl_s)
    family = await call.services.db.write(user.id, auth_db.start_family, user.id, refresh_hash, expires, cfg.session_max_age_s)
    access = credentials.issue_access_token(cfg.jwt_secret, cfg.access_token_ttl_s, user.id, family)
    claims = credentials.decode_access_token(cfg.jwt_secret, access)
    await call.conn.bind(user.id, family, claims.expires_at)
    return m.SessionResult(user=user, access_token=access, refresh_token=refresh)


async def _count_password_check(call: Call) -> None:
    """Every register and login counts against the client's address, before
    anything else is done for it (``rate_limited`` past the limit)."""
    await call.services.address_checks.reserve(call.conn.address)


@rpc("auth.register")
async def register(call: Call, p: m.RegisterParams) -> m.SessionResult:
    await _count_password_check(call)
    password_hash = await call.services.hashing.hash(call.conn.address, p.password)
    row = await call.services.db.write(lambda r: r and r["id"], users_db.insert_user, p.email, password_hash, p.name, p.gender)
    if row is None:
        raise RpcError(ErrorCode.EMAIL_TAKEN)
    return await _open_session(call, OwnUser.model_validate(dict(row)))


@rpc("auth.login")
async def login(call: Call, p: m.LoginParams) -> m.SessionResult:
    cfg = call.services.config
    await _count_password_check(call)
    limiter = WindowLimit(call.services.redis, "login-failures", cfg.login_max_failures, cfg.login_window_s,
                          lambda: call.services.outbox.available)
    await limiter.reserve(p.email)  # counted as a failure until proven otherwise
    try:
        row = await call.services.db.write(None, users_db.credentials_by_email, p.email)
        good = await call.services.hashing.verify(call.conn.address, row["password_hash"] if row else None, p.password)
    except asyncio.CancelledError:
        # The socket went away mid-check: not a wrong guess either. The
        # release cannot be awaited here; the process runs it.
        call.services.spawn(limiter.release(p.email))
        raise
    except Exception:
        await limiter.release(p.email)  # not a wrong guess: we could not tell
        raise
    if not good:
        raise RpcError(ErrorCode.INVALID_CREDENTIALS, "wrong email or password")
    await limiter.release(p.email)
    user = dict(row)
    del user["password_hash"]
    return await _open_session(call, OwnUser.model_validate(user))


async def session_user(services: Services, claims: credentials.AccessClaims) -> Any:
    """The user of a valid access token; ``unauthenticated`` when its session
    ended (logout, a reused refresh token) or the user is gone. Read where
    the user's reads go; a "no" from a replica is confirmed on the primary,
    since a session made outside this server's writes (or whose write
    position Redis lost) may not have reached the replica yet."""
    key = (claims.user_id, claims.family_id)
    row = None
    # Merged with the checks of other sockets at the same moment (an upgrade
    # storm after a process died): one statement for many.
    if services.sessions.caught_up.is_set():  # else news of ended sessions may be missing (server/sessions.py)
        row = await services.db.read_one(claims.user_id, auth_db.session_users, key)
    if row is None:
        row = await services.db.read_one_primary(auth_db.session_users, key)
    if row is None:
        raise RpcError(ErrorCode.UNAUTHENTICATED, "session ended")
    return row


@rpc("auth.authenticate")
async def authenticate(call: Call, p: m.AuthenticateParams) -> m.AuthenticateResult:
    claims = credentials.decode_access_token(call.services.config.jwt_secret, p.access_token)
    with call.services.sessions.checking(claims.user_id, claims.family_id):
        row = await session_user(call.services, claims)
        await call.conn.bind(claims.user_id, claims.family_id, claims.expires_at)
    return m.AuthenticateResult(user=OwnUser.model_validate(dict(row)))


@rpc("auth.refresh")
async def refresh(call: Call, p: m.RefreshParams) -> m.RefreshResult:
    cfg = call.services.config
    new_token, new_hash = credentials.new_refresh_token()
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=cfg.refresh_token_ttl_s)
    # Whose reads must see it: a reuse revokes the family, and the session
    # check of the family's access tokens reads a replica.
    outcome, user_id, family, ends_at = await call.services.db.write(
        lambda r: r[1], auth_db.rotate, credentials.hash_refresh_token(p.refresh_token), new_hash, expires
    )
    if outcome == "reused":  # the family was revoked by this call
        await call.services.sessions.end(user_id, family)
    if outcome != "ok":
        raise RpcError(ErrorCode.INVALID_CREDENTIALS, "refresh token is not valid")
    assert user_id is not None and family is not None and ends_at is not None
    # No access token outlives its session: near the end, a shorter one.
    left_s = int((ends_at - dt.datetime.now(dt.timezone.utc)).total_seconds())
    access = credentials.issue_access_token(cfg.jwt_secret, max(1, min(cfg.access_token_ttl_s, left_s)), user_id, family)
    return m.RefreshResult(access_token=access, refresh_token=new_token)


# A protected call like any other: with an expired access token it answers
# token_expired (authenticate with a refreshed token, then log out).
@rpc("auth.logout")
async def logout(call: Call, p: m.LogoutParams) -> dict:
    user, family = call.user_id, call.conn.token_family
    if family is not None:
        await call.services.db.write(user, auth_db.revoke_family, family, user)
        # Every socket bound with this session, here and on other processes.
        await call.services.sessions.end(user, family)
    if call.conn.user_id == user and call.conn.token_family == family:
        call.conn.unbind()  # unless the socket authenticated as someone else meanwhile
    return {}
