"""Process and log-file helpers shared by the stack's servers: is a pid
alive and whose is it, is a port taken, wait for a condition, tail and
rotate a log."""

from __future__ import annotations

import os
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
