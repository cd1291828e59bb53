"""What the benchmark scripts share: the dev stack, a server process, bench
users with access tokens, and reading a process's memory.

Benchmarks run here on a shared 2-core machine, so each one measures its
target and its yardstick in the same run and reports the ratio.

Every benchmark connects from 127.0.0.1 alone, so its server starts with the
edge's limits raised (``LOCAL_LIMITS``: sockets per address and in all,
sign-ups and logins per address, and a long deadline for sockets that sit
unauthenticated); the benchmarks measure the server's work, not those
limits (docs/security.md). ``OPS_TOKEN`` lets them read the counters on the metrics port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Coroutine, Iterable, TypeVar

import asyncpg

from server.devstack.process import free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH_PASSWORD = "bench password 1"
T = TypeVar("T")

# The limits a public server keeps per client address, raised for one
# machine that plays thousands of clients (see the module's docstring).
LOCAL_LIMITS = {
    "MAX_SOCKETS_PER_ADDRESS": "1000000",
    "MAX_SOCKETS": "1000000",
    "AUTH_MAX_PER_ADDRESS": "1000000",
    "AUTH_DEADLINE_S": "3600",
}
OPS_TOKEN = "bench-ops-token-for-local-servers-only"


def run(main: "Coroutine[Any, Any, T]") -> T:
    """Run a benchmark's load generator: on uvloop, with the garbage
    collector settled as in the server, so that the client's own pauses and
    CPU weigh as little as possible in what it measures (it shares the two
    cores with the server and PostgreSQL)."""
    import uvloop

    from server.runtime import settle_heap

    settle_heap()
    return uvloop.run(main)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by child processes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU time a process has used so far; with ``reaped``,
    only that of its children that have ended (and been waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    first = 13 if reaped else 11
    return (int(fields[first]) + int(fields[first + 1])) / ticks


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat:
    how much of the machine a window used, whoever used it."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / ticks, sum(values) / ticks


def cpu_by_role(server_pid: int | None, redis_port: int | None,
                pg_ports: Iterable[int] | None = None) -> dict[str, float]:
    """CPU seconds used so far by each part of the benchmark on this machine:
    the dev stack's PostgreSQL (primary and replica: backends, WAL sender,
    receiver and replay), its Redis (``redis_port``), the hangout server
    (``server_pid`` and its worker processes) and this process, the load
    generator. PostgreSQL's backends that ended count through their
    postmaster (which waits for them); other processes that ended in
    between are not counted, as the ones measured here live for the whole
    run. With ``pg_ports``, only the dev stacks' servers on those ports
    count as PostgreSQL (not other checkouts' stacks on the machine)."""
    roles = {"postgres": 0.0, "redis": 0.0, "server": 0.0, "load": 0.0}
    postmasters: set[int] = set()
    pg_titles = tuple(f"postgres: devstack-{kind}-{port}:" for port in pg_ports or ()
                      for kind in ("primary", "replica"))
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            role = ("postgres" if cmd.startswith(pg_titles or "postgres: devstack-")
                    else "redis" if "redis-server" in cmd and f":{redis_port}" in cmd
                    else "server" if server_pid is not None and server_pid in (pid, ppid)
                    else "load" if pid == me else None)
            if role is not None:
                roles[role] += cpu_seconds(pid)
            if role == "postgres":
                postmasters.add(ppid)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    for pid in postmasters:
        with contextlib.suppress(OSError, ValueError, IndexError):
            roles["postgres"] += cpu_seconds(pid) + cpu_seconds(pid, reaped=True)
    return roles


@dataclass
class Stack:
    database_url: str
    replica_urls: list[str]
    redis_url: str

    @classmethod
    def dev(cls, database: str | None = None) -> "Stack":
        """The embedded dev stack (started if needed) with migrations applied;
        with ``database``, that database, made afresh (dropped first if it
        exists), instead of the dev server's."""
        from server import devstack
        from server.db.migrate import migrate

        stack = devstack.from_env()
        stack.start()
        if database is None:
            asyncio.run(migrate(stack.database_url))
            return cls(stack.database_url, list(stack.replica_urls), stack.redis_url)
        primary = _with_database(stack.database_url, database)
        replicas = [_with_database(url, database) for url in stack.replica_urls]
        asyncio.run(_fresh_database(stack.database_url, database, replicas))
        asyncio.run(migrate(primary))
        return cls(primary, replicas, stack.redis_url)

    @property
    def primary_port(self) -> int:
        from urllib.parse import urlparse

        return urlparse(self.database_url).port or 5432


@dataclass
class Server:
    """One ``python -m server serve`` process (WORKERS=1) on a free port."""

    stack: Stack
    env: dict[str, str] = field(default_factory=dict)
    root: Path = ROOT  # another checkout (git worktree) runs that code instead, for A/B runs
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics(self) -> str:
        """The operators' port: /metrics and /status."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "Server":
        from server.config import dev_secrets

        env = dict(
            os.environ,
            **dev_secrets(),
            DATABASE_URL=self.stack.database_url,
            DATABASE_REPLICA_URLS=",".join(self.stack.replica_urls),
            REDIS_URL=self.stack.redis_url,
            HOST="127.0.0.1",
            PORT=str(self.port),
            WORKERS="1",
            HANGOUT_SKIP_MIGRATE="1",
            LOG_LEVEL=os.environ.get("BENCH_SERVER_LOG_LEVEL", "WARNING"),
            PYTHONUNBUFFERED="1",
            OPS_TOKEN=OPS_TOKEN,
            METRICS_PORT=str(self.metrics_port),
            **LOCAL_LIMITS,
        )
        env.update(self.env)
        # ``-m`` puts the working directory first on sys.path, so ``root``'s
        # code is the code that runs, whatever the venv has installed.
        self.proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=self.root, env=env)
        wait_http(self.http + "/healthz", self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def bench_users(database_url: str, count: int, prefix: str) -> list[uuid.UUID]:
    """``count`` real users (made once, reused by later runs), verified, each
    with a refresh-token family of its own. Made in SQL because registering
    10,000 users through argon2 would take minutes and measure nothing here."""
    from server.credentials import _hasher

    password_hash = _hasher.hash(BENCH_PASSWORD)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """INSERT INTO users (email, password_hash, name, gender, kyc_status)
               SELECT $1 || i || '@bench.example', $2, 'Bench ' || i, 'female', 'verified'
               FROM generate_series(1, $3) AS i
               ON CONFLICT (email) DO NOTHING""",
            prefix, password_hash, count,
        )
        # In the order of their numbers, so that a run pairs the same users
        # as the runs before it (the bench conversations are reused).
        rows = await conn.fetch(
            """SELECT u.id FROM generate_series(1, $2) AS g(i)
               JOIN users u ON u.email = $1 || g.i || '@bench.example' ORDER BY g.i""",
            prefix, count,
        )
    finally:
        await conn.close()
    return [r["id"] for r in rows]


async def access_tokens(database_url: str, users: list[uuid.UUID], ttl_s: int = 3600) -> list[str]:
    """A fresh token family per user and an access token in it, signed with
    the server's JWT secret (JWT_SECRET, the dev secret by default)."""
    from server.credentials import issue_access_token
    from server.config import dev_secrets

    secret = dev_secrets()["JWT_SECRET"]
    conn = await asyncpg.connect(database_url)
    try:
        families = await conn.fetch(
            "INSERT INTO refresh_token_families (user_id) SELECT unnest($1::uuid[]) RETURNING id, user_id", users
        )
    finally:
        await conn.close()
    family_of = {r["user_id"]: r["id"] for r in families}
    return [issue_access_token(secret, ttl_s, u, family_of[u]) for u in users]


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, "/" + name, u.query, u.fragment))


