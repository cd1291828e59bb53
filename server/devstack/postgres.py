"""Embedded development stack: PostgreSQL primary + streaming replica + Redis.

Everything lives under one base directory (default ``<repo>/.devstack``,
override with ``DEVSTACK_DIR``) and listens on 127.0.0.1 only, on
``DEVSTACK_PORT`` (default 25432) for the primary, +1 for the replica and
+2 for Redis.

Layout of the base directory::

    .lock                 fcntl lock serialising start/stop between processes
    primary/              PGDATA of the primary (owned by ``postgres`` when run as root)
    replica/              PGDATA of the streaming replica (pg_basebackup -R)
    run/                  unix socket directory of both PostgreSQL servers
    redis/                Redis working dir + redis.pid
    logs/                 primary.log, replica.log, redis.log

Stdlib only: the servers are driven through their command line tools.

    python -m server.devstack start|stop|status
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / ".devstack"
DEFAULT_PORT = 25432
DATABASE = "hangout"
SUPERUSER = "postgres"
SLOT_NAME = "devstack_replica"
PG_OS_USER = "postgres"  # OS account used to run PostgreSQL when we are root

_MARKER = ".devstack-ready"  # written last when a data dir is fully built
_NODE_CONF = "devstack_node.conf"  # per-node settings, rewritten on every start
_MAX_LOG_BYTES = 50 * 1024 * 1024

_PRIMARY_CONF = """
# ---- devstack settings (server/devstack.py) ----
listen_addresses = '127.0.0.1'
max_connections = 300
shared_buffers = 256MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
max_slot_wal_keep_size = 4GB
hot_standby = on
hot_standby_feedback = on
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
include_if_exists = '""" + _NODE_CONF + """'
"""


def _log(msg: str) -> None:
    print(f"[devstack] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# binaries / users
# --------------------------------------------------------------------------- #


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


@functools.lru_cache(maxsize=None)
def _pg_major(bindir: str) -> str:
    out = subprocess.run(
        [os.path.join(bindir, "pg_ctl"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "pg_ctl (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
    ver = out.split(")")[1].split()[0] if ")" in out else out.split()[-1]
    return ver.split(".")[0]


def redis_server_bin() -> str:
    exe = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(exe):
        raise RuntimeError("redis-server not found; run `make install` or set REDIS_SERVER")
    return exe


def _is_root() -> bool:
    return os.geteuid() == 0


def _pg_ids() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None to run as ourselves."""
    if not _is_root():
        return None
    try:
        pw = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root but there is no '{PG_OS_USER}' OS user to run PostgreSQL as"
        ) from None
    return pw.pw_uid, pw.pw_gid


def _pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C.UTF-8")
    ids = _pg_ids()
    if ids is not None:
        env["HOME"] = pwd.getpwuid(ids[0]).pw_dir
        env["USER"] = env["LOGNAME"] = PG_OS_USER
    return env


# --------------------------------------------------------------------------- #
# cross-process lock (re-entrant inside one process)
# --------------------------------------------------------------------------- #

_locks_guard = threading.Lock()
_locks: dict[str, list] = {}  # path -> [RLock, fd, depth]


@contextlib.contextmanager
def _dir_lock(base_dir: Path) -> Iterator[None]:
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


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def _pid_alive(pid: int) -> bool:
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


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
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


def _redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        payload += b"$%d\r\n%s\r\n" % (len(b), b)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(payload)
            return s.recv(256)
    except OSError:
        return b""


