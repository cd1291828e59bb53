"""The locust users still speak the protocol: a short headless run against a
real server makes every flow's calls and none of them fails."""

import asyncio
import csv
import os
import sys

from tests.conftest import ROOT


async def test_a_short_locust_run_exercises_every_flow_without_failures(server, tmp_path):
    env = dict(os.environ, LOADTEST_ACCOUNTS=str(tmp_path / "accounts.json"), LOADTEST_SIGNUP_SHARE="1",
               LOADTEST_THINK="0.1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", "-u", "8", "-r", "8", "-t", "12s", "--stop-timeout", "5",
        "--host", server.http, "--csv", str(tmp_path / "run"), "--only-summary", "--loglevel", "WARNING",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    with open(tmp_path / "run_stats.csv") as f:
        stats = {r["Name"]: r for r in csv.DictReader(f) if r["Type"]}
    failures = {name: r["Failure Count"] for name, r in stats.items() if r["Failure Count"] != "0"}
    assert not failures, out.decode()[-3000:]
    assert proc.returncode == 0, out.decode()[-3000:]
    # Every user signed up, was verified and opened its inbox; bookers
    # searched; the bookings, wallet and chat services were found and used.
    for name in ("auth.register", "/webhooks/kyc", "user.updated", "chat.conversations", "hosts.search",
                 "users.get", "wallet.topup"):
        assert int(stats[name]["Request Count"]) > 0, name
    assert {"bookings.create", "chat.send"} & set(stats), sorted(stats)
