"""``DevStack``: the whole stack under one base directory, as the tests,
the load tests and ``python -m server`` use it: its URLs, and starting or
stopping it (or one of its servers) idempotently under the directory lock."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.devstack.failover import failover, rejoin, was_promoted
from server.devstack.lock import dir_lock
from server.devstack.osuser import PG_OS_USER, chown_pg, pg_ids, run_pg
from server.devstack.pgbouncer import REPLICA_DATABASE, PgBouncer
from server.devstack.postgres import SUPERUSER
from server.devstack.primary import DATABASE, Primary
from server.devstack.redis_cluster import NODES, RedisClusterNodes
from server.devstack.redis_server import RedisServer
from server.devstack.replica import REPLICA_APPLICATION_NAME, Replica

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / ".devstack"
DEFAULT_PORT = 25432


@dataclass
class DevStack:
    base_dir: Path
    primary_port: int = DEFAULT_PORT
    replica_port: int = DEFAULT_PORT + 1
    redis_port: int = DEFAULT_PORT + 2
    # With ``pgbouncer``, the servers reach PostgreSQL through PgBouncer in
    # transaction mode on ``pgbouncer_port`` (server/devstack/pgbouncer.py).
    pgbouncer: bool = False
    pgbouncer_port: int = DEFAULT_PORT + 3
    # Every commit on the primary waits until the replica has it
    # (``synchronous_standby_names``), so a failover loses no acknowledged write.
    sync_replication: bool = False
    # A three-master Redis Cluster on ``primary_port`` + 10..12 (buses on
    # +20..22) instead of the single Redis (server/devstack/redis_cluster.py).
    redis_cluster: bool = False

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).expanduser().absolute()
        self.primary_port = int(self.primary_port)
        self.replica_port = int(self.replica_port)
        self.redis_port = int(self.redis_port)
        self.pgbouncer_port = int(self.pgbouncer_port)

    # ---- URLs ------------------------------------------------------------ #

    @property
    def database_url(self) -> str:
        """Where a server writes: PgBouncer when the stack has one."""
        if self.pgbouncer:
            return self.bouncer.url(DATABASE)
        return self.direct_database_url

    @property
    def replica_urls(self) -> list[str]:
        if self.pgbouncer:
            return [self.bouncer.url(REPLICA_DATABASE)]
        return self.direct_replica_urls

    @property
    def direct_database_url(self) -> str:
        """The primary itself: migrations (a session advisory lock), new
        databases, and tests that look at the server's own state."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.primary_port}/{DATABASE}"

    @property
    def direct_replica_urls(self) -> list[str]:
        return [f"postgresql://{SUPERUSER}@127.0.0.1:{self.replica_port}/{DATABASE}"]

    def server_env(self) -> dict[str, str]:
        """The environment a server process needs to run on this stack."""
        env = {
            "DATABASE_URL": self.database_url,
            "DATABASE_REPLICA_URLS": ",".join(self.replica_urls),
            "MIGRATE_DATABASE_URL": self.direct_database_url,
            "REDIS_URL": self.redis_url,
        }
        if self.pgbouncer:
            # Named prepared statements live in one server session, which
            # transaction pooling does not keep for a client.
            env["DB_STATEMENT_CACHE_SIZE"] = "0"
        return env

    @property
    def failover_url(self) -> str:
        """``database_url`` naming both servers: connections go to whichever
        is writable, so a server using it follows a ``failover``."""
        return (f"postgresql://{SUPERUSER}@127.0.0.1:{self.primary_port},127.0.0.1:{self.replica_port}"
                f"/{DATABASE}?target_session_attrs=read-write")

    @property
    def redis_url(self) -> str:
        if self.redis_cluster:
            return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.redis_cluster_ports)
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def redis_cluster_ports(self) -> list[int]:
        return [self.primary_port + 10 + i for i in range(NODES)]

    # ---- paths ----------------------------------------------------------- #

    @property
    def primary_dir(self) -> Path:
        return self.base_dir / "primary"

    @property
    def replica_dir(self) -> Path:
        return self.base_dir / "replica"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "logs"

    @property
    def redis_dir(self) -> Path:
        return self.base_dir / "redis"

    @property
    def redis_pidfile(self) -> Path:
        return self.single_redis.pidfile

    @property
    def socket_dir(self) -> Path:
        """Unix socket dir: inside base_dir unless that path would be too long
        for a unix socket (sun_path is 108 bytes), then a short dir in /tmp."""
        d = self.base_dir / "run"
        if len(str(d / f".s.PGSQL.{max(self.primary_port, self.replica_port)}.lock")) < 100:
            return d
        h = hashlib.sha1(str(self.base_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"devstack-{h}"

    # ---- its servers ----------------------------------------------------- #

    @property
    def primary(self) -> Primary:
        return Primary("primary", self.primary_dir, self.primary_port, self.socket_dir,
                       self.log_dir, self.base_dir,
                       sync_standby=REPLICA_APPLICATION_NAME if self.sync_replication else "")

    @property
    def replica(self) -> Replica:
        return Replica("replica", self.replica_dir, self.replica_port, self.socket_dir,
                       self.log_dir, self.base_dir, primary=self.primary)

    @property
    def redis_server(self) -> RedisServer | RedisClusterNodes:
        return self.cluster_redis if self.redis_cluster else self.single_redis

    @property
    def single_redis(self) -> RedisServer:
        return RedisServer(self.redis_port, self.redis_dir, self.log_dir / "redis.log")

    @property
    def cluster_redis(self) -> RedisClusterNodes:
        return RedisClusterNodes(self.redis_cluster_ports, self.base_dir / "redis-cluster", self.log_dir)

    @property
    def bouncer(self) -> PgBouncer:
        return PgBouncer(self.pgbouncer_port, self.base_dir / "pgbouncer", self.log_dir / "pgbouncer.log",
                         self.primary_port, self.replica_port)

    # ---- public API ------------------------------------------------------ #

    def start(self) -> None:
        """Create/start whatever is missing or stopped. Idempotent."""
        with self._lock():
            self._prepare_dirs()
            if was_promoted(self.replica):
                rejoin(self.primary, self.replica)
            self.primary.ensure()
            self.replica.ensure()
            self.redis_server.ensure()
            if self.pgbouncer:
                self.bouncer.ensure()

    def failover(self) -> None:
        """Stop the primary at once and promote the replica (see ``failover``)."""
        with self._lock():
            failover(self.primary, self.replica)

    def rejoin(self) -> None:
        """After a ``failover``: the old primary is the primary again, with
        every write the promoted replica took, and the replica is rebuilt."""
        with self._lock():
            self.start()

    def stop(self) -> None:
        """Stop PgBouncer (if one runs), replica, primary and Redis (the
        single one and the cluster's nodes, whichever run). Idempotent."""
        with self._lock():
            self.bouncer.stop()
            self.replica.stop()
            self.primary.stop()
            self.single_redis.stop()
            self.cluster_redis.stop()

    def stop_replica(self) -> None:
        with self._lock():
            self.replica.stop()

    def start_replica(self) -> None:
        """Start the replica (building it if needed) and wait until it streams."""
        with self._lock():
            self._prepare_dirs()
            if not self.primary_running():
                self.primary.ensure()
            self.replica.ensure()

    def stop_redis(self) -> None:
        with self._lock():
            self.redis_server.stop()

    def start_redis(self) -> None:
        with self._lock():
            self._prepare_dirs()
            self.redis_server.ensure()

    def primary_running(self) -> bool:
        return self.primary.running()

    def replica_running(self) -> bool:
        return self.replica.running()

    def redis_running(self) -> bool:
        return self.redis_server.ping()

    def replica_streaming(self) -> bool:
        return self.replica.streaming()

    def status(self) -> dict[str, bool]:
        st = {
            "primary": self.primary_running(),
            "replica": self.replica_running(),
            "redis": self.redis_running(),
        }
        if self.pgbouncer:
            st["pgbouncer"] = self.bouncer.running()
        return st

    # ---- internals ------------------------------------------------------- #

    def _lock(self):
        return dir_lock(self.base_dir)

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.log_dir, self.redis_dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
        if pg_ids() is None:
            return
        # postgres writes its logs and sockets here; Redis (run as us) can
        # still write into logs/ because we are root.
        for d in (self.log_dir, self.socket_dir):
            chown_pg(d)
        os.chmod(self.socket_dir, 0o755)
        probe = run_pg(["/usr/bin/test", "-w", str(self.log_dir)], self.base_dir, check=False)
        if probe.returncode != 0:
            raise RuntimeError(
                f"the '{PG_OS_USER}' OS user cannot reach {self.base_dir} (a parent "
                f"directory is not traversable by it); pick a DEVSTACK_DIR it can access"
            )


def from_env() -> DevStack:
    """The stack at ``DEVSTACK_DIR`` (default ``<repo>/.devstack``) on
    ``DEVSTACK_PORT`` (default 25432), +1 and +2; with ``DEVSTACK_PGBOUNCER=1``,
    PgBouncer on +3 in front of the primary and the replica; synchronous
    replication with ``DEVSTACK_SYNC_REPLICATION=1``; a three-node Redis
    Cluster instead of the single Redis with ``DEVSTACK_REDIS_CLUSTER=1``."""
    base = Path(os.environ.get("DEVSTACK_DIR") or DEFAULT_DIR)
    port = int(os.environ.get("DEVSTACK_PORT") or DEFAULT_PORT)
    return DevStack(base_dir=base, primary_port=port, replica_port=port + 1, redis_port=port + 2,
                    pgbouncer=os.environ.get("DEVSTACK_PGBOUNCER") == "1", pgbouncer_port=port + 3,
                    sync_replication=os.environ.get("DEVSTACK_SYNC_REPLICATION", "") not in ("", "0"),
                    redis_cluster=os.environ.get("DEVSTACK_REDIS_CLUSTER", "") not in ("", "0"))
