"""Embedded development stack: PostgreSQL primary + streaming replica + Redis.

Everything lives under one base directory (default ``<repo>/.devstack``,
override with ``DEVSTACK_DIR``) and listens on 127.0.0.1 only, on
``DEVSTACK_PORT`` (default 25432) for the primary, +1 for the replica and
+2 for Redis; with ``DEVSTACK_PGBOUNCER=1``, +3 for PgBouncer in transaction
mode in front of both (the stack's ``database_url``/``replica_urls`` then
lead through it, ``direct_database_url``/``direct_replica_urls`` do not).

Layout of the base directory::

    .lock                 fcntl lock serialising start/stop between processes
    primary/              PGDATA of the primary (owned by ``postgres`` when run as root)
    replica/              PGDATA of the streaming replica (pg_basebackup -R)
    run/                  unix socket directory of both PostgreSQL servers
    redis/                Redis working dir + redis.pid
    pgbouncer/            pgbouncer.ini, userlist.txt, pgbouncer.pid (when enabled)
    logs/                 primary.log, replica.log, redis.log, pgbouncer.log

Stdlib only: the servers are driven through their command line tools.

    python -m server.devstack start|stop|restart|status

Modules: ``stack`` (the ``DevStack`` facade, ``from_env``), ``primary``,
``replica`` and ``postgres`` (one PostgreSQL server), ``redis_server``,
``pgbouncer``, ``binaries`` (where the servers' binaries are), ``osuser``
(running as the ``postgres`` OS user), ``process`` and ``lock`` (helpers),
``cli``.
"""

from server.devstack.binaries import pg_bindir, redis_server_bin
from server.devstack.cli import main
from server.devstack.postgres import SUPERUSER
from server.devstack.primary import DATABASE, SLOT_NAME
from server.devstack.stack import DEFAULT_DIR, DEFAULT_PORT, DevStack, from_env

__all__ = [
    "DATABASE", "DEFAULT_DIR", "DEFAULT_PORT", "SLOT_NAME", "SUPERUSER",
    "DevStack", "from_env", "main", "pg_bindir", "redis_server_bin",
]
