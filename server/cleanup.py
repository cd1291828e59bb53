"""Deletes what has outlived its use: ended sessions (refresh-token families
and their tokens), unused refresh tokens past their expiry, KYC event
ids past their retention, user events older than ``EVENT_RETENTION_S``, and
pushes given up on a week ago (server/push_delivery.py).

Every server process runs one ``Cleanup`` worker every
``SESSION_CLEANUP_INTERVAL_S``. Each statement deletes a bounded batch and
skips rows locked elsewhere (server/db/auth.py), so processes share the
work, and a pass stops after ``max_batches`` of each kind; the next pass
goes on.

What is kept, and why:
- An ended family (revoked, or past its maximum age) is kept for one access
  token lifetime after it ended: until then an access token issued before
  the end may still be held by a bound socket, and a process catching up
  after a Redis outage asks the database which of its sockets' sessions
  ended (``auth_db.revoked_among``), which must still find it.
- Used tokens of a live family are kept until the family ends: a used
  token shown again must still be recognised as reused and revoke the
  family. A family gains one per refresh, and ends ``SESSION_MAX_AGE_S``
  after it began, so this is bounded.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from server import kyc, push_delivery
from server.db import auth as auth_db
from server.db import events as events_db
from server.db import kyc as kyc_db
from server.db import push as push_db
from server.periodic import Periodic, PeriodicWorker

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("hangout.cleanup")


class Cleanup(PeriodicWorker):
    """Background worker owned by ``Services`` (``start``/``stop``)."""

    def __init__(self, services: "Services", interval_s: float | None = None,
                 batch_size: int = 1000, max_batches: int = 100) -> None:
        cfg = services.config
        interval = cfg.session_cleanup_interval_s if interval_s is None else interval_s
        self._loop = Periodic("cleanup", self.run_pass, interval, log)
        self.services = services
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.grace = dt.timedelta(seconds=cfg.access_token_ttl_s)
        self.event_retention = dt.timedelta(seconds=cfg.event_retention_s)

    async def run_pass(self) -> None:
        deleted = await self.clean()
        if any(deleted.values()):
            log.info("cleanup deleted %s", ", ".join(f"{n} {what}" for what, n in deleted.items()))

    async def clean(self) -> dict[str, int]:
        """One pass; returns how many rows of each kind this process deleted."""
        # Tokens before families: a family is deleted once it has none left.
        return {
            "ended-session tokens": await self._batches(auth_db.delete_ended_tokens, self.grace),
            "ended sessions": await self._batches(auth_db.delete_ended_families, self.grace),
            "expired refresh tokens": await self._batches(auth_db.delete_expired_tokens),
            "kyc event ids": await self._batches(kyc_db.delete_old_events, kyc.EVENT_RETENTION),
            "user events": await self._batches(events_db.delete_old, self.event_retention),
            "failed pushes": await self._batches(push_db.delete_failed, push_delivery.FAILED_RETENTION),
        }

    async def _batches(self, delete: Callable[..., Awaitable[int]], *args: object) -> int:
        total = 0
        for _ in range(self.max_batches):
            n = await self.services.db.write(None, delete, *args, self.batch_size)
            total += n
            if n < self.batch_size:
                break
        return total
