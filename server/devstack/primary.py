"""The primary: built once with initdb, with settings for a disposable
development database (no fsync) that a streaming replica can follow, then
started and checked on every run."""

from __future__ import annotations

from dataclasses import dataclass

from server.devstack.binaries import pg_tool
from server.devstack.osuser import chown_pg
from server.devstack.postgres import NODE_CONF, SUPERUSER, PgNode
from server.devstack.process import log

DATABASE = "hangout"
SLOT_NAME = "devstack_replica"

_CONF = """
# ---- devstack settings (server/devstack/primary.py) ----
listen_addresses = '127.0.0.1'
max_connections = 300
shared_buffers = 256MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
max_slot_wal_keep_size = 4GB
hot_standby = on
hot_standby_feedback = on
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
include_if_exists = '""" + NODE_CONF + """'
"""

_HBA = (
    "# devstack: trust everything on loopback / unix socket\n"
    "local   all           all                   trust\n"
    "host    all           all   127.0.0.1/32    trust\n"
    "local   replication   all                   trust\n"
    "host    replication   all   127.0.0.1/32    trust\n"
)


@dataclass
class Primary(PgNode):
    # The standby whose confirmation every commit waits for ("" for none):
    # synchronous replication, so that no acknowledged write is lost when
    # the standby is promoted.
    sync_standby: str = ""

    def node_conf_extra(self) -> str:
        if not self.sync_standby:
            return ""
        # The base settings turn synchronous_commit off (a disposable
        # database), which would skip the wait for the standby too.
        return f"synchronous_standby_names = '{self.sync_standby}'\nsynchronous_commit = on\n"

    def psql(self, sql: str, db: str = "postgres", timeout: float = 30) -> str:
        # The stack's own statements never wait for the standby: with
        # synchronous replication it is built and started after the primary.
        return super().psql(sql, db=f"dbname={db} options='-c synchronous_commit=local'", timeout=timeout)

    def system_id(self) -> str:
        """The identifier a replica's marker must match to follow this primary."""
        return self.marker()

    def build(self) -> None:
        log(f"initialising primary in {self.datadir}")
        self.kill()
        self.make_empty()
        self.run(
            [pg_tool("initdb"), "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"],
            timeout=300,
        )
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(_CONF)
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(_HBA)
        chown_pg(hba)
        self.write_node_conf()
        self.start()
        self.psql(f'CREATE DATABASE "{DATABASE}"')
        self.psql(f"SELECT pg_create_physical_replication_slot('{SLOT_NAME}')")
        self.write_marker(self.psql("SELECT system_identifier FROM pg_control_system()"))

    def ensure(self) -> None:
        """Start the primary, building it first if its data dir is not usable."""
        if not self.complete():
            if self.datadir.exists():
                log("primary data dir is missing or incomplete: rebuilding it")
            self.build()
            return
        changed = self.write_node_conf()
        try:
            self.start()
        except RuntimeError as e:
            if "PANIC" not in str(e):
                raise
            log(f"primary failed to start with a PANIC, rebuilding it:\n{e}")
            self.build()
            return
        if changed:
            # Already running with other settings (synchronous replication
            # turned on or off): they take effect on a reload.
            self.psql("SELECT pg_reload_conf()")
        # cheap invariants (the db / slot might have been dropped by hand)
        self.psql(
            f"SELECT pg_create_physical_replication_slot('{SLOT_NAME}') WHERE NOT EXISTS "
            f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{SLOT_NAME}')"
        )
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
            self.psql(f'CREATE DATABASE "{DATABASE}"')
