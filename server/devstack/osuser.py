"""Running PostgreSQL's tools as the ``postgres`` OS user when we are root:
PostgreSQL refuses to run as root, so its files and processes belong to
that account."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from typing import Sequence

PG_OS_USER = "postgres"


def pg_ids() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root but there is no '{PG_OS_USER}' OS user to run PostgreSQL as"
        ) from None
    return pw.pw_uid, pw.pw_gid


def pg_env() -> dict[str, str]:
    """Our environment without PG* variables (they would redirect the tools)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C.UTF-8")
    ids = pg_ids()
    if ids is not None:
        env["HOME"] = pwd.getpwuid(ids[0]).pw_dir
        env["USER"] = env["LOGNAME"] = PG_OS_USER
    return env


def run_pg(
    args: Sequence[str],
    cwd: Path,
    check: bool = True,
    timeout: float | None = 120,
    new_session: bool = False,
) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool, as the postgres OS user if we are root."""
    ids = pg_ids()
    kwargs: dict = {}
    if ids is not None:
        kwargs.update(user=ids[0], group=ids[1], extra_groups=[])
    proc = subprocess.run(
        list(args),
        cwd=str(cwd),
        env=pg_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=new_session,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(args)}\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def chown_pg(path: Path) -> None:
    """Give a file we wrote to the account PostgreSQL runs as."""
    ids = pg_ids()
    if ids is not None:
        os.chown(path, *ids)
