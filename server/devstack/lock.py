"""The base directory's lock: serialises start/stop between processes
(flock on ``<base>/.lock``) and is re-entrant inside one process, so the
facade's public methods can call each other."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import Iterator

_locks_guard = threading.Lock()
_locks: dict[str, list] = {}  # path -> [RLock, fd, depth]


@contextlib.contextmanager
def dir_lock(base_dir: Path) -> Iterator[None]:
    key = str(base_dir)
    with _locks_guard:
        entry = _locks.setdefault(key, [threading.RLock(), None, 0])
    rlock = entry[0]
    with rlock:
        if entry[2] == 0:
            base_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(base_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            entry[1] = fd
        entry[2] += 1
        try:
            yield
        finally:
            entry[2] -= 1
            if entry[2] == 0:
                fd, entry[1] = entry[1], None
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
