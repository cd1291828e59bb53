"""Delivering the push hook's outbox (server/push.py): every process runs a
``PushDelivery`` while ``PUSH_WEBHOOK_URL`` is set.

Delivery is at least once. A POST that fails or answers other than 2xx is
retried with the same ``id`` after ``PUSH_RETRY_BASE_S``, doubling each
time up to 5 minutes, each delay drawn between half and all of that (so
that pushes which failed together, the receiver being down, do not all come
back at once). After an hour of failures the row is marked failed, logged,
and kept a week for operators (``last_error`` says why), then deleted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import time
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg

from protocol.models import EVENTS
from server import signing
from server.config import PUSH_RETRY_MAX_S
from server.db import push as push_db
from server.periodic import Periodic, PeriodicWorker

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("hangout.push")

POST_TIMEOUT_S = 10.0
# A claimed row is left alone this long: past any POST and its outcome's write.
LEASE = dt.timedelta(seconds=POST_TIMEOUT_S + 20)
GIVE_UP_AFTER = dt.timedelta(hours=1)
FAILED_RETENTION = dt.timedelta(days=7)
POLL_S = 1.0
BATCH = 50  # POSTs at once
MAX_BATCHES = 20  # per pass; the next pass goes on


def retry_delay(base_s: float, attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones."""
    full = min(PUSH_RETRY_MAX_S, base_s * 2 ** min(attempts - 1, 30))
    return random.uniform(full / 2, full)


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _json_value(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return rfc3339(value)
    if isinstance(value, (uuid.UUID, Decimal)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def body(row: asyncpg.Record | dict[str, Any]) -> bytes:
    """The JSON a row is POSTed as. Its data is read through the event's
    model, dumped as for the socket (ids and money as strings), and its
    times written as RFC 3339."""
    data = row["data"]
    if isinstance(data, str):
        data = json.loads(data, parse_float=Decimal)
    payload = {
        "id": row["id"],
        "user_id": row["user_id"],
        "event": row["event"],
        "data": EVENTS[row["event"]].model_validate(data).model_dump(),
        "created_at": row["created_at"],
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=_json_value).encode()


class PushDelivery(PeriodicWorker):
    """Background worker owned by ``Services`` (``start``/``stop``): POSTs
    due pushes, in every process while the hook is on."""

    def __init__(self, services: "Services") -> None:
        cfg = services.config
        assert cfg.push_webhook_url is not None
        self.services = services
        self.url = cfg.push_webhook_url
        self.secret = cfg.push_webhook_secret
        self.retry_base_s = cfg.push_retry_base_s
        # Retries come due at their own times; polling no slower than the
        # first delay keeps a short base (as tests use) meaningful.
        self._loop = Periodic("push", self.run_pass, min(POLL_S, self.retry_base_s), log)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_S))
        self.services.push.on_queued = self._loop.wake
        await super().start()

    async def stop(self) -> None:
        self.services.push.on_queued = lambda: None
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_pass(self) -> None:
        for _ in range(MAX_BATCHES):
            rows = await self.services.db.write(None, push_db.claim_due, BATCH, LEASE)
            if not rows:
                return
            try:
                settled, delivered = await self._deliver(rows)
            except asyncio.CancelledError:
                # Stopping: the rows are due again at once, not when their
                # lease ends (their POSTs may have arrived: at least once).
                try:
                    await self.services.db.write(None, push_db.release, [r["id"] for r in rows])
                except Exception as err:  # the stop goes on; the leases end on their own
                    log.warning("claimed pushes not released at stop: %s", err)
                raise
            if delivered:
                log.info("delivered %d pushes", len(delivered))
            self._report(settled)
            if len(rows) < BATCH:
                return

    async def _deliver(self, rows: list[asyncpg.Record]) -> tuple[list[asyncpg.Record], list[uuid.UUID]]:
        """POST claimed rows and record the outcomes: (failed rows as
        ``push_db.settle`` returns them, ids delivered)."""
        outcomes = await asyncio.gather(*(self._post(r) for r in rows))
        delivered = [r["id"] for r, why in zip(rows, outcomes) if why is None]
        failed = [(r["id"], retry_delay(self.retry_base_s, r["attempts"]), why)
                  for r, why in zip(rows, outcomes) if why is not None]
        return await self.services.db.write(None, push_db.settle, delivered, failed, GIVE_UP_AFTER), delivered

    async def _post(self, row: asyncpg.Record) -> str | None:
        """POST one push; None when the receiver took it, else why not."""
        assert self._session is not None
        try:
            payload = body(row)
        except (ValueError, KeyError) as err:  # a stored event its model refuses: a bug, kept for operators
            log.error("push %s of %s cannot be written: %s", row["id"], row["event"], err)
            return f"unwritable: {err}"[:500]
        headers = {"Content-Type": "application/json",
                   "X-Signature": signing.header(self.secret, payload, int(time.time()))}
        try:
            async with self._session.post(self.url, data=payload, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            return f"{type(err).__name__}: {err}"[:500]

    def _report(self, failed: list[asyncpg.Record]) -> None:
        for r in failed:
            if r["gave_up"]:
                log.error("push %s (%s to user %s) given up after %d attempts over %s; last error: %s",
                          r["id"], r["event"], r["user_id"], r["attempts"], GIVE_UP_AFTER, r["last_error"])
        retried = [r for r in failed if not r["gave_up"]]
        if retried:
            log.warning("%d pushes failed and will be retried; first: %s", len(retried), retried[0]["last_error"])
