"""Credentials: password hashing (argon2id, on threads of its own), access
tokens (JWT) and refresh tokens (no I/O here)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import math
import secrets
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from protocol.errors import ErrorCode, RpcError

UTC = dt.timezone.utc
T = TypeVar("T")

# argon2id at OWASP's minimum (19 MiB, t=2, p=1), run on threads of its own
# (PasswordHashing) so that logins never stall other sockets.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
_started = time.perf_counter()
# Verified against when the email is unknown, so that both cases cost the same.
_DUMMY_HASH = _hasher.hash("not-a-real-password")
# What a hash costs on this machine, until calls have measured it.
_FIRST_HASH_S = time.perf_counter() - _started


def _check(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


class PasswordHashing:
    """Argon2 on ``concurrency`` threads owned by the process, so that a burst
    of password checks never holds the threads everything else shares.

    Each client address has its own line, served in arrival order; a free
    thread goes to the head of the line whose turn it is, round robin. So a
    flood from a few addresses pushes another address's call back by at most
    one place per flooding address, however long their lines. A call whose
    wait, predicted from the lines and the measured time of a hash, is more
    than ``max_wait_s`` is refused at once (``rate_limited``); one that still
    waits longer (the prediction was wrong) is refused when its turn comes.
    """

    def __init__(self, concurrency: int, max_wait_s: float) -> None:
        self.concurrency = max(1, concurrency)
        self.max_wait_s = max_wait_s
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="argon2")
        self._running = 0
        # Addresses with calls waiting, the next turn first.
        self._lines: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._mean_s = _FIRST_HASH_S
        self._closed = False

    async def hash(self, address: str, password: str) -> str:
        return await self._run(address, _hasher.hash, password)

    async def verify(self, address: str, password_hash: str | None, password: str) -> bool:
        """False for a wrong password, and for no hash (an unknown email),
        at the same cost."""
        return await self._run(address, _check, password_hash, password)

    def predicted_wait(self, address: str) -> float:
        """Seconds a call from ``address`` arriving now would wait for a thread."""
        if self._running < self.concurrency and not self._lines:
            return 0.0
        own = len(self._lines.get(address, ()))
        # Every other line is served up to our round (own + 1) before us.
        ahead = own + sum(min(len(line), own + 1) for a, line in self._lines.items() if a != address)
        return (ahead + 1) / self.concurrency * self._mean_s

    async def close(self) -> None:
        """Refuse new calls and those waiting; wait for the hashes running."""
        self._closed = True
        for line in self._lines.values():
            for waiter in line:
                if not waiter.done():
                    waiter.set_exception(RpcError(ErrorCode.UNAVAILABLE, "shutting down"))
        self._lines.clear()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    async def _run(self, address: str, fn: Callable[..., T], *args: Any) -> T:
        await self._admit(address)
        loop = asyncio.get_running_loop()
        try:
            job = self._pool.submit(self._timed, fn, *args)
        except RuntimeError:  # the pool has shut down
            self._release()
            raise RpcError(ErrorCode.UNAVAILABLE, "shutting down") from None
        # The thread is given back when the hash ends, even if its caller
        # went away meanwhile: the hash still runs to its end.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job, loop=loop)

    async def _admit(self, address: str) -> None:
        if self._closed:
            raise RpcError(ErrorCode.UNAVAILABLE, "shutting down")
        if self._running < self.concurrency and not self._lines:
            self._running += 1
            return
        wait = self.predicted_wait(address)
        if wait > self.max_wait_s:
            raise self._busy(wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        waiter: asyncio.Future[None] = loop.create_future()
        self._lines.setdefault(address, deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the turn came as the caller went: pass it on
            else:
                self._forget(address, waiter)
            raise
        if loop.time() > deadline:
            self._release()
            raise self._busy(loop.time() - deadline + self.max_wait_s)

    def _busy(self, wait: float) -> RpcError:
        # By then the lines are short enough again for a call to be admitted.
        retry_after = max(1, math.ceil(wait - self.max_wait_s))
        return RpcError(ErrorCode.RATE_LIMITED, "password checks are busy", data={"retry_after": retry_after})

    def _forget(self, address: str, waiter: asyncio.Future[None]) -> None:
        line = self._lines.get(address)
        if line is not None and waiter in line:
            line.remove(waiter)
            if not line:
                del self._lines[address]

    def _release(self) -> None:
        """A thread is free: give it to the next line's head."""
        self._running -= 1
        while self._running < self.concurrency and self._lines:
            address, line = next(iter(self._lines.items()))
            waiter = line.popleft()
            if line:
                self._lines.move_to_end(address)
            else:
                del self._lines[address]
            if not waiter.done():
                self._running += 1
                waiter.set_result(None)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            # A moving mean, written from the hashing threads: a lost update
            # only makes the prediction a little staler.
            self._mean_s += (time.perf_counter() - started - self._mean_s) * 0.5


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
