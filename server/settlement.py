"""Settlement: once a confirmed booking has ended, it becomes completed and
its host is paid, exactly once, whichever process gets there first.

Every server process runs one ``Settlement`` worker. Each pass settles due
bookings in batches (``FOR UPDATE SKIP LOCKED``, see
``server.db.bookings.settle_due``), so processes share the work instead of
queueing on each other, and a booking locked by one is never paid by another.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

from protocol.errors import RpcError
from protocol.models.bookings import Booking, BookingEvent
from protocol.models.wallet import WalletUpdatedEvent
from server import events
from server.db import bookings as bookings_db

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("hangout.settlement")


def _parties(result: tuple[list, dict]) -> list[uuid.UUID]:
    completed, _ = result
    return list({u for r in completed for u in (r["user_id"], r["host_id"])})


class Settlement:
    """Background worker owned by ``Services`` (``start``/``stop``)."""

    def __init__(self, services: "Services", interval_s: float | None = None, batch_size: int = 200) -> None:
        self.services = services
        self.interval_s = services.config.settlement_interval_s if interval_s is None else interval_s
        self.batch_size = batch_size
        self.settled = 0  # bookings this process completed, for tests and logs
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="settlement")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.settle_due()
            except asyncio.CancelledError:
                raise
            except RpcError as err:  # the database is away: the next pass retries
                log.warning("settlement pass skipped: %s", err)
            except Exception:  # a bad pass must not end settlement for good
                log.exception("settlement pass failed; retrying in %.1fs", self.interval_s)
            await asyncio.sleep(self.interval_s)

    async def settle_due(self) -> int:
        """Settle everything due now; returns how many bookings this process settled."""
        total = 0
        while True:
            count = await self.settle_batch()
            total += count
            if count < self.batch_size:
                return total

    async def settle_batch(self) -> int:
        completed, balances = await self.services.db.write(_parties, bookings_db.settle_due, self.batch_size)
        if not completed:
            return 0
        self.settled += len(completed)
        log.info("settled %d bookings", len(completed))
        # Published only now that the payouts are committed, in one round trip.
        batch: list = []
        for row in completed:
            booking = Booking.model_validate(dict(row))
            batch.append(([booking.user_id, booking.host_id], "booking.completed", BookingEvent(booking=booking)))
        for host, balance in balances.items():
            batch.append(([host], "wallet.updated", WalletUpdatedEvent(balance=balance)))
        await events.to_users_many(self.services, batch)
        return len(completed)
