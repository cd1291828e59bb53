"""HTTP routes: the WebSocket endpoint, health checks and the KYC webhook."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import socket

from aiohttp import web

from protocol.errors import ErrorCode, RpcError
from protocol.models.common import parse_uuid
from server import credentials
from server.db.errors import DatabaseUnavailable
from server.dispatch import UNAVAILABLE_ERRORS
from server.edge import client_address
from server.handlers.auth import session_user
from server.services import Services
from server.socket import Connection
from server.transport import websocket_response

KYC_STATUSES = ("pending", "verified", "rejected")
SERVICES = web.AppKey("services", Services)  # set by server.app.create_app


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _upgrade_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    return request.query.get("access_token")


async def websocket(request: web.Request) -> web.StreamResponse:
    services = _services(request)
    cfg = services.config
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"), cfg.trusted_proxies)
    # The caps come before anything else is done for the socket (a token is
    # checked in the database). A socket counts from here to its teardown, so
    # upgrades still in progress count too.
    sockets = services.sockets
    if sockets.of(address) >= cfg.max_sockets_per_address:
        return web.json_response({"error": ErrorCode.RATE_LIMITED.value}, status=429)
    if sockets.total >= cfg.max_sockets:
        return web.json_response({"error": ErrorCode.UNAVAILABLE.value}, status=503)
    sockets.add(address)
    try:
        return await _websocket(request, services, address)
    finally:
        sockets.remove(address)


async def _websocket(request: web.Request, services: Services, address: str) -> web.StreamResponse:
    cfg = services.config
    # From the session check until the socket is among the process's
    # connections, a catch-up of ended sessions (server/sessions.py) counts it.
    with contextlib.ExitStack() as checking:
        token = _upgrade_token(request)
        claims = None
        if token is not None:
            try:
                claims = credentials.decode_access_token(cfg.jwt_secret, token)
                checking.enter_context(services.sessions.checking(claims.user_id, claims.family_id))
                await session_user(services, claims)
            except RpcError as err:
                status = 503 if err.code is ErrorCode.UNAVAILABLE else 401
                return web.json_response({"error": err.code.value}, status=status)
            except (DatabaseUnavailable, *UNAVAILABLE_ERRORS):
                return web.json_response({"error": ErrorCode.UNAVAILABLE.value}, status=503)
        ws = websocket_response(cfg)
        conn = Connection(ws, request, services, address)
        try:
            if claims is not None:
                # Bound (the user's channel subscribed) before the 101 goes out:
                # a client may count on every event published after it has the
                # 101. Events that come meanwhile wait in the socket's queue.
                try:
                    await conn.binding.bind(claims.user_id, claims.family_id, claims.expires_at)
                except RpcError:
                    pass  # the session ended meanwhile: the socket serves unbound
            await ws.prepare(request)
        except BaseException:
            conn.binding.unbind()
            raise
        if cfg.socket_send_buffer_bytes > 0 and request.transport is not None:
            sock = request.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.socket_send_buffer_bytes)
        services.connections.add(conn)
    try:
        await conn.serve()
    finally:
        services.connections.discard(conn)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = _services(request)
    db = services.db

    async def primary_ok() -> bool:
        try:
            async with db.acquire_primary(deadline=2.0) as conn:
                await conn.fetchval("SELECT 1")
            return True
        except Exception:
            return False

    async def redis_ok() -> bool:
        try:
            return bool(await asyncio.wait_for(services.redis.ping(), 2.0))
        except Exception:
            return False

    # Read before the checks below, which wait for a connection themselves.
    waiting = db.primary.waiting if db.primary is not None else 0
    primary, redis_up = await asyncio.gather(primary_ok(), redis_ok())
    from server.db.replicas import redact

    body = {
        # Calls waiting for a primary connection: the pool (DB_POOL_MAX) is all in use.
        # merged_writes: bookings.create calls made together (sql/009).
        "primary": {"ok": primary, "waiting": waiting, "merged_writes": db.merged_write_stats()},
        "replicas": [
            {
                "url": redact(r.url), "ok": r.healthy, "lag_bytes": r.lag_bytes, "error": r.error,
                "replay_lsn": r.replay_lsn, "reads_served": r.served,
            }
            for r in db.replicas
        ],
        "redis": {
            "ok": redis_up,
            "subscriber_connected": services.hub.connected.is_set(),
            # False after Redis stopped answering, until it answers a probe:
            # meanwhile calls do not wait for it (server/outbox.py).
            "sending": services.outbox.available,
            "outages": services.outbox.outages,
            "pipelines": services.outbox.pipelines,  # round trips of the outbox
        },
        "sockets": len(services.connections),
        "pid": os.getpid(),  # tells the processes of WORKERS=N apart
    }
    body["ready"] = primary and redis_up and services.outbox.available
    return web.json_response(body, status=200 if body["ready"] else 503)


async def kyc_webhook(request: web.Request) -> web.Response:
    from server.handlers.users import set_kyc_status

    services = _services(request)
    raw = await request.read()
    expected = hmac.new(services.config.kyc_webhook_secret.encode(), raw, hashlib.sha256).hexdigest()
    given = request.headers.get("X-Signature", "")
    # Compared as bytes: compare_digest refuses str with non-ASCII characters
    # (a 500), and header values may hold any byte.
    given_digest = given[7:].lower().encode("utf-8", "surrogateescape")
    if not (given.startswith("sha256=") and hmac.compare_digest(given_digest, expected.encode())):
        return web.json_response({"error": "bad signature"}, status=401)
    try:
        body = json.loads(raw, parse_constant=_not_json)
        if not isinstance(body, dict):
            raise ValueError("not an object")
        status = body.get("status")
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        return web.json_response({"error": "malformed body"}, status=400)
    try:
        user_id = parse_uuid(body["user_id"]) if isinstance(body.get("user_id"), str) else None
    except ValueError:
        user_id = None
    if user_id is None:
        return web.json_response({"error": "user_id must be a UUID"}, status=400)
    if status not in KYC_STATUSES:
        return web.json_response({"error": "unknown status"}, status=400)
    try:
        user, changed = await set_kyc_status(services, user_id, status)
    except (DatabaseUnavailable, *UNAVAILABLE_ERRORS):
        # The provider retries on 5xx: tell it to, rather than "server error".
        return web.json_response({"error": "database unavailable, retry"}, status=503, headers={"Retry-After": "1"})
    if user is None:
        return web.json_response({"error": "unknown user"}, status=404)
    return web.json_response({"user_id": str(user_id), "status": status, "changed": changed})


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/webhooks/kyc", kyc_webhook)
