"""The stack's Redis Cluster (``DEVSTACK_REDIS_CLUSTER=1``): three masters
without replicas or persistence, each a ``RedisServer`` with cluster mode
on, joined once by ``redis-cli --cluster create``. Each node keeps its
``nodes.conf``, so nodes stopped and started again form the same cluster
(with no data, like the single Redis after a restart)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from server.devstack.process import wait_until
from server.devstack.redis_server import RedisServer

NODES = 3
SLOTS = 16384


@dataclass
class RedisClusterNodes:
    ports: list[int]  # client ports; each node's bus is on its port + 10
    dir: Path
    log_dir: Path

    @property
    def nodes(self) -> list[RedisServer]:
        return [
            RedisServer(port, self.dir / f"node{i}", self.log_dir / f"redis-node{i}.log",
                        ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-port", str(port + 10), "--cluster-node-timeout", "2000",
                         # Fan-out and presence keep working while a slot is away.
                         "--cluster-require-full-coverage", "no"])
            for i, port in enumerate(self.ports)
        ]

    def ping(self, timeout: float = 1.0) -> bool:
        return all(node.ping(timeout) for node in self.nodes) and self._state_ok()

    def _state_ok(self) -> bool:
        return b"cluster_state:ok" in self.nodes[0].command("CLUSTER", "INFO")

    def ensure(self) -> None:
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            node.ensure()
        if self._state_ok():
            return
        if b"cluster_known_nodes:1\r" in self.nodes[0].command("CLUSTER", "INFO"):
            redis_cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
            proc = subprocess.run(
                [redis_cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {proc.stdout}{proc.stderr}")
        if not wait_until(lambda: all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes), 30):
            raise RuntimeError(f"the redis cluster on ports {self.ports} did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
