"""The stack's Redis: a daemonized ``redis-server`` without persistence,
found again through its pidfile, spoken to over a raw socket (stdlib only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from server.devstack.binaries import redis_server_bin
from server.devstack.process import cmdline, pid_alive, port_open, read_lines, rotate_log, tail, wait_until


@dataclass
class RedisServer:
    port: int
    dir: Path  # working dir and pidfile
    logfile: Path
    extra_args: list[str] = field(default_factory=list)  # e.g. a cluster node's settings

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(b"PING\r\n")
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        payload = f"*{len(args)}\r\n".encode()
        for a in args:
            b = a.encode()
            payload += b"$%d\r\n%s\r\n" % (len(b), b)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(payload)
                return s.recv(256)
        except OSError:
            return b""

    def _pid(self) -> int | None:
        lines = read_lines(self.pidfile)
        try:
            return int(lines[0].strip()) if lines else None
        except ValueError:
            return None

    def _our_pid(self) -> int | None:
        """The pidfile's pid if it is alive and a Redis (not a reused pid)."""
        pid = self._pid()
        if pid and pid_alive(pid) and "redis" in cmdline(pid):
            return pid
        return None

    @staticmethod
    def _terminate(pid: int, grace: float) -> None:
        os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not pid_alive(pid), grace):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid), 10)

    def ensure(self) -> None:
        """Start Redis unless it already answers on our port."""
        if self.ping():
            return
        pid = self._our_pid()
        if pid and f":{self.port}" in cmdline(pid):
            # still starting up?
            if wait_until(self.ping, 10):
                return
        if pid:
            # hung, or still running on a previous DEVSTACK_PORT
            self._terminate(pid, 10)
        self.pidfile.unlink(missing_ok=True)
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken by a non-Redis process; set DEVSTACK_PORT")
        rotate_log(self.logfile)
        args = [
            redis_server_bin(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
            "--dir", str(self.dir),
            *self.extra_args,
        ]
        proc = subprocess.run(
            args,
            cwd=str(self.dir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,
        )
        if proc.returncode != 0 or not wait_until(self.ping, 15):
            raise RuntimeError(
                f"could not start redis ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                f"log tail:\n{tail(self.logfile)}"
            )
        wait_until(lambda: self._pid() is not None, 5)

    def stop(self) -> None:
        pid = self._our_pid()
        if pid:
            self._terminate(pid, 15)
        elif self.ping():
            # running without (our) pidfile, e.g. pidfile deleted by hand
            self.command("SHUTDOWN", "NOSAVE")
        wait_until(lambda: not port_open(self.port), 10)
        self.pidfile.unlink(missing_ok=True)