def _wait_until(pred, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _tail(path: Path, n: int = 30) -> str:
    lines = _read_lines(path)
    return "\n".join(lines[-n:])


def _rotate_log(path: Path) -> None:
    try:
        if path.stat().st_size > _MAX_LOG_BYTES:
            path.replace(path.with_suffix(path.suffix + ".1"))
    except OSError:
        pass


# --------------------------------------------------------------------------- #
# the stack
# --------------------------------------------------------------------------- #


@dataclass
class DevStack:
    base_dir: Path
    primary_port: int = DEFAULT_PORT
    replica_port: int = DEFAULT_PORT + 1
    redis_port: int = DEFAULT_PORT + 2

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).expanduser().absolute()
        self.primary_port = int(self.primary_port)
        self.replica_port = int(self.replica_port)
        self.redis_port = int(self.redis_port)

    # ---- URLs ------------------------------------------------------------ #

    @property
    def database_url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.primary_port}/{DATABASE}"

    @property
    def replica_urls(self) -> list[str]:
        return [f"postgresql://{SUPERUSER}@127.0.0.1:{self.replica_port}/{DATABASE}"]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # ---- paths ----------------------------------------------------------- #

    @property
    def primary_dir(self) -> Path:
        return self.base_dir / "primary"

    @property
    def replica_dir(self) -> Path:
        return self.base_dir / "replica"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "logs"

    @property
    def redis_dir(self) -> Path:
        return self.base_dir / "redis"

    @property
    def redis_pidfile(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def socket_dir(self) -> Path:
        """Unix socket dir: inside base_dir unless that path would be too long
        for a unix socket (sun_path is 108 bytes), then a short dir in /tmp."""
        d = self.base_dir / "run"
        if len(str(d / f".s.PGSQL.{max(self.primary_port, self.replica_port)}.lock")) < 100:
            return d
        h = hashlib.sha1(str(self.base_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"devstack-{h}"

    # ---- public API ------------------------------------------------------ #

    def start(self) -> None:
        """Create/start whatever is missing or stopped. Idempotent."""
        with self._lock():
            self._prepare_dirs()
            self._ensure_primary()
            self._ensure_replica()
            self._ensure_redis()

    def stop(self) -> None:
        """Stop replica, primary and Redis. Idempotent."""
        with self._lock():
            self._pg_stop(self.replica_dir, self.replica_port)
            self._pg_stop(self.primary_dir, self.primary_port)
            self._redis_stop()

    def stop_replica(self) -> None:
        with self._lock():
            self._pg_stop(self.replica_dir, self.replica_port)

    def start_replica(self) -> None:
        """Start the replica (building it if needed) and wait until it streams."""
        with self._lock():
            self._prepare_dirs()
            if not self.primary_running():
                self._ensure_primary()
            self._ensure_replica()

    def stop_redis(self) -> None:
        with self._lock():
            self._redis_stop()

    def start_redis(self) -> None:
        with self._lock():
            self._prepare_dirs()
            self._ensure_redis()

    def primary_running(self) -> bool:
        return self._pg_running(self.primary_dir, self.primary_port)

    def replica_running(self) -> bool:
        return self._pg_running(self.replica_dir, self.replica_port)

    def redis_running(self) -> bool:
        return _redis_ping(self.redis_port)

    def replica_streaming(self) -> bool:
        out = self._psql_try(self.replica_port, "select status from pg_stat_wal_receiver")
        return out == "streaming"

    def status(self) -> dict[str, bool]:
        return {
            "primary": self.primary_running(),
            "replica": self.replica_running(),
            "redis": self.redis_running(),
        }

    # ---- internals: generic ---------------------------------------------- #

    def _lock(self):
        return _dir_lock(self.base_dir)

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.log_dir, self.redis_dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
        ids = _pg_ids()
        if ids is not None:
            # postgres writes its logs and sockets here; Redis (run as us) can
            # still write into logs/ because we are root.
            for d in (self.log_dir, self.socket_dir):
                os.chown(d, *ids)
            os.chmod(self.socket_dir, 0o755)
            probe = self._run_pg(["/usr/bin/test", "-w", str(self.log_dir)], check=False)
            if probe.returncode != 0:
                raise RuntimeError(
                    f"the '{PG_OS_USER}' OS user cannot reach {self.base_dir} (a parent "
                    f"directory is not traversable by it); pick a DEVSTACK_DIR it can access"
                )

    def _run_pg(
        self,
        args: Sequence[str],
        check: bool = True,
        timeout: float | None = 120,
        new_session: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool, as the postgres OS user if we are root."""
        ids = _pg_ids()
        kwargs: dict = {}
        if ids is not None:
            kwargs.update(user=ids[0], group=ids[1], extra_groups=[])
        proc = subprocess.run(
            list(args),
            cwd=str(self.base_dir),
            env=_pg_env(),
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

    def _bin(self, name: str) -> str:
        return str(pg_bindir() / name)

    def _psql(self, port: int, sql: str, db: str = "postgres", timeout: float = 30) -> str:
        proc = self._run_pg(
            [
                self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER, "-d", db, "-c", sql,
            ],
            timeout=timeout,
        )
        return proc.stdout.strip()

    def _psql_try(self, port: int, sql: str, db: str = "postgres") -> str | None:
        try:
            return self._psql(port, sql, db=db, timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return None

    def _chown_pg(self, path: Path) -> None:
        ids = _pg_ids()
        if ids is not None:
            os.chown(path, *ids)

    def _rmtree(self, path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)

    def _make_pgdata_dir(self, path: Path) -> None:
        self._rmtree(path)
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)
        self._chown_pg(path)

    # ---- internals: PostgreSQL ------------------------------------------- #

    def _pg_major(self) -> str:
        return _pg_major(str(pg_bindir()))

    def _pgdata_complete(self, path: Path) -> bool:
        try:
            if not (path / _MARKER).is_file():
                return False
            for f in ("PG_VERSION", "postgresql.conf", "global/pg_control"):
                if not (path / f).is_file():
                    return False
            return (path / "PG_VERSION").read_text().strip() == self._pg_major()
        except OSError:
            return False

    def _postmaster_pid(self, datadir: Path) -> tuple[int, int | None] | None:
        """(pid, port) from postmaster.pid, or None."""
        lines = _read_lines(datadir / "postmaster.pid")
        if not lines:
            return None
        try:
            pid = int(lines[0].strip())
        except ValueError:
            return None
        port = None
        if len(lines) > 3:
            try:
                port = int(lines[3].strip())
            except ValueError:
                pass
        return pid, port

    def _our_postmaster_alive(self, datadir: Path) -> bool:
        info = self._postmaster_pid(datadir)
        if info is None or not _pid_alive(info[0]):
            return False
        cmd = _cmdline(info[0])
        return "postgres" in cmd and str(datadir) in cmd

    def _pg_isready(self, port: int) -> bool:
        proc = self._run_pg(
            [self._bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port),
             "-U", SUPERUSER, "-d", "postgres", "-t", "3"],
            check=False,
            timeout=15,
        )
        return proc.returncode == 0

    def _pg_running(self, datadir: Path, port: int) -> bool:
        if not self._our_postmaster_alive(datadir):
            return False
        info = self._postmaster_pid(datadir)
        if info and info[1] is not None and info[1] != port:
            return False
        return self._pg_isready(port)

    def _write_node_conf(self, datadir: Path, port: int, name: str, extra: str = "") -> None:
        text = (
            "# generated by server/devstack.py on every start -- do not edit\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            f"cluster_name = 'devstack-{name}-{port}'\n" + extra
        )
        path = datadir / _NODE_CONF
        try:
            if path.read_text() == text:
                return
        except OSError:
            pass
        path.write_text(text)
        self._chown_pg(path)

    def _replica_node_extra(self) -> str:
        conninfo = (
            f"host=127.0.0.1 port={self.primary_port} user={SUPERUSER} "
            f"application_name=devstack_replica"
        )
        return (
            f"primary_conninfo = '{conninfo}'\n"
            f"primary_slot_name = '{SLOT_NAME}'\n"
            "hot_standby = on\n"
            "hot_standby_feedback = on\n"
            # The feedback (the oldest row version the replica's reads may
            # still need) goes out at most this often; until it does, the
            # primary keeps every version since the last one. At the default
            # 10 s, a row updated 25 times a second (a wallet in
            # loadtests/bench_bookings.py) grew a chain of hundreds of dead
            # versions that every look-up of it walked.
            "wal_receiver_status_interval = 1s\n"
        )

    def _pg_start(self, datadir: Path, port: int, name: str) -> None:
        """Start a postmaster on datadir; robust to stale pidfiles / unclean stops."""
        logfile = self.log_dir / f"{name}.log"
        last_err = ""
        for attempt in range(4):
            if self._pg_running(datadir, port):
                return
            if self._our_postmaster_alive(datadir):
                # starting up / recovering, or running on an old port
                info = self._postmaster_pid(datadir)
                if info and info[1] is not None and info[1] != port:
                    _log(f"{name}: running on old port {info[1]}, restarting on {port}")
                    self._pg_stop(datadir, info[1])
                elif _wait_until(lambda: self._pg_isready(port), 60, 0.3):
                    return
                else:
                    raise RuntimeError(
                        f"{name} postmaster is alive but not accepting connections; "
                        f"log tail:\n{_tail(logfile)}"
                    )
            pidfile = datadir / "postmaster.pid"
            info = self._postmaster_pid(datadir)
            if info and _pid_alive(info[0]):
                # PID got reused by an unrelated process (e.g. after a reboot):
                # postgres would refuse to start, so drop the stale lock file.
                _log(f"{name}: removing stale postmaster.pid (pid {info[0]} is not ours)")
                pidfile.unlink(missing_ok=True)
            if _port_open(port):
                raise RuntimeError(
                    f"port {port} is taken by another process; set DEVSTACK_PORT to use "
                    f"other ports"
                )
            _rotate_log(logfile)
            proc = self._run_pg(
                [self._bin("pg_ctl"), "-D", str(datadir), "-l", str(logfile),
                 "-w", "-t", "120", "start"],
                check=False,
                timeout=180,
                new_session=True,
            )
            if proc.returncode == 0 and _wait_until(lambda: self._pg_isready(port), 30, 0.2):
                return
            last_err = f"{proc.stdout}{proc.stderr}\nlog tail:\n{_tail(logfile)}"
            # e.g. orphaned backends of a killed postmaster still holding the
            # shared memory interlock: give them a moment to exit and retry.
            time.sleep(1 + attempt)
        raise RuntimeError(f"could not start {name} PostgreSQL:\n{last_err}")

    def _pg_stop(self, datadir: Path, port: int) -> None:
        if not (datadir / "postmaster.pid").exists():
            return
        if not self._our_postmaster_alive(datadir):
            return  # stale pidfile, nothing runs
        for mode, t in (("fast", 60), ("immediate", 30)):
            proc = self._run_pg(
                [self._bin("pg_ctl"), "-D", str(datadir), "-m", mode, "-w", "-t", str(t), "stop"],
                check=False,
                timeout=t + 30,
            )
            if proc.returncode == 0 or not self._our_postmaster_alive(datadir):
                break
        _wait_until(lambda: not self._our_postmaster_alive(datadir), 30)
        _wait_until(lambda: not _port_open(port), 10)

    def _kill_postmaster_in(self, datadir: Path) -> None:
        if self._our_postmaster_alive(datadir):
            self._run_pg(
                [self._bin("pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "stop"],
                check=False,
            )

    def _build_primary(self) -> None:
        final = self.primary_dir
        _log(f"initialising primary in {final}")
        self._kill_postmaster_in(final)
        self._rmtree(final)
        self._make_pgdata_dir(final)
        self._run_pg(
            [self._bin("initdb"), "-D", str(final), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"],
            timeout=300,
        )
        conf = final / "postgresql.conf"
        with conf.open("a") as f:
            f.write(_PRIMARY_CONF)
        hba = final / "pg_hba.conf"
        hba.write_text(
            "# devstack: trust everything on loopback / unix socket\n"
            "local   all           all                   trust\n"
            "host    all           all   127.0.0.1/32    trust\n"
            "local   replication   all                   trust\n"
            "host    replication   all   127.0.0.1/32    trust\n"
        )
        self._chown_pg(hba)
        self._write_node_conf(final, self.primary_port, "primary")
        self._pg_start(final, self.primary_port, "primary")
        self._psql(self.primary_port, f'CREATE DATABASE "{DATABASE}"')
        self._psql(self.primary_port, f"SELECT pg_create_physical_replication_slot('{SLOT_NAME}')")
        sysid = self._psql(self.primary_port, "SELECT system_identifier FROM pg_control_system()")
        (final / _MARKER).write_text(sysid + "\n")
        self._chown_pg(final / _MARKER)

    def _ensure_primary(self) -> None:
        d = self.primary_dir
        if not self._pgdata_complete(d):
            if d.exists():
                _log("primary data dir is missing or incomplete: rebuilding it")
            self._build_primary()
            return
        self._write_node_conf(d, self.primary_port, "primary")
        try:
            self._pg_start(d, self.primary_port, "primary")
        except RuntimeError as e:
            if "PANIC" not in str(e):
                raise
            _log(f"primary failed to start with a PANIC, rebuilding it:\n{e}")
            self._build_primary()
            return
        # cheap invariants (the db / slot might have been dropped by hand)
        self._psql(
            self.primary_port,
            f"SELECT pg_create_physical_replication_slot('{SLOT_NAME}') WHERE NOT EXISTS "
            f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{SLOT_NAME}')",
        )
        if self._psql(self.primary_port, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
            self._psql(self.primary_port, f'CREATE DATABASE "{DATABASE}"')

    def _primary_sysid(self) -> str:
        try:
            return (self.primary_dir / _MARKER).read_text().strip()
        except OSError:
            return ""

    def _replica_complete(self) -> bool:
        d = self.replica_dir
        if not self._pgdata_complete(d) or not (d / "standby.signal").exists():
            return False
        try:
            return (d / _MARKER).read_text().strip() == self._primary_sysid()
        except OSError:
            return False

    def _build_replica(self) -> None:
        d = self.replica_dir
        _log(f"building replica in {d} with pg_basebackup")
        self._kill_postmaster_in(d)
        self._rmtree(d)
        self._make_pgdata_dir(d)
        self._run_pg(
            [self._bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary_port),
             "-U", SUPERUSER, "-D", str(d), "-R", "-X", "stream", "-c", "fast",
             "-S", SLOT_NAME, "--no-sync"],
            timeout=600,
        )
        # connection settings live in the per-node conf (regenerated on each
        # start so a changed DEVSTACK_PORT keeps working): drop -R's copies.
        auto = d / "postgresql.auto.conf"
        lines = [
            ln for ln in _read_lines(auto)
            if not ln.split("=")[0].strip() in ("primary_conninfo", "primary_slot_name")
        ]
        auto.write_text("\n".join(lines) + "\n")
        self._write_node_conf(d, self.replica_port, "replica", self._replica_node_extra())
        (d / _MARKER).write_text(self._primary_sysid() + "\n")
        self._chown_pg(d / _MARKER)

    def _wait_streaming(self, timeout: float) -> bool:
        return _wait_until(self.replica_streaming, timeout, 0.2)

    def _ensure_replica(self) -> None:
        d = self.replica_dir
        built = False
        if not self._replica_complete():
            if d.exists():
                _log("replica data dir is missing, incomplete or from another primary: rebuilding")
            self._build_replica()
            built = True
        self._write_node_conf(d, self.replica_port, "replica", self._replica_node_extra())
        try:
            self._pg_start(d, self.replica_port, "replica")
            if self._wait_streaming(60):
                return
            err = f"replica is not streaming; log tail:\n{_tail(self.log_dir / 'replica.log')}"
        except RuntimeError as e:
            err = str(e)
        if built:
            raise RuntimeError(err)
        # A replica is disposable: rebuild once from the primary.
        _log(f"replica unhealthy, rebuilding it: {err.splitlines()[0] if err else ''}")
        self._pg_stop(d, self.replica_port)
        self._build_replica()
        self._pg_start(d, self.replica_port, "replica")
        if not self._wait_streaming(60):
            raise RuntimeError(
                f"rebuilt replica is not streaming; log tail:\n{_tail(self.log_dir / 'replica.log')}"
            )

    # ---- internals: Redis ------------------------------------------------ #

    def _redis_pid(self) -> int | None:
        lines = _read_lines(self.redis_pidfile)
        try:
            return int(lines[0].strip()) if lines else None
        except ValueError:
            return None

    def _our_redis_pid(self) -> int | None:
        pid = self._redis_pid()
        if pid and _pid_alive(pid) and "redis" in _cmdline(pid):
            return pid
        return None

    def _ensure_redis(self) -> None:
        if _redis_ping(self.redis_port):
            return
        pid = self._our_redis_pid()
        if pid and f":{self.redis_port}" in _cmdline(pid):
            # still starting up?
            if _wait_until(lambda: _redis_ping(self.redis_port), 10):
                return
        if pid:
            # hung, or still running on a previous DEVSTACK_PORT
            os.kill(pid, signal.SIGTERM)
            if not _wait_until(lambda: not _pid_alive(pid), 10):
                os.kill(pid, signal.SIGKILL)
                _wait_until(lambda: not _pid_alive(pid), 10)
        self.redis_pidfile.unlink(missing_ok=True)
        if _port_open(self.redis_port):
            raise RuntimeError(
                f"port {self.redis_port} is taken by a non-Redis process; set DEVSTACK_PORT"
            )
        logfile = self.log_dir / "redis.log"
        _rotate_log(logfile)
        args = [
            redis_server_bin(),
            "--port", str(self.redis_port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--pidfile", str(self.redis_pidfile),
            "--logfile", str(logfile),
            "--dir", str(self.redis_dir),
        ]
        proc = subprocess.run(
            args,
            cwd=str(self.redis_dir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,
        )
        if proc.returncode != 0 or not _wait_until(lambda: _redis_ping(self.redis_port), 15):
            raise RuntimeError(
                f"could not start redis ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                f"log tail:\n{_tail(logfile)}"
            )
        _wait_until(lambda: self._redis_pid() is not None, 5)

    def _redis_stop(self) -> None:
        pid = self._our_redis_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            if not _wait_until(lambda: not _pid_alive(pid), 15):
                os.kill(pid, signal.SIGKILL)
                _wait_until(lambda: not _pid_alive(pid), 10)
        elif _redis_ping(self.redis_port):
            # running without (our) pidfile, e.g. pidfile deleted by hand
            _redis_command(self.redis_port, "SHUTDOWN", "NOSAVE")
        _wait_until(lambda: not _port_open(self.redis_port), 10)
        self.redis_pidfile.unlink(missing_ok=True)


def from_env() -> DevStack:
    base = Path(os.environ.get("DEVSTACK_DIR") or DEFAULT_DIR)
    port = int(os.environ.get("DEVSTACK_PORT") or DEFAULT_PORT)
    return DevStack(base_dir=base, primary_port=port, replica_port=port + 1, redis_port=port + 2)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else "status"
    stack = from_env()
    if cmd == "start":
        t0 = time.monotonic()
        stack.start()
        _log(f"up in {time.monotonic() - t0:.1f}s")
    elif cmd == "stop":
        stack.stop()
    elif cmd in ("restart",):
        stack.stop()
        stack.start()
    elif cmd != "status":
        print("usage: python -m server.devstack start|stop|restart|status", file=sys.stderr)
        return 2
    st = stack.status()
    print(f"base dir     {stack.base_dir}")
    for name, port in (("primary", stack.primary_port), ("replica", stack.replica_port),
                       ("redis", stack.redis_port)):
        print(f"{name:<12} {'running' if st[name] else 'stopped':<8} 127.0.0.1:{port}")
    print(f"DATABASE_URL={stack.database_url}")
    print(f"DATABASE_REPLICA_URLS={','.join(stack.replica_urls)}")
    print(f"REDIS_URL={stack.redis_url}")
    if cmd == "status":
        return 0 if all(st.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
