"""The locust users still speak the protocol: a short headless run against a
real server makes every flow's calls and none of them fails."""

import asyncio
import csv
import os
import sys

from tests.conftest import ROOT


async def run_locust(server, tmp_path, extra_env: dict, *args: str) -> tuple[dict, str]:
    """A headless locust run of every user signing up; its stats by name and its output.
    Any failed call fails the test."""
    env = dict(os.environ, LOADTEST_ACCOUNTS=str(tmp_path / "accounts.json"), LOADTEST_SIGNUP_SHARE="1",
               LOADTEST_THINK="0.1", **extra_env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", *args, "--stop-timeout", "5",
        "--host", server.http, "--csv", str(tmp_path / "run"), "--only-summary", "--loglevel", "WARNING",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    with open(tmp_path / "run_stats.csv") as f:
        stats = {r["Name"]: r for r in csv.DictReader(f) if r["Type"]}
    failures = {name: r["Failure Count"] for name, r in stats.items() if r["Failure Count"] != "0"}
    assert not failures, out.decode()[-3000:]
    assert proc.returncode == 0, out.decode()[-3000:]
    return stats, out.decode()


async def test_a_short_locust_run_exercises_every_flow_without_failures(server, tmp_path):
    stats, _out = await run_locust(server, tmp_path, {}, "-u", "8", "-r", "8", "-t", "12s")
    # Every user signed up, was verified and opened its inbox; bookers
    # searched; the bookings, wallet and chat services were found and used.
    for name in ("auth.register", "/webhooks/kyc", "user.updated", "chat.conversations", "hosts.search",
                 "users.get", "wallet.topup"):
        assert int(stats[name]["Request Count"]) > 0, name
    assert {"bookings.create", "chat.send"} & set(stats), sorted(stats)


async def test_the_storm_shape_brings_every_user_back_after_dropping_all_sockets(server, tmp_path):
    users = 8
    stats, out = await run_locust(server, tmp_path, {
        "LOADTEST_SHAPE": "storm", "LOADTEST_USERS": str(users), "LOADTEST_RATE": "8",
        "LOADTEST_STORM_AT_S": "8", "LOADTEST_STORM_HOLD_S": "6"})
    # Every user's socket dropped once and each came back: reconnected,
    # resumed its user events and re-joined its rooms.
    assert int(stats["storm: back"]["Request Count"]) == users, out[-3000:]
    assert int(stats["events.resume"]["Request Count"]) >= users
