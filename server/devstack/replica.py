"""The streaming replica: a pg_basebackup of the primary following it
through a replication slot. It is disposable: when it will not stream, or
belongs to another primary, it is rebuilt from the primary."""

from __future__ import annotations

from dataclasses import dataclass

from server.devstack.binaries import pg_tool
from server.devstack.postgres import SUPERUSER, PgNode
from server.devstack.primary import SLOT_NAME, Primary
from server.devstack.process import log, tail, wait_until

# How the primary knows the replica (``synchronous_standby_names``).
REPLICA_APPLICATION_NAME = "devstack_replica"


@dataclass
class Replica(PgNode):
    primary: Primary
    # A stack with several replicas gives each its own slot (which the
    # primary must hold) and name.
    slot: str = SLOT_NAME
    application_name: str = REPLICA_APPLICATION_NAME
    primary_host: str = "127.0.0.1"  # where the replica reaches the primary

    def node_conf_extra(self) -> str:
        conninfo = (
            f"host={self.primary_host} port={self.primary.port} user={SUPERUSER} "
            f"application_name={self.application_name}"
        )
        return (
            f"primary_conninfo = '{conninfo}'\n"
            f"primary_slot_name = '{self.slot}'\n"
            "hot_standby = on\n"
            "hot_standby_feedback = on\n"
            # The feedback (the oldest row version the replica's reads may
            # still need) goes out at most this often, and until it does the
            # primary keeps every version since the last one: at the default
            # 10 s a frequently updated row (a wallet under load) grows a long
            # chain of dead versions that every look-up of it walks.
            "wal_receiver_status_interval = 1s\n"
        )

    def streaming(self) -> bool:
        return self.psql_try("select status from pg_stat_wal_receiver") == "streaming"

    def complete(self) -> bool:
        """Fully built, a standby, and a copy of the current primary."""
        if not super().complete() or not (self.datadir / "standby.signal").exists():
            return False
        return self.marker() == self.primary.system_id()

    def build(self) -> None:
        d = self.datadir
        log(f"building replica in {d} with pg_basebackup")
        self.kill()
        self.make_empty()
        self.run(
            [pg_tool("pg_basebackup"), "-h", self.primary_host, "-p", str(self.primary.port),
             "-U", SUPERUSER, "-D", str(d), "-R", "-X", "stream", "-c", "fast",
             "-S", self.slot, "--no-sync"],
            timeout=600,
        )
        self.drop_standby_conninfo()  # they live in the node conf
        self.write_node_conf()
        self.write_marker(self.primary.system_id())

    def _wait_streaming(self, timeout: float) -> bool:
        return wait_until(self.streaming, timeout, 0.2)

    def ensure(self) -> None:
        """Start the replica (building it if needed) and wait until it streams."""
        built = False
        if not self.complete():
            if self.datadir.exists():
                log("replica data dir is missing, incomplete or from another primary: rebuilding")
            self.build()
            built = True
        self.write_node_conf()
        try:
            self.start()
            if self._wait_streaming(60):
                return
            err = f"replica is not streaming; log tail:\n{tail(self.logfile)}"
        except RuntimeError as e:
            err = str(e)
        if built:
            raise RuntimeError(err)
        log(f"replica unhealthy, rebuilding it: {err.splitlines()[0] if err else ''}")
        self.stop()
        self.build()
        self.start()
        if not self._wait_streaming(60):
            raise RuntimeError(f"rebuilt replica is not streaming; log tail:\n{tail(self.logfile)}")
