"""The data hosts of the topology, built from the dev stack's parts. Each
role runs inside its own host's namespace (``ip netns exec``), where
127.0.0.1 is that host's loopback:

    python -m deploy.topology.datahost primary|pgbouncer|redis BASE_DIR
    python -m deploy.topology.datahost replica BASE_DIR N

A PostgreSQL primary, replicas that stream from it over the network (each
through its own slot), PgBouncer in transaction mode with the config in
deploy/pgbouncer/ in front of all of them, and Redis. PostgreSQL and
PgBouncer run as the ``postgres`` OS user.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.topology.netns import SUBNET
from server.devstack.binaries import redis_server_bin
from server.devstack.osuser import chown_pg, run_pg
from server.devstack.pgbouncer import pgbouncer_bin
from server.devstack.postgres import PgNode
from server.devstack.primary import Primary
from server.devstack.process import wait_until
from server.devstack.replica import Replica

ROOT = Path(__file__).resolve().parents[2]
PGBOUNCER_INI = ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini"

PRIMARY = f"{SUBNET}.20"
REPLICAS = (f"{SUBNET}.21", f"{SUBNET}.22")
PGBOUNCER = f"{SUBNET}.5"
REDIS = f"{SUBNET}.6"
PG_PORT = 5432
PGBOUNCER_PORT = 6432
REDIS_PORT = 6379
DB_USER = "postgres"
DB_PASSWORD = "topology-password"  # PgBouncer checks it (scram); throwaway hosts


def _listen(address: str) -> str:
    # Other hosts connect: the servers (migrations), PgBouncer, the replicas, the test.
    return f"listen_addresses = '127.0.0.1,{address}'\n"


@dataclass
class TopologyPrimary(Primary):
    address: str = ""

    def node_conf_extra(self) -> str:
        return super().node_conf_extra() + _listen(self.address)

    def build(self) -> None:
        super().build()
        # Copied into the replicas by pg_basebackup. Trust is for this
        # disposable, private subnet only.
        with (self.datadir / "pg_hba.conf").open("a") as f:
            f.write(f"host    all           all   {SUBNET}.0/24    trust\n"
                    f"host    replication   all   {SUBNET}.0/24    trust\n")
        self.psql("SELECT pg_reload_conf()")


@dataclass
class TopologyReplica(Replica):
    address: str = ""

    def node_conf_extra(self) -> str:
        return super().node_conf_extra() + _listen(self.address)


def _common(base: Path, name: str) -> dict:
    # A socket directory per node: they all listen on the same port.
    return dict(socket_dir=base / f"run-{name}", log_dir=base / "logs", cwd=base)


def primary_node(base: Path) -> TopologyPrimary:
    return TopologyPrimary("primary", base / "primary", PG_PORT, address=PRIMARY, **_common(base, "primary"))


def replica_node(base: Path, n: int) -> TopologyReplica:
    name = f"replica{n}"
    return TopologyReplica(name, base / name, PG_PORT, primary=primary_node(base), slot=f"topology_{name}",
                           application_name=f"topology_{name}", primary_host=PRIMARY,
                           address=REPLICAS[n - 1], **_common(base, name))


def pg_nodes(base: Path) -> list[PgNode]:
    return [primary_node(base), *(replica_node(base, n) for n in range(1, len(REPLICAS) + 1))]


def _dirs(base: Path, *names: str) -> None:
    for d in names:
        (base / d).mkdir(parents=True, exist_ok=True)
        chown_pg(base / d)


def primary(base: Path) -> None:
    _dirs(base, "logs", "run-primary")
    node = primary_node(base)
    node.ensure()
    node.psql(f"ALTER USER {DB_USER} PASSWORD '{DB_PASSWORD}'")
    for n in range(1, len(REPLICAS) + 1):
        slot = replica_node(base, n).slot
        node.psql(f"SELECT pg_create_physical_replication_slot('{slot}') WHERE NOT EXISTS "
                  f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')")


def replica(base: Path, n: int) -> None:
    _dirs(base, "logs", f"run-replica{n}")
    replica_node(base, n).ensure()


def pgbouncer_config(base: Path) -> str:
    """deploy/pgbouncer/pgbouncer.ini with this topology's databases,
    address and files: every other setting is the shipped one."""
    databases = {"hangout": PRIMARY, **{f"hangout_replica{n}": a for n, a in enumerate(REPLICAS, 1)}}
    local = {
        "listen_addr": f"127.0.0.1,{PGBOUNCER}",
        "listen_port": str(PGBOUNCER_PORT),
        "unix_socket_dir": "",
        "auth_file": str(base / "pgbouncer" / "userlist.txt"),
        "logfile": str(base / "logs" / "pgbouncer.log"),
        "pidfile": str(base / "pgbouncer" / "pgbouncer.pid"),
    }
    out: list[str] = []
    section = ""
    for line in PGBOUNCER_INI.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
            out.append(line)
            if section == "[databases]":
                out += [f"{name} = host={address} port={PG_PORT} dbname=hangout" for name, address in databases.items()]
            continue
        key = stripped.split("=", 1)[0].strip() if "=" in stripped and not stripped.startswith(";") else ""
        if section == "[databases]" and key:
            continue
        if key in local:
            line = f"{key} = {local.pop(key)}"
        out.append(line)
    if local:
        raise RuntimeError(f"{PGBOUNCER_INI} lacks {sorted(local)}")
    return "\n".join(out) + "\n"


def pgbouncer(base: Path) -> None:
    _dirs(base, "logs", "pgbouncer")
    ini = base / "pgbouncer" / "pgbouncer.ini"
    ini.write_text(pgbouncer_config(base))
    userlist = base / "pgbouncer" / "userlist.txt"
    userlist.write_text(f'"{DB_USER}" "{DB_PASSWORD}"\n')
    for f in (ini, userlist):
        chown_pg(f)
    run_pg([pgbouncer_bin(), "-d", str(ini)], base, timeout=30, new_session=True)
    _wait_listening(PGBOUNCER, PGBOUNCER_PORT, base)


def redis(base: Path) -> None:
    _dirs(base, "logs", "redis")
    subprocess.run(
        [redis_server_bin(), "--port", str(REDIS_PORT), "--bind", "127.0.0.1", REDIS,
         "--protected-mode", "no", "--save", "", "--appendonly", "no", "--daemonize", "yes",
         "--dir", str(base / "redis"), "--logfile", str(base / "logs" / "redis.log")],
        check=True, timeout=30, start_new_session=True, stdin=subprocess.DEVNULL,
    )
    _wait_listening(REDIS, REDIS_PORT, base)


def _wait_listening(address: str, port: int, base: Path) -> None:
    def listening() -> bool:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return True
        except OSError:
            return False

    if not wait_until(listening, 15):
        raise RuntimeError(f"nothing listens on {address}:{port}; logs in {base / 'logs'}")


def stop_postgres(base: Path) -> None:
    """Stop every PostgreSQL server at once (signals, from any namespace),
    so that none leaves shared memory behind; the rest dies with its host."""
    for node in reversed(pg_nodes(base)):
        node.kill()


def main(argv: list[str]) -> int:
    role, base, *rest = argv
    if role == "replica":
        replica(Path(base), int(rest[0]))
    else:
        {"primary": primary, "pgbouncer": pgbouncer, "redis": redis}[role](Path(base))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
