"""The data host of the topology, built from the dev stack's parts and run
inside its namespace (``ip netns exec``), where 127.0.0.1 is the host's own
loopback: a PostgreSQL primary with two streaming replicas (each through
its own slot), PgBouncer in transaction mode with the config in
deploy/pgbouncer/, and Redis, all listening on the host's address too.

    python -m deploy.topology.datahost up|down BASE_DIR ADDRESS

PostgreSQL and PgBouncer run as the ``postgres`` OS user.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from server.devstack.binaries import redis_server_bin
from server.devstack.osuser import chown_pg, run_pg
from server.devstack.pgbouncer import pgbouncer_bin
from server.devstack.primary import Primary
from server.devstack.process import wait_until
from server.devstack.replica import Replica

ROOT = Path(__file__).resolve().parents[2]
PGBOUNCER_INI = ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini"

PRIMARY_PORT = 5432
REPLICA_PORTS = (5433, 5434)
PGBOUNCER_PORT = 6432
REDIS_PORT = 6379
DB_USER = "postgres"
DB_PASSWORD = "topology-password"  # PgBouncer checks it (scram); a throwaway host


@dataclass
class TopologyPrimary(Primary):
    address: str = ""

    def node_conf_extra(self) -> str:
        # Migrations and the test's checks reach the primary from other hosts.
        return super().node_conf_extra() + f"listen_addresses = '127.0.0.1,{self.address}'\n"

    def build(self) -> None:
        super().build()
        # Copied into the replicas by pg_basebackup. Trust is for this
        # disposable, private subnet only.
        hba = self.datadir / "pg_hba.conf"
        subnet = self.address.rsplit(".", 1)[0] + ".0/24"
        with hba.open("a") as f:
            f.write(f"host    all           all   {subnet}    trust\n")
        self.psql("SELECT pg_reload_conf()")


def nodes(base: Path, address: str) -> tuple[TopologyPrimary, list[Replica]]:
    common = dict(socket_dir=base / "run", log_dir=base / "logs", cwd=base)
    primary = TopologyPrimary("primary", base / "primary", PRIMARY_PORT, address=address, **common)
    replicas = [
        Replica(f"replica{i}", base / f"replica{i}", port, primary=primary, slot=f"topology_replica{i}",
                application_name=f"topology_replica{i}", **common)
        for i, port in enumerate(REPLICA_PORTS, 1)
    ]
    return primary, replicas


def pgbouncer_config(base: Path, address: str) -> str:
    """deploy/pgbouncer/pgbouncer.ini with this host's databases, addresses
    and files: every other setting is the shipped one."""
    databases = {"hangout": PRIMARY_PORT, **{f"hangout_replica{i}": p for i, p in enumerate(REPLICA_PORTS, 1)}}
    local = {
        "listen_addr": f"127.0.0.1,{address}",
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
                out += [f"{name} = host=127.0.0.1 port={port} dbname=hangout" for name, port in databases.items()]
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


def up(base: Path, address: str) -> None:
    for d in ("run", "logs", "pgbouncer", "redis"):
        (base / d).mkdir(parents=True, exist_ok=True)
        chown_pg(base / d)
    primary, replicas = nodes(base, address)
    primary.ensure()
    primary.psql(f"ALTER USER {DB_USER} PASSWORD '{DB_PASSWORD}'")
    for replica in replicas:
        primary.psql(f"SELECT pg_create_physical_replication_slot('{replica.slot}') WHERE NOT EXISTS "
                     f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{replica.slot}')")
        replica.ensure()

    ini = base / "pgbouncer" / "pgbouncer.ini"
    ini.write_text(pgbouncer_config(base, address))
    userlist = base / "pgbouncer" / "userlist.txt"
    userlist.write_text(f'"{DB_USER}" "{DB_PASSWORD}"\n')
    for f in (ini, userlist):
        chown_pg(f)
    run_pg([pgbouncer_bin(), "-d", str(ini)], base, timeout=30, new_session=True)

    subprocess.run(
        [redis_server_bin(), "--port", str(REDIS_PORT), "--bind", "127.0.0.1", address,
         "--protected-mode", "no", "--save", "", "--appendonly", "no", "--daemonize", "yes",
         "--dir", str(base / "redis"), "--logfile", str(base / "logs" / "redis.log")],
        check=True, timeout=30, start_new_session=True, stdin=subprocess.DEVNULL,
    )
    for port in (PGBOUNCER_PORT, REDIS_PORT):
        if not wait_until(lambda: _listening(address, port), 15):
            raise RuntimeError(f"nothing listens on {address}:{port}; logs in {base / 'logs'}")


def _listening(address: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def down(base: Path, address: str) -> None:
    """Stop the PostgreSQL servers cleanly enough that they leave no shared
    memory behind; the rest dies with the namespace."""
    primary, replicas = nodes(base, address)
    for node in (*replicas, primary):
        node.kill()


def main(argv: list[str]) -> int:
    command, base, address = argv
    {"up": up, "down": down}[command](Path(base), address)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
