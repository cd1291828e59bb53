"""Fill the load test's account pool (see loadtests/accounts.py) before a run.

    python -m loadtests.seed_accounts --host http://127.0.0.1:8080 --hosts 125 --bookers 375

Signs up the accounts that the pool lacks, through the protocol like any
client: ``auth.register``, the signed KYC webhook (``KYC_WEBHOOK_SECRET``,
the dev secret by default), then a price for hosts and a top-up for bookers.
Runs a few at a time: each sign-up costs an argon2 hash on the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid

import aiohttp

from loadtests import accounts
from loadtests.accounts import http_url_for, kyc_signature, ws_url_for
from protocol.client import Client


async def sign_up(session: aiohttp.ClientSession, host: str, kind: str) -> dict:
    email = f"lt-{uuid.uuid4().hex[:20]}@loadtest.example"
    async with await Client.connect(ws_url_for(host), session=session) as c:
        s = await c.call("auth.register", {"email": email, "password": accounts.PASSWORD,
                                           "name": f"{kind.title()} {random.randint(1, 9999)}",
                                           "gender": random.choice(("female", "male", "nonbinary"))})
        body = json.dumps({"event_id": f"lt-{uuid.uuid4().hex}", "user_id": s["user"]["id"], "status": "verified"}).encode()
        async with session.post(http_url_for(host) + "/webhooks/kyc", data=body,
                                headers={"X-Signature": kyc_signature(body), "Content-Type": "application/json"}) as r:
            if r.status != 200:
                raise RuntimeError(f"KYC webhook answered {r.status}: {(await r.text())[:200]} "
                                   "(is KYC_WEBHOOK_SECRET the deployment's?)")
        if kind == "host":
            await c.call("users.update", {"price_per_hour": f"{random.randint(10, 150)}.00"})
        else:
            await c.call("wallet.topup", {"amount": "1000.00", "idempotency_key": str(uuid.uuid4())})
    return {"email": email, "user_id": s["user"]["id"], "kind": kind, "refresh_token": s["refresh_token"]}


async def seed(host: str, hosts: int, bookers: int, concurrency: int = 4) -> tuple[int, int]:
    """Sign up what the pool lacks; returns (signed up now, in the pool)."""
    path = accounts.pool_path(host)
    have = accounts.load(path)
    want = {"host": hosts - sum(a["kind"] == "host" for a in have),
            "booker": bookers - sum(a["kind"] == "booker" for a in have)}
    todo = [k for k, n in want.items() for _ in range(max(0, n))]
    if not todo:
        return 0, len(have)
    print(f"signing up {len(todo)} load-test accounts ({want}) into {path} ...", flush=True)
    sem = asyncio.Semaphore(concurrency)
    made: list[dict] = []
    t0 = time.monotonic()

    async def one(kind: str) -> None:
        async with sem:
            made.append(await sign_up(session, host, kind))
            if len(made) % 100 == 0:
                accounts.save(path, made[-100:])
                print(f"  {len(made)} / {len(todo)}", flush=True)

    async with aiohttp.ClientSession() as session:
        try:
            await asyncio.gather(*(one(k) for k in todo))
        finally:
            accounts.save(path, made)
    print(f"  done in {time.monotonic() - t0:.0f}s", flush=True)
    return len(made), len(have) + len(made)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.seed_accounts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True, help="base URL of the deployment")
    ap.add_argument("--hosts", type=int, default=125)
    ap.add_argument("--bookers", type=int, default=375)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)
    asyncio.run(seed(args.host, args.hosts, args.bookers, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
