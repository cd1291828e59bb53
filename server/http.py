"""HTTP routes of the public port: the WebSocket endpoint, health checks, the KYC
webhook and the browser demo (server/demo.py)."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from aiohttp import web

from protocol.errors import ErrorCode, RpcError
from server import credentials, demo, kyc
from server.db import kyc as kyc_db
from server.db.errors import DatabaseUnavailable
from server.dispatch import UNAVAILABLE_ERRORS
from server.edge import client_address
from server.health import RedisHealth
from server.handlers.auth import session_user
from server.services import Services
from server.socket import Connection
from server.transport import websocket_response

SERVICES = web.AppKey("services", Services)  # set by server.app.create_app
HEALTH = web.AppKey("health", RedisHealth)


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
        conn = await _admit(request, services, address)
        if not isinstance(conn, Connection):
            return conn  # refused
        # Served from this frame, not ``_admit``'s: what admitting the socket
        # held (the token, the session check) is gone for the socket's life.
        try:
            await conn.serve()
        finally:
            services.connections.discard(conn)
        return conn.transport.ws
    finally:
        sockets.remove(address)


async def _admit(request: web.Request, services: Services, address: str) -> Connection | web.Response:
    """The socket upgraded (bound if its token is good) and among the
    process's connections, or the response that refuses it."""
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
    return conn


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def readiness(services: Services, health: RedisHealth) -> tuple[bool, dict[str, bool]]:
    """Ready or not, and a boolean per dependency, from the health loops'
    last look. Replicas are not needed to be ready: reads fall back to the
    primary."""
    db = services.db
    checks = {"primary": db.primary_answers, "replicas": all(r.healthy for r in db.replicas),
              "redis": health.ok}
    return checks["primary"] and checks["redis"], checks


async def readyz(request: web.Request) -> web.Response:
    """For a balancer: ready or not, with a boolean per dependency, never a
    wait for a connection (it answers as fast when the pool is exhausted or
    the primary gone). The details are on the metrics port (server/metrics_http.py)."""
    ready, checks = readiness(_services(request), request.app[HEALTH])
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def kyc_webhook(request: web.Request) -> web.Response:
    services = _services(request)
    raw = await request.read()  # bounded by the application's client_max_size (413 past it)
    signatures = request.headers.getall("X-Signature", [])
    # Checked before anything in the body: an unsigned request learns nothing else.
    if len(signatures) != 1 or not kyc.signature_valid(
        services.config.kyc_webhook_secret, signatures[0], raw, int(time.time())
    ):
        return web.json_response({"error": "bad signature"}, status=401)
    event = kyc.parse_event(raw)
    if isinstance(event, str):
        return web.json_response({"error": event}, status=400)
    try:
        outcome, user = await kyc.apply_event(services, event)
    except (DatabaseUnavailable, *UNAVAILABLE_ERRORS):
        # The provider retries on 5xx: tell it to, rather than "server error".
        return web.json_response({"error": "database unavailable, retry"}, status=503, headers={"Retry-After": "1"})
    if user is None:
        return web.json_response({"error": "unknown user"}, status=404)
    return web.json_response({
        "event_id": event.event_id, "user_id": str(user.id), "status": user.kyc_status,
        "changed": outcome == kyc_db.CHANGED, "already_applied": outcome == kyc_db.ALREADY_APPLIED,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/webhooks/kyc", kyc_webhook)
    demo_dir = app[SERVICES].config.demo_dir
    demo.add_routes(app, Path(demo_dir) if demo_dir else None)
