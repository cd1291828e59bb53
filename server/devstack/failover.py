"""Failover in the dev stack: the replica promoted to primary, and the old
primary brought back.

``failover`` is what an operator (or Patroni) does when the primary dies:
the primary is stopped at once if it still runs (``pg_ctl stop -m
immediate``, as if its host died) and the replica is promoted (``pg_ctl
promote``). Writes then go to the replica's port; a server whose
``DATABASE_URL`` lists both hosts with ``target_session_attrs=read-write``
finds it without a restart.

``rejoin`` gives the stack its roles back without losing what the promoted
replica committed: the old primary's data dir is made afresh as a standby of
the promoted replica (``pg_basebackup``: the dev stack runs without
``wal_log_hints`` or checksums, which ``pg_rewind`` needs), catches up, and
takes over in a switchover (the promoted replica stops cleanly, which sends
its standby every last WAL record, and the old primary is promoted); the
replica is then rebuilt from it as usual (``DevStack.start``).
"""

from __future__ import annotations

import subprocess

from server.devstack.binaries import pg_tool
from server.devstack.postgres import SUPERUSER, PgNode
from server.devstack.process import log, tail, wait_until

PROMOTE_TIMEOUT_S = 60
CATCH_UP_TIMEOUT_S = 60


def in_recovery(node: PgNode) -> bool | None:
    """Whether ``node`` is a standby (None: it does not answer)."""
    answer = node.psql_try("SELECT pg_is_in_recovery()")
    return None if answer is None else answer == "t"


def was_promoted(replica: PgNode) -> bool:
    """The replica's data dir is a whole copy (its marker was written last)
    without ``standby.signal``: it was promoted, and holds writes that the
    old primary may lack."""
    return bool(replica.marker()) and (replica.datadir / "PG_VERSION").is_file() \
        and not (replica.datadir / "standby.signal").exists()


def promote(node: PgNode) -> None:
    """``pg_ctl promote``, then wait until ``node`` takes writes."""
    node.run([pg_tool("pg_ctl"), "-D", str(node.datadir), "-w", "-t", str(PROMOTE_TIMEOUT_S), "promote"],
             timeout=PROMOTE_TIMEOUT_S + 30)
    if not wait_until(lambda: in_recovery(node) is False, PROMOTE_TIMEOUT_S, 0.1):
        raise RuntimeError(f"{node.name} was promoted but still is not writable; log tail:\n{tail(node.logfile)}")


def failover(primary: PgNode, replica: PgNode) -> None:
    """Stop the primary at once (if it runs) and promote the replica."""
    if in_recovery(replica) is not True:
        raise RuntimeError("the replica is not a running standby: nothing to promote")
    primary.kill()
    log(f"promoting the replica on port {replica.port}")
    promote(replica)


def rejoin(primary: PgNode, replica: PgNode) -> None:
    """Bring the old primary back as the primary, with every write the
    promoted replica took; the replica is left stopped and not a standby,
    for ``Replica.ensure`` to rebuild."""
    replica.write_node_conf()
    replica.start()
    if in_recovery(replica) is not False:
        raise RuntimeError("the replica was not promoted: nothing to rejoin")
    log(f"rebuilding the old primary in {primary.datadir} as a standby of port {replica.port}")
    primary.kill()
    primary.make_empty()
    primary.run(
        [pg_tool("pg_basebackup"), "-h", "127.0.0.1", "-p", str(replica.port), "-U", SUPERUSER,
         "-D", str(primary.datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync"],
        timeout=600,
    )
    primary.write_node_conf()  # the copy has the replica's port
    primary.start()
    if not wait_until(lambda: primary.psql_try("SELECT status FROM pg_stat_wal_receiver") == "streaming",
                      CATCH_UP_TIMEOUT_S, 0.2):
        raise RuntimeError(f"the old primary does not stream; log tail:\n{tail(primary.logfile)}")
    # A clean stop sends the standby everything, up to the shutdown
    # checkpoint; the switchover waits until it has replayed that too.
    replica.stop()
    last = checkpoint_lsn(replica)
    if not wait_until(lambda: _replayed(primary) >= last, CATCH_UP_TIMEOUT_S, 0.1):
        raise RuntimeError("the old primary did not replay the promoted replica's last WAL")
    log(f"switching back: promoting the old primary on port {primary.port}")
    promote(primary)
    primary.drop_standby_conninfo()


def checkpoint_lsn(node: PgNode) -> int:
    """The latest checkpoint of a stopped server, from its control file."""
    out = node.run([pg_tool("pg_controldata"), "-D", str(node.datadir)]).stdout
    for line in out.splitlines():
        if line.startswith("Latest checkpoint location:"):
            return _lsn(line.split(":", 1)[1].strip())
    raise RuntimeError(f"no checkpoint location in pg_controldata's output:\n{out}")


def _replayed(node: PgNode) -> int:
    try:
        return _lsn(node.psql("SELECT pg_last_wal_replay_lsn()", timeout=10))
    except (RuntimeError, subprocess.TimeoutExpired):
        return -1


def _lsn(text: str) -> int:
    if not text or "/" not in text:
        return -1
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
