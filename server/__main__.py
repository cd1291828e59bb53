"""Command line: ``python -m server [serve|migrate|kyc EMAIL STATUS|devstack start|stop|status|failover|rejoin]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from server import logs
from server.config import MIN_SECRET_BYTES, Config, ConfigError, dev_secrets, log_format
from server.runtime import settle_heap

log = logging.getLogger("hangout")

ON_DEVSTACK = "HANGOUT_ON_DEVSTACK"


def _use_devstack_if_unconfigured() -> bool:
    """No DATABASE_URL: start (or reuse) the embedded dev stack and point the
    environment at it, so every later step and every worker sees it. True
    if it did."""
    if os.environ.get("DATABASE_URL"):
        return os.environ.get(ON_DEVSTACK) == "1"
    from server import devstack

    stack = devstack.from_env()
    stack.start()
    env = stack.server_env()
    if not stack.pgbouncer:
        # Both servers, the writable one chosen: ``devstack failover`` needs no restart.
        env["DATABASE_URL"] = stack.failover_url
    os.environ.update(env)
    os.environ.update(dev_secrets())
    # Tells the worker processes (which find DATABASE_URL set) where they are.
    os.environ[ON_DEVSTACK] = "1"
    log.info("using the embedded dev stack in %s", stack.base_dir)
    return True


def _migrate() -> list[str]:
    """Migrations hold a session advisory lock, which a pooler in transaction
    mode would leave on whichever server connection ran it: behind PgBouncer,
    MIGRATE_DATABASE_URL names the primary itself."""
    from server.db.migrate import migrate

    return asyncio.run(migrate(os.environ.get("MIGRATE_DATABASE_URL") or os.environ["DATABASE_URL"]))


async def _serve_one(config: Config) -> None:
    from aiohttp import web

    from server import metrics_http
    from server.app import create_app, drain_sockets

    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown_grace_s + 2, access_log=None)
    await runner.setup()
    # Before the public port: a process that cannot be watched takes no
    # clients. It stays up while the sockets drain, so the drain can be watched.
    try:
        metrics_runner = await metrics_http.start(app)
    except OSError as err:
        log.error("cannot serve metrics on %s:%s: %s", config.metrics_host, config.metrics_port, err)
        await runner.cleanup()
        raise SystemExit(2) from None
    settle_heap()
    site = web.TCPSite(runner, config.host, config.port, reuse_port=True, backlog=4096)
    await site.start()
    log.info("serving on %s:%s (pid %s)", config.host, config.port, os.getpid())
    print(f"hangout listening on {config.host}:{config.port} pid={os.getpid()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    # Stop accepting first, then drain while the sockets are still read (the
    # runner's own shutdown stops reading them, which would leave requests
    # sent during the drain, and the clients' close replies, unread).
    for listener in list(runner.sites):
        await listener.stop()
    await drain_sockets(app)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    on_devstack = _use_devstack_if_unconfigured()
    try:
        config = Config.from_env()
    except ConfigError as err:
        print(f"hangout: {err}", file=sys.stderr)
        return 2
    missing = config.missing_secrets()
    if missing:
        # The development values are public: a server that fell back to them
        # would accept anyone's tokens and KYC webhooks.
        print(f"hangout: {' and '.join(missing)} not set. Set {'them' if len(missing) > 1 else 'it'} "
              "(a long random string), or leave DATABASE_URL unset to run on the embedded dev stack "
              "with development secrets.", file=sys.stderr)
        return 2
    short = [] if on_devstack else config.short_secrets()
    if short:
        # A short HMAC key can be found by trying keys against one signed
        # token or webhook, offline.
        print(f"hangout: {' and '.join(short)} shorter than {MIN_SECRET_BYTES} bytes. Use a long random "
              "string, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`.", file=sys.stderr)
        return 2
    if config.workers > 1:
        from server.workers import serve_workers

        _migrate()
        return serve_workers(config)
    if os.environ.get("HANGOUT_SKIP_MIGRATE") != "1":
        _migrate()
    import uvloop

    uvloop.run(_serve_one(config))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    _use_devstack_if_unconfigured()
    applied = _migrate()
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_kyc(args: argparse.Namespace) -> int:
    _use_devstack_if_unconfigured()
    from server.cli import set_kyc_by_email

    return asyncio.run(set_kyc_by_email(Config.from_env(), args.email, args.status))


def cmd_devstack(args: argparse.Namespace) -> int:
    from server import devstack

    return devstack.main([args.action])


def main(argv: list[str] | None = None) -> int:
    try:
        fmt = log_format()
    except ConfigError as err:
        print(f"hangout: {err}", file=sys.stderr)
        return 2
    logs.setup(fmt, os.environ.get("LOG_LEVEL", "INFO"))
    parser = argparse.ArgumentParser(prog="python -m server")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve (the default)").set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="apply pending sql/ migrations").set_defaults(func=cmd_migrate)
    kyc = sub.add_parser("kyc", help="set a user's KYC status and notify their sockets")
    kyc.add_argument("email")
    kyc.add_argument("status", choices=["pending", "verified", "rejected"])
    kyc.set_defaults(func=cmd_kyc)
    ds = sub.add_parser("devstack", help="manage the embedded dev stack")
    ds.add_argument("action", choices=["start", "stop", "restart", "status", "failover", "rejoin"])
    ds.set_defaults(func=cmd_devstack)
    args = parser.parse_args(argv)
    func = getattr(args, "func", cmd_serve)
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
