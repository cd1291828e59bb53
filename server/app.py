"""The aiohttp application: routes, startup and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

import server.handlers  # noqa: F401  (importing the handlers registers their methods)
from server import http
from server.config import Config
from server.cleanup import Cleanup
from server.health import RedisHealth
from server.http import HEALTH, SERVICES
from server.presence_worker import PresenceWorker
from server.push_delivery import PushDelivery
from server.relay import Relay
from server.services import Services
from server.settlement import Settlement

log = logging.getLogger("hangout")


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    services = app[SERVICES] = Services.build(config)
    app[HEALTH] = RedisHealth(services.redis, services.outbox, config.redis_probe_interval_s, config.redis_timeout_s)
    http.add_routes(app)
    app.on_startup.append(_startup)
    app.on_shutdown.append(drain_sockets)
    app.on_cleanup.append(_cleanup)
    return app


async def _startup(app: web.Application) -> None:
    services = app[SERVICES]
    await services.start()
    services.add_worker(app[HEALTH])
    services.add_worker(Settlement(services))
    services.add_worker(Relay(services))
    services.add_worker(Cleanup(services))
    services.add_worker(PresenceWorker(services))
    if services.push.enabled:
        services.add_worker(PushDelivery(services))
    await services.start_workers()


async def drain_sockets(app: web.Application) -> None:
    """SIGTERM, once the listeners are closed: let
    in-flight calls finish (bounded), then close every socket with 1001."""
    services = app[SERVICES]
    conns = list(services.connections)
    if conns:
        log.info("draining %d sockets", len(conns))
        await asyncio.gather(*(c.drain(services.config.shutdown_grace_s) for c in conns), return_exceptions=True)


async def _cleanup(app: web.Application) -> None:
    await app[SERVICES].close()
