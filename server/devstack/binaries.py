"""Where the stack's server binaries are: PostgreSQL's (the newest installed
major, or ``PG_BINDIR``) and ``redis-server`` (or ``REDIS_SERVER``)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path


def _version_key(p: Path) -> tuple:
    try:
        return (0, float(p.parent.name))
    except ValueError:
        return (-1, 0.0)


def pg_bindir() -> Path:
    """Directory holding initdb/pg_ctl/pg_basebackup/psql/pg_isready."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    cands = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")),
        key=_version_key,
        reverse=True,
    )
    if cands:
        return cands[0]
    which = shutil.which("pg_ctl")
    if which:
        return Path(os.path.realpath(which)).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin "
        "and PATH); run `make install` or set PG_BINDIR"
    )


def pg_tool(name: str) -> str:
    return str(pg_bindir() / name)


@functools.lru_cache(maxsize=None)
def _pg_major(bindir: str) -> str:
    out = subprocess.run(
        [os.path.join(bindir, "pg_ctl"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "pg_ctl (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
    ver = out.split(")")[1].split()[0] if ")" in out else out.split()[-1]
    return ver.split(".")[0]


def pg_major() -> str:
    """Major version of the binaries, to tell whether a data dir is theirs."""
    return _pg_major(str(pg_bindir()))


def redis_server_bin() -> str:
    exe = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(exe):
        raise RuntimeError("redis-server not found; run `make install` or set REDIS_SERVER")
    return exe
