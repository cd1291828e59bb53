"""The operators' port of one process: ``GET /metrics`` (Prometheus text
format) and ``GET /status`` (JSON: hosts, lag, errors, counters and pid),
apart from the public port so that neither is ever reachable by clients.

A process started alone listens on ``METRICS_HOST:METRICS_PORT``; with
``OPS_TOKEN`` set, both routes want ``Authorization: Bearer <OPS_TOKEN>``
(for a metrics port opened beyond loopback). A worker of ``WORKERS=N``
listens instead on the Unix socket its supervisor names (in a directory only
this user can enter), and the supervisor serves the port for all of them
(server/workers.py).
"""

from __future__ import annotations

import hmac
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import metrics
from server.db.replicas import redact
from server.health import RedisHealth
from server.http import HEALTH, SERVICES, readiness
from server.services import Services

# Set by the supervisor of WORKERS=N for each worker: where it serves this app.
WORKER_SOCKET_ENV = "HANGOUT_METRICS_SOCKET"

_MAIN = web.AppKey("main", web.Application)
_collecting = False  # the registry holds this process's state collector


def is_operator(request: web.Request, ops_token: str) -> bool:
    """``Authorization: Bearer <OPS_TOKEN>``, compared in constant time."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters.
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), ops_token.encode())


def operators_only(ops_token: str):
    @web.middleware
    async def check(request: web.Request, handler):
        if ops_token and not is_operator(request, ops_token):
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


def prometheus_response(body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metrics_page(request: web.Request) -> web.Response:
    return prometheus_response(generate_latest(metrics.REGISTRY))


async def status_page(request: web.Request) -> web.Response:
    main = request.app[_MAIN]
    return web.json_response({"processes": [process_status(main[SERVICES], main[HEALTH])]})


def process_status(services: Services, health: RedisHealth) -> dict:
    db = services.db
    ready, checks = readiness(services, health)
    return {
        "ready": ready,
        "checks": checks,
        # waiting: calls waiting for a primary connection (the pool, DB_POOL_MAX, is all in use).
        # merged_writes: bookings.create and chat.send calls made together (sql/009, sql/016).
        "primary": {"ok": db.primary_answers, "error": db.primary_error,
                    "waiting": db.primary.waiting if db.primary is not None else 0,
                    "reads": db.primary_reads,  # reads it answered (no replica could, or must see all)
                    "merged_writes": db.merged_write_stats()},
        "replicas": [
            {
                "url": redact(r.url), "ok": r.healthy, "lag_bytes": r.lag_bytes, "error": r.error,
                "replay_lsn": r.replay_lsn, "reads_served": r.served,
            }
            for r in db.replicas
        ],
        "redis": {
            "ok": health.ok,
            "error": health.error,
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


def create_metrics_app(main: web.Application, ops_token: str) -> web.Application:
    global _collecting
    if not _collecting:
        metrics.REGISTRY.register(metrics.StateCollector(main[SERVICES], main[HEALTH]))
        _collecting = True
    app = web.Application(middlewares=[operators_only(ops_token)] if ops_token else [])
    app[_MAIN] = main
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/status", status_page)
    return app


async def start(main: web.Application) -> web.AppRunner | None:
    """Serve the metrics app of ``main``'s process, where the configuration or
    the supervisor says; None when ``METRICS_PORT=0`` turns it off."""
    config = main[SERVICES].config
    socket_path = os.environ.get(WORKER_SOCKET_ENV)
    if not socket_path and config.metrics_port == 0:
        return None
    # Behind a supervisor only its own requests come, over a private socket.
    app = create_metrics_app(main, "" if socket_path else config.ops_token)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    if socket_path:
        site: web.BaseSite = web.UnixSite(runner, socket_path)
    else:
        site = web.TCPSite(runner, config.metrics_host, config.metrics_port)
    await site.start()
    return runner