async def _fresh_database(admin_url: str, name: str, replica_urls: list[str], timeout: float = 30) -> None:
    """Drop and create database ``name``, and wait until every replica has it."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    deadline = time.monotonic() + timeout
    for url in replica_urls:
        while True:  # replay has no event to wait on
            try:
                await (await asyncpg.connect(url)).close()
                break
            except (OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


# ---- pgbench: the yardstick of every ratio -------------------------------------------


def _pg_bin(name: str) -> str:
    from server.devstack import pg_bindir

    path = pg_bindir() / name
    return str(path) if path.exists() else name


def _pg_args(database_url: str) -> list[str]:
    from urllib.parse import urlparse

    u = urlparse(database_url)
    return ["-h", u.hostname or "127.0.0.1", "-p", str(u.port or 5432), "-U", u.username or "postgres"]


async def ensure_pgbench_db(database_url: str, name: str) -> None:
    """Database ``name`` beside the app's, initialised by ``pgbench -i`` once."""
    conn = await asyncpg.connect(database_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/" + name)
    try:
        ready = await conn.fetchval("SELECT to_regclass('pgbench_accounts') IS NOT NULL")
    finally:
        await conn.close()
    if not ready:
        print(f"initialising database {name} with pgbench -i", flush=True)
        subprocess.run([_pg_bin("pgbench"), "-i", "-q", *_pg_args(database_url), name],
                       check=True, stdout=subprocess.DEVNULL)


def run_pgbench(database_url: str, name: str, clients: int, seconds: int, *options: str,
                jobs: int | None = None, latencies: list[float] | None = None) -> tuple[float, float]:
    """(tps, mean latency in ms) of pgbench with ``options`` (none: TPC-B-like;
    ``-S``: select-only) on database ``name``. With ``latencies``, every
    transaction's latency (ms) is appended to it (pgbench's ``-l`` log)."""
    import glob
    import re
    import tempfile

    if latencies is not None:
        with tempfile.TemporaryDirectory(prefix="pgbench-log-") as log_dir:
            result = run_pgbench(database_url, name, clients, seconds, *options, "-l",
                                 f"--log-prefix={log_dir}/pgbench", jobs=jobs)
            for path in glob.glob(f"{log_dir}/pgbench*"):
                with open(path) as log:  # client id, transaction no, latency in us, ...
                    latencies.extend(int(line.split()[2]) / 1000.0 for line in log)
        return result

    jobs = jobs or min(clients, os.cpu_count() or 1)
    out = subprocess.run(
        [_pg_bin("pgbench"), *options, "-c", str(clients), "-j", str(jobs), "-T", str(seconds),
         *_pg_args(database_url), name],
        check=True, capture_output=True, text=True,
    ).stdout
    m = re.search(r"tps = ([\d.]+) \(without initial connection", out) or re.search(r"tps = ([\d.]+)", out)
    if not m:
        raise RuntimeError(f"no tps in pgbench output:\n{out}")
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    return float(m.group(1)), float(latency.group(1)) if latency else float("nan")
