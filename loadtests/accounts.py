"""Accounts the load test signs in with, kept between runs.

Real users open the app with a stored session far more often than they sign
up or type a password, and argon2 makes both of those deliberately costly.
So most locust users take an existing account from this pool and start with
``auth.refresh`` (as the app does with its stored refresh token); a share of
them sign up instead. The pool lives in a JSON file per deployment
(``loadtests/reports/accounts-<host>.json``) and is filled before a run by
``python -m loadtests.seed_accounts``.

Refresh tokens rotate: each account's latest token is written back when a
locust process quits. A run that was killed leaves spent tokens behind; the
next run then sees ``invalid_credentials`` for them and logs in instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from server.config import DEV_KYC_SECRET

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "loadtests" / "reports"
PASSWORD = "loadtest password 1"
KYC_SECRET = os.environ.get("KYC_WEBHOOK_SECRET", DEV_KYC_SECRET)


def ws_url_for(host: str) -> str:
    """``http[s]://host[:port][/prefix]`` -> the deployment's WebSocket URL."""
    parts = urlsplit(host if "://" in host else f"http://{host}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    return urlunsplit((scheme, parts.netloc, (path if path.endswith("/ws") else path + "/ws"), "", ""))


def http_url_for(host: str) -> str:
    parts = urlsplit(host if "://" in host else f"http://{host}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[:-3]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def kyc_signature(body: bytes, secret: str = KYC_SECRET) -> str:
    """``X-Signature`` of the KYC webhook: the time and the body, signed."""
    t = str(int(time.time()))
    return f"t={t},sha256=" + hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()


def pool_path(host: str) -> Path:
    """The pool of the deployment at ``host`` (env LOADTEST_ACCOUNTS overrides)."""
    if os.environ.get("LOADTEST_ACCOUNTS"):
        return Path(os.environ["LOADTEST_ACCOUNTS"])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", host.split("://", 1)[-1]).strip("-")
    return REPORTS / f"accounts-{slug}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load(path: Path) -> list[dict]:
    with _locked(path):
        return _read(path)


def _read(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["accounts"]
    except (OSError, ValueError, KeyError):
        return []


def save(path: Path, changed: list[dict]) -> None:
    """Merge ``changed`` accounts (by email) into the file."""
    if not changed:
        return
    with _locked(path):
        accounts = {a["email"]: a for a in _read(path)}
        for a in changed:
            accounts[a["email"]] = a
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"accounts": list(accounts.values())}, indent=0))
        tmp.replace(path)


def forget(path: Path, emails: set[str]) -> None:
    """Drop accounts that no longer exist on the deployment."""
    if not emails:
        return
    with _locked(path):
        kept = [a for a in _read(path) if a["email"] not in emails]
        path.write_text(json.dumps({"accounts": kept}, indent=0))
