"""The production topology on this machine (docs/operations.md, "Deploying
on N hosts"), one network namespace per host:

    lb         10.77.0.2      nginx (deploy/nginx/), ports 80 and 443 (a self-signed certificate)
    pgbouncer  10.77.0.5      PgBouncer :6432 (deploy/pgbouncer/)
    redis      10.77.0.6      Redis :6379
    app1-3     10.77.0.11-13  a server with WORKERS=2 on :8080 each
    pg0        10.77.0.20     the PostgreSQL primary :5432
    pg1, pg2   10.77.0.21-22  streaming replicas :5432

(deploy/topology/datahost.py builds the data hosts.)

Clients reach nginx from the root namespace: 10.77.0.1, and 10.77.0.100-163
for clients that come as different addresses. ``Topology`` is a context
manager that tears everything down on the way out, even after a
failure; ``teardown()`` also cleans up after a run that was killed.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from deploy.topology import datahost, netns

ROOT = Path(__file__).resolve().parents[2]
BASE = Path("/tmp/hangout-topology")  # reachable by the postgres OS user
# Held while a topology exists: its names and subnet are fixed, so a second
# run would tear the first one down.
LOCK = Path("/tmp/hangout-topology.lock")
# Every host's logs of the last run, kept when the rest is torn down.
KEPT_LOGS = Path("/tmp/hangout-topology-logs")
NGINX_SITE = ROOT / "deploy" / "nginx" / "hangout.conf"
NGINX_UPSTREAMS = ROOT / "deploy" / "nginx" / "hangout-upstreams.conf"

LB = f"{netns.SUBNET}.2"
DATA_HOSTS = {"pgbouncer": datahost.PGBOUNCER, "redis": datahost.REDIS, "pg0": datahost.PRIMARY,
              **{f"pg{n}": a for n, a in enumerate(datahost.REPLICAS, 1)}}
APP_HOSTS = {f"app{i}": f"{netns.SUBNET}.{10 + i}" for i in (1, 2, 3)}
# Addresses in the root namespace that load clients bind to, so that the
# servers' per-address limits apply per client as behind a real nginx.
CLIENT_ADDRESSES = [f"{netns.SUBNET}.{i}" for i in range(100, 164)]
SERVER_PORT = 8080
WORKERS = 2


def log(msg: str) -> None:
    print(f"[topology] {msg}", file=sys.stderr, flush=True)


def nginx_bin() -> str:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(exe):
        raise RuntimeError("nginx not found: `make test-topology` installs Debian's package")
    return exe


@dataclass
class Topology:
    base: Path = BASE
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    kyc_secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    ops_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    server_settings: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    lock_fd: int | None = None

    # ---- where things are -------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://{LB}/ws"

    @property
    def http_url(self) -> str:
        return f"http://{LB}"

    @property
    def wss_url(self) -> str:
        return f"wss://{LB}/ws"

    @property
    def https_url(self) -> str:
        return f"https://{LB}"

    @property
    def tls_certificate(self) -> Path:
        """nginx's certificate, self-signed: what a client of ``wss_url`` trusts."""
        return self.base / "nginx" / "tls" / "hangout.crt"

    @property
    def primary_url(self) -> str:
        """The primary itself, for migrations and the test's own checks."""
        return f"postgresql://{datahost.DB_USER}@{datahost.PRIMARY}:{datahost.PG_PORT}/hangout"

    def server_env(self) -> dict[str, str]:
        bouncer = (f"postgresql://{datahost.DB_USER}:{datahost.DB_PASSWORD}@"
                   f"{datahost.PGBOUNCER}:{datahost.PGBOUNCER_PORT}")
        return {
            "DATABASE_URL": f"{bouncer}/hangout",
            "DATABASE_REPLICA_URLS": ",".join(
                f"{bouncer}/hangout_replica{n}" for n in range(1, len(datahost.REPLICAS) + 1)),
            "MIGRATE_DATABASE_URL": self.primary_url,
            "DB_STATEMENT_CACHE_SIZE": "0",
            "REDIS_URL": f"redis://{datahost.REDIS}:{datahost.REDIS_PORT}/0",
            "JWT_SECRET": self.jwt_secret,
            "KYC_WEBHOOK_SECRET": self.kyc_secret,
            "OPS_TOKEN": self.ops_token,
            "HOST": "0.0.0.0",
            "PORT": str(SERVER_PORT),
            "WORKERS": str(WORKERS),
            "TRUSTED_PROXIES": f"{LB}/32",
            **self.server_settings,
        }

    # ---- building it ------------------------------------------------------

    def __enter__(self) -> "Topology":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        self.lock_fd = _lock()
        _teardown(self.base)  # whatever an interrupted run left
        self.base.mkdir(parents=True)
        self.base.chmod(0o755)
        (self.base / "logs").mkdir()
        netns.make_bridge()
        netns.add_client_addresses(CLIENT_ADDRESSES)
        for name, address in {"lb": LB, **DATA_HOSTS, **APP_HOSTS}.items():
            netns.add_host(name, address)

        log("data hosts: a primary, 2 replicas streaming from it, PgBouncer, Redis")
        self._datahost("pg0", "primary")
        for n in range(1, len(datahost.REPLICAS) + 1):
            self._datahost(f"pg{n}", "replica", str(n))
        self._datahost("pgbouncer", "pgbouncer")
        self._datahost("redis", "redis")
        log("migrating through the primary")
        subprocess.run([sys.executable, "-m", "server", "migrate"], cwd=ROOT, check=True, timeout=120,
                       env={**os.environ, **self.server_env(), "DATABASE_URL": self.primary_url})
        for name in APP_HOSTS:
            self.start_server(name)
        self.start_nginx()
        for name, address in APP_HOSTS.items():
            self.wait_ready(f"http://{address}:{SERVER_PORT}/readyz", name)
        self.wait_ready(f"{self.http_url}/readyz", "nginx")
        log(f"up: clients connect to {self.ws_url}; logs are kept in {KEPT_LOGS} at the end")

    def _datahost(self, host: str, role: str, *args: str) -> None:
        self._in(host, [sys.executable, "-m", "deploy.topology.datahost", role, str(self.base / "data"), *args])

    def _in(self, host: str, args: list[str], timeout: float = 600) -> None:
        proc = subprocess.run(["ip", "netns", "exec", netns.PREFIX + host, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{host}: {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")

    def add_host(self, name: str, address: str) -> None:
        """Another host on the bridge (for a test's own processes)."""
        netns.add_host(name, address)

    def spawn(self, key: str, host: str, args: list[str], env: dict[str, str] | None = None) -> None:
        """Run ``args`` on ``host``, logging to ``<key>.log``; it dies with the host."""
        logfile = (self.base / "logs" / f"{key}.log").open("ab")
        self.procs[key] = subprocess.Popen(
            ["ip", "netns", "exec", netns.PREFIX + host, *args], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=logfile, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
        logfile.close()

    def start_server(self, host: str) -> None:
        self.spawn(host, host, [sys.executable, "-m", "server"], self.server_env())

    def start_nginx(self) -> None:
        run = self.base / "nginx"
        run.mkdir()
        (run / "hangout-upstreams.conf").write_text(
            upstreams_config([f"{a}:{SERVER_PORT}" for a in APP_HOSTS.values()]))
        # The site and the upstream settings are deploy/nginx/'s as shipped;
        # only the main context, the servers' addresses and the certificate
        # (self-signed, for nginx's address) are this machine's.
        tls = run / "tls"
        tls.mkdir()
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "2", "-subj", "/CN=hangout-topology", "-addext", f"subjectAltName=IP:{LB}",
             "-keyout", str(tls / "hangout.key"), "-out", str(tls / "hangout.crt")],
            check=True, capture_output=True, timeout=30)
        (run / "hangout.conf").write_text(site_config(tls))
        (run / "nginx.conf").write_text(f"""
worker_processes 1;
pid {run}/nginx.pid;
error_log {self.base}/logs/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    include {run}/hangout-upstreams.conf;
    include {run}/hangout.conf;
}}
""")
        self._in("lb", [nginx_bin(), "-t", "-p", str(run), "-c", str(run / "nginx.conf")], timeout=30)
        self.spawn("nginx", "lb", [nginx_bin(), "-p", str(run), "-c", str(run / "nginx.conf"), "-g", "daemon off;"])

    def wait_ready(self, url: str, what: str, timeout: float = 90) -> None:
        """Poll ``url`` until it answers 200 (another process: nothing to await)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            for key, proc in self.procs.items():
                if key not in self.killed and proc.poll() is not None:
                    raise RuntimeError(f"{key} exited ({proc.returncode}); its log: {KEPT_LOGS}/{key}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready at {url} within {timeout:.0f}s")
            time.sleep(0.2)

    # ---- breaking it ------------------------------------------------------

    def kill_host(self, host: str, vanish: bool = False) -> None:
        """The host dies: every process on it SIGKILLed, then its namespace
        and link deleted. Its kernel closes their connections, unless it
        ``vanish``es: then its link goes down first, as when a machine loses
        power or its network, and the other hosts hear nothing more from it."""
        self.killed.add(host)
        if vanish:
            netns.ip("link", "set", netns.veth_of(netns.PREFIX + host), "down")
        netns.remove_host(netns.PREFIX + host)
        proc = self.procs.get(host)
        if proc is not None:
            proc.wait(timeout=10)

    def down(self) -> None:
        if self.lock_fd is None:
            return  # never built, or another run's
        try:
            # The servers and nginx go first, so that nothing is left to
            # complain that the databases went away.
            for name in ("lb", *APP_HOSTS):
                if netns.PREFIX + name in netns.namespaces():
                    netns.kill_all(netns.PREFIX + name)
            datahost.stop_postgres(self.base / "data")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"stopping the hosts: {e}")
        finally:
            keep_logs(self.base)
            _teardown(self.base)
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            if self.lock_fd is not None:
                os.close(self.lock_fd)  # releases the flock
                self.lock_fd = None


def site_config(tls: Path) -> str:
    """deploy/nginx/hangout.conf with its certificate and key in ``tls``."""
    shipped = "/etc/nginx/tls/"
    site = NGINX_SITE.read_text()
    if site.count(shipped) != 2:
        raise RuntimeError(f"{NGINX_SITE} no longer names its certificate and key in {shipped}")
    return site.replace(shipped, f"{tls}/")


def upstreams_config(servers: list[str]) -> str:
    """deploy/nginx/hangout-upstreams.conf with ``servers`` in place of its
    example ones, each with the example's parameters."""
    out: list[str] = []
    listed = False
    for line in NGINX_UPSTREAMS.read_text().splitlines():
        words = line.split()
        if words[:1] == ["server"]:
            if not listed:
                out += [f"    server {s} {' '.join(words[2:])}" for s in servers]
                listed = True
            continue
        out.append(line)
    if not listed:
        raise RuntimeError(f"{NGINX_UPSTREAMS} lists no server")
    return "\n".join(out) + "\n"


def keep_logs(base: Path) -> None:
    """Copy every host's logs (servers, nginx, the data hosts) to ``KEPT_LOGS``."""
    shutil.rmtree(KEPT_LOGS, ignore_errors=True)
    KEPT_LOGS.mkdir(parents=True)
    for logs in (base / "logs", base / "data" / "logs"):
        if logs.is_dir():
            for f in logs.iterdir():
                if f.is_file():
                    shutil.copy(f, KEPT_LOGS / f.name)


def _lock() -> int:
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another topology run holds {LOCK}") from None
    return fd


def _teardown(base: Path) -> None:
    netns.teardown()
    if base.exists():
        shutil.rmtree(base)


def teardown(base: Path = BASE) -> None:
    """Every namespace, link and file of the topology, even half built
    (refused while a run holds the lock)."""
    fd = _lock()
    try:
        if base.exists():
            keep_logs(base)
        _teardown(base)
    finally:
        os.close(fd)
