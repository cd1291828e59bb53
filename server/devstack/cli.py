"""``python -m server.devstack start|stop|restart|status|failover|rejoin``:
prints where each server listens and the URLs to export; ``status`` exits 1
unless all run. ``failover`` stops the primary at once and promotes the
replica; ``rejoin`` brings the old primary back as the primary with every
write the promoted replica took, and rebuilds the replica."""

from __future__ import annotations

import sys
import time
from typing import Sequence

from server.devstack.process import log
from server.devstack.stack import from_env


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else "status"
    stack = from_env()
    if cmd == "start":
        t0 = time.monotonic()
        stack.start()
        log(f"up in {time.monotonic() - t0:.1f}s")
    elif cmd == "stop":
        stack.stop()
    elif cmd == "restart":
        stack.stop()
        stack.start()
    elif cmd == "failover":
        stack.failover()
        log(f"the replica on port {stack.replica_port} is the primary now; "
            f"`python -m server devstack rejoin` gives the stack its roles back")
    elif cmd == "rejoin":
        stack.rejoin()
    elif cmd != "status":
        print("usage: python -m server.devstack start|stop|restart|status|failover|rejoin", file=sys.stderr)
        return 2
    st = stack.status()
    print(f"base dir     {stack.base_dir}")
    redis_port = stack.redis_cluster_ports[0] if stack.redis_cluster else stack.redis_port
    ports = {"primary": stack.primary_port, "replica": stack.replica_port, "redis": redis_port,
             "pgbouncer": stack.pgbouncer_port}
    for name, running in st.items():
        print(f"{name:<12} {'running' if running else 'stopped':<8} 127.0.0.1:{ports[name]}")
    for name, value in stack.server_env().items():
        print(f"{name}={value}")
    if not stack.pgbouncer:
        print(f"  (following a failover: DATABASE_URL={stack.failover_url})")
    if cmd == "status":
        return 0 if all(st.values()) else 1
    return 0
