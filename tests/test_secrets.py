"""Secrets outside the dev stack: at least 32 bytes each, else ``serve``
exits 2 naming the variable; a server using the public development secrets
listens on 127.0.0.1 unless HOST says otherwise."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from server.config import DEV_JWT_SECRET, DEV_KYC_SECRET, MIN_SECRET_BYTES
from tests.conftest import ROOT, ServerProcess, free_port

LONG = "k" * MIN_SECRET_BYTES


def serve_env(stack, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HOST", "JWT_SECRET", "KYC_WEBHOOK_SECRET")}
    return dict(base, **stack.server_env(), PORT=str(free_port()), METRICS_PORT=str(free_port()), WORKERS="1",
                HANGOUT_SKIP_MIGRATE="1",
                LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", **env)


def refused(stack, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "serve"], cwd=ROOT, env=serve_env(stack, **env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["JWT_SECRET", "KYC_WEBHOOK_SECRET"])
def test_a_secret_one_byte_short_exits_2_naming_it(stack, name):
    env = {"JWT_SECRET": LONG, "KYC_WEBHOOK_SECRET": LONG, name: "k" * (MIN_SECRET_BYTES - 1)}
    done = refused(stack, **env)
    assert done.returncode == 2
    assert name in done.stderr
    other = ({"JWT_SECRET", "KYC_WEBHOOK_SECRET"} - {name}).pop()
    assert other not in done.stderr


def test_a_one_character_secret_exits_2(stack):
    done = refused(stack, JWT_SECRET="x", KYC_WEBHOOK_SECRET="y")
    assert done.returncode == 2
    assert "JWT_SECRET" in done.stderr and "KYC_WEBHOOK_SECRET" in done.stderr


def test_the_length_counts_bytes_not_characters(stack):
    # 16 characters, 32 bytes in UTF-8: long enough.
    assert len("é" * 16) < MIN_SECRET_BYTES == len(("é" * 16).encode())
    assert refused(stack, JWT_SECRET="é" * 15 + "e", KYC_WEBHOOK_SECRET=LONG).returncode == 2


async def test_secrets_of_32_bytes_serve(stack):
    proc = await ServerProcess(stack, JWT_SECRET=LONG, KYC_WEBHOOK_SECRET="é" * 16).start()
    try:
        async with await proc.connect() as c:
            assert (await c.call_raw("users.me"))["error"]["code"] == "unauthenticated"
    finally:
        assert await proc.stop() == 0


async def listening_line(stack, **env: str) -> str:
    """The address ``serve`` says it listens on, then it is stopped."""
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=ROOT, env=serve_env(stack, **env),
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()  # a hung shutdown fails the test, and leaves no process behind
            proc.wait()
            raise
    assert line.startswith("hangout listening on "), line
    return line.split()[3].rsplit(":", 1)[0]


async def test_with_the_development_secrets_it_listens_on_loopback_only(stack):
    assert await listening_line(stack, JWT_SECRET=DEV_JWT_SECRET, KYC_WEBHOOK_SECRET=DEV_KYC_SECRET) == "127.0.0.1"
    # One public secret is enough to be signed by anyone.
    assert await listening_line(stack, JWT_SECRET=LONG, KYC_WEBHOOK_SECRET=DEV_KYC_SECRET) == "127.0.0.1"


async def test_an_explicit_host_wins_over_the_development_default(stack):
    host = await listening_line(stack, JWT_SECRET=DEV_JWT_SECRET, KYC_WEBHOOK_SECRET=DEV_KYC_SECRET,
                                HOST="127.0.0.2")
    assert host == "127.0.0.2"


async def test_with_its_own_secrets_it_listens_on_every_interface(stack):
    assert await listening_line(stack, JWT_SECRET=LONG, KYC_WEBHOOK_SECRET=LONG) == "0.0.0.0"


def test_the_development_secrets_are_long_enough():
    assert len(DEV_JWT_SECRET.encode()) >= MIN_SECRET_BYTES
    assert len(DEV_KYC_SECRET.encode()) >= MIN_SECRET_BYTES


@pytest.mark.parametrize("name, value", [("MAX_IN_FLIGHT", "many"), ("AUTH_DEADLINE_S", "soon"),
                                         ("TRUSTED_PROXIES", "10.0.0.0/8,not-an-address")])
def test_a_setting_that_does_not_parse_exits_2_naming_it(stack, name, value):
    done = refused(stack, JWT_SECRET=LONG, KYC_WEBHOOK_SECRET=LONG, **{name: value})
    assert done.returncode == 2
    assert name in done.stderr and "Traceback" not in done.stderr
