"""``make loadtest``: the mixed locust load against a local server, or any deployment.

    python -m loadtests.run_locust                       # 500 users, 60 s, local server
    python -m loadtests.run_locust -u 100 -t 30s -r 20
    python -m loadtests.run_locust --host https://staging.example   # no local server
    LOADTEST_USERS=1000 LOADTEST_TIME=5m make loadtest

Locally it starts the dev stack (server/devstack/), migrates, runs
``python -m server`` with WORKERS=2 on a free port, runs locust headless
against it, stops the server and prints one line per method. Reports go to
``loadtests/reports/`` (``locust_stats.csv`` and the others, ``locust.html``).
The exit code is locust's: non-zero when any call failed.

Before locust starts, the account pool (loadtests/accounts.py) is filled up
to the number of users (``--no-seed`` skips that), so that most users open
a stored session instead of all signing up in the first seconds.

Settings (argument, then environment, then default):
  -u/--users LOADTEST_USERS 500, -r/--rate LOADTEST_RATE 25 (users started a
  second), -t/--time LOADTEST_TIME 60s, --host LOADTEST_HOST (none: local),
  --processes LOADTEST_PROCESSES 1 (locust worker processes; -1 = one per core),
  --workers LOADTEST_SERVER_WORKERS 2 (local server processes),
  --shape LOADTEST_SHAPE none (``ramp`` or ``storm``: loadtests/shapes.py; the
  shape then sets the users over time, from -u and -r, instead of -t).
Against another deployment also set KYC_WEBHOOK_SECRET to its webhook secret.

Every locust user connects from this machine's one address, so the local
server starts with the edge's limits raised (``LOCAL_LIMITS``: sockets per
address and in all, sign-ups and logins per address, the deadline of an
unauthenticated socket). A deployment under test must raise the same for
the load generator's address, or the load tests those limits instead
(docs/security.md).
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "loadtests" / "reports"


def start_local_server(workers: int) -> tuple[subprocess.Popen, str]:
    """Dev stack + ``python -m server`` (WORKERS processes) on a free port."""
    from server import devstack
    from server.devstack.process import free_port

    stack = devstack.from_env()
    stack.start()
    port = free_port()
    from loadtests.benchlib import LOCAL_LIMITS
    from server.config import dev_secrets

    env = dict(
        os.environ,
        **dev_secrets(),
        **stack.server_env(),
        HOST="127.0.0.1",
        PORT=str(port),
        WORKERS=str(workers),
        # Its own metrics port: never in the way of a server already running here.
        METRICS_PORT=os.environ.get("METRICS_PORT") or str(free_port()),
        LOG_LEVEL=os.environ.get("LOADTEST_SERVER_LOG_LEVEL", "WARNING"),
        PYTHONUNBUFFERED="1",
        **LOCAL_LIMITS,
    )
    # Its own session, so that stopping it reaches the worker processes too.
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # the first start migrates
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit("server did not become ready in 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the parent forwards it to its workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and its live children."""
    import psutil  # a locust dependency

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class CpuWatch:
    """Who used the 2 cores during the run: the server, locust, and everyone
    (the machine is shared; a busy neighbour shows up here)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float, float]] = []

    def sample(self, server_pid: int | None, locust_pid: int) -> None:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
        self.samples.append((time.monotonic(), _tree_cpu(server_pid) if server_pid else 0.0,
                             _tree_cpu(locust_pid), busy))

    def summary(self) -> str:
        if len(self.samples) < 2:
            return ""
        (t0, s0, l0, b0), (t1, s1, l1, b1) = self.samples[0], max(self.samples, key=lambda x: x[2])
        dt = t1 - t0
        cores = os.cpu_count() or 1
        return (f"CPU over the run ({cores} cores): server {(s1 - s0) / dt:.2f} cores, locust {(l1 - l0) / dt:.2f}, "
                f"whole machine {(b1 - b0) / dt:.2f} busy")


def _ms(value: str) -> str:
    try:
        return f"{float(value):.0f}"
    except ValueError:
        return value


def print_table(stats_csv: Path) -> None:
    """One line per method from locust's ``*_stats.csv``."""
    if not stats_csv.exists():
        print(f"no stats at {stats_csv}")
        return
    with stats_csv.open() as f:
        rows = list(csv.DictReader(f))
    print()
    print(f"{'type':<6} {'name':<34} {'calls':>8} {'fails':>6} {'rps':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for r in rows:
        kind = r["Type"] or ""
        print(
            f"{kind:<6} {r['Name']:<34} {r['Request Count']:>8} {r['Failure Count']:>6} "
            f"{float(r['Requests/s']):>8.1f} {_ms(r['50%']):>7} {_ms(r['90%']):>7} {_ms(r['99%']):>7} {_ms(r['Max Response Time']):>7}"
        )


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="python -m loadtests.run_locust", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-u", "--users", type=int, default=int(env("LOADTEST_USERS", "500")))
    ap.add_argument("-r", "--rate", type=float, default=float(env("LOADTEST_RATE", "25")))
    ap.add_argument("-t", "--time", default=env("LOADTEST_TIME", "60s"))
    ap.add_argument("--host", default=env("LOADTEST_HOST") or None,
                    help="base URL of a running deployment (http[s]://host[:port]); none = start one here")
    ap.add_argument("--processes", type=int, default=int(env("LOADTEST_PROCESSES", "1")),
                    help="locust processes (-1: one per core); 1 = no forking")
    ap.add_argument("--workers", type=int, default=int(env("LOADTEST_SERVER_WORKERS", "2")),
                    help="server processes when running locally")
    ap.add_argument("--shape", choices=["", "ramp", "storm"], default=env("LOADTEST_SHAPE", ""),
                    help="a load shape (loadtests/shapes.py) instead of the flat load")
    ap.add_argument("--no-seed", action="store_true", help="do not fill the account pool before the run")
    ap.add_argument("locust_args", nargs="*", help="passed to locust as they are (after --)")
    args = ap.parse_args(argv)
    # The shape is read by the locustfile, in every locust process.
    os.environ["LOADTEST_SHAPE"] = args.shape
    os.environ["LOADTEST_USERS"], os.environ["LOADTEST_RATE"] = str(args.users), str(args.rate)

    REPORTS.mkdir(parents=True, exist_ok=True)
    server = None
    host = args.host
    if host is None:
        # The local server's port changes from run to run; its accounts do not.
        from server import devstack

        slug = str(devstack.from_env().base_dir).strip("/").replace("/", "-")
        os.environ.setdefault("LOADTEST_ACCOUNTS", str(REPORTS / f"accounts-local-{slug}.json"))
        server, host = start_local_server(args.workers)
        print(f"local server ({args.workers} workers) at {host}", flush=True)
    try:
        if not args.no_seed:
            import asyncio

            from loadtests.seed_accounts import seed

            hosts = (args.users + 3) // 4  # the Host:Booker weights are 1:3
            asyncio.run(seed(host, hosts, args.users - hosts))
    except BaseException:
        if server is not None:
            stop_server(server)
        raise
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", *([] if args.shape else ["-u", str(args.users), "-r", str(args.rate), "-t", args.time]),
        "--host", host, "--stop-timeout", "5",
        "--csv", str(REPORTS / "locust"), "--html", str(REPORTS / "locust.html"),
        "--only-summary",
    ]
    if args.processes != 1:
        cmd += ["--processes", str(args.processes)]
    cmd += args.locust_args
    print(" ".join(cmd), flush=True)
    watch = CpuWatch()
    try:
        locust = subprocess.Popen(cmd, cwd=ROOT)
        while locust.poll() is None:
            watch.sample(server.pid if server else None, locust.pid)
            try:
                locust.wait(2)
            except subprocess.TimeoutExpired:
                pass
        code = locust.returncode
    finally:
        if server is not None:
            stop_server(server)
    print_table(REPORTS / "locust_stats.csv")
    print(watch.summary())
    print(f"\nreports: {REPORTS}/locust_stats.csv, {REPORTS}/locust.html; locust exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
