"""Operator commands that need the database and Redis."""

from __future__ import annotations

import sys

from protocol.models.auth import normalize_email
from server.config import Config
from server.db import users as users_db
from server.services import Services


async def set_kyc_by_email(config: Config, email: str, status: str) -> int:
    from server.kyc import set_status

    services = Services.build(config.with_(replica_urls=()))
    await services.db.start()
    try:
        async with services.db.acquire_primary() as conn:
            row = await users_db.get_by_email(conn, normalize_email(email))
        if row is None:
            print(f"no user with email {email!r}", file=sys.stderr)
            return 1
        user, changed = await set_status(services, row["id"], status)
        print(f"{email}: kyc_status={status}" + ("" if changed else " (unchanged)"))
        return 0
    finally:
        await services.db.close()
        await services.redis.aclose()
