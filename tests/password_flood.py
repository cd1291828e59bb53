"""A flood of ``auth.login`` and ``auth.register`` calls with random emails
from several client addresses, run in a process of its own so that a test
measuring a login is not slowed by reading the flood's replies.

    python -m tests.password_flood WS_URL ADDRESS...

Each address has one socket with 8 calls in flight. Prints ``queued ADDRESS``
once that address has its first calls out, ``limited ADDRESS`` at its first
``rate_limited`` answer, and ``sent ADDRESS N`` when it stops: when stdin
closes, or after 60 s or 20000 calls.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

from protocol.client import Client

IN_FLIGHT = 8
MAX_CALLS = 20000
MAX_SECONDS = 60.0


def say(line: str) -> None:
    print(line, flush=True)


async def flood(url: str, address: str, stop: asyncio.Event) -> None:
    sent = 0
    limited = False
    deadline = time.monotonic() + MAX_SECONDS
    async with await Client.connect(url, local_address=address) as c:
        async def one(i: int) -> None:
            nonlocal limited
            email = f"f{uuid.uuid4().hex[:16]}@example.test"
            if i % 2:
                reply = await c.call_raw("auth.login", {"email": email, "password": "random guess"})
            else:
                reply = await c.call_raw("auth.register", {"email": email, "password": "random guess",
                                                           "name": "Flood", "gender": "other"})
            if not limited and reply.get("error", {}).get("code") == "rate_limited":
                limited = True
                say(f"limited {address}")

        pending: set[asyncio.Task] = set()
        while not stop.is_set() and sent < MAX_CALLS and time.monotonic() < deadline:
            pending.add(asyncio.create_task(one(sent)))
            sent += 1
            if len(pending) >= IN_FLIGHT:
                if sent == IN_FLIGHT:
                    say(f"queued {address}")
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    say(f"sent {address} {sent}")


async def main(url: str, addresses: list[str]) -> None:
    stop = asyncio.Event()
    floods = [asyncio.create_task(flood(url, a, stop)) for a in addresses]
    stdin_closed = asyncio.create_task(asyncio.to_thread(sys.stdin.read))
    await asyncio.wait([stdin_closed, asyncio.gather(*floods)], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await asyncio.gather(*floods)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
