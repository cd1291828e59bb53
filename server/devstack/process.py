"""Process and log-file helpers shared by the stack's servers: is a pid
alive and whose is it, is a port taken, a free port for a local server,
wait for a condition, tail and rotate a log."""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Callable

MAX_LOG_BYTES = 50 * 1024 * 1024


def log(msg: str) -> None:
    print(f"[devstack] {msg}", file=sys.stderr, flush=True)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        if state == b"Z":
            return False
    except (OSError, IndexError):
        pass
    return True


def cmdline(pid: int) -> str:
    """The process's command line, to tell our server from a reused pid."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


# Where ``free_port`` looks: below the dev stacks' ports (DEVSTACK_PORT,
# 25432 by default, and the few above it) and below Linux's ephemeral range
# (32768-60999 by default). The kernel gives ports of that range to every
# outgoing connection (to PostgreSQL, Redis, another server), so a port
# found free there can become the local port of a client socket before the
# process it was meant for binds it, which then fails to start.
LOCAL_PORTS = (10_000, 25_000)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a server process
    of a test or a benchmark to listen on (``LOCAL_PORTS``). Drawn at
    random, so that two drawn one after the other before either is bound
    are not the same."""
    low, high = LOCAL_PORTS[0], min(LOCAL_PORTS[1], _ephemeral_low())
    for _ in range(100):
        port = random.randrange(low, high) if high > low else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port on 127.0.0.1 in {low}-{high - 1}")


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` passes (these are other
    processes: there is nothing to await)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: Path, n: int = 30) -> str:
    lines = read_lines(path)
    return "\n".join(lines[-n:])


def rotate_log(path: Path) -> None:
    try:
        if path.stat().st_size > MAX_LOG_BYTES:
            path.replace(path.with_suffix(path.suffix + ".1"))
    except OSError:
        pass
