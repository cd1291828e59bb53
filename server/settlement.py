"""Settlement: once a confirmed booking has ended, it becomes completed and
its host is paid, exactly once, whichever process gets there first.

Every server process runs one ``Settlement`` worker. Each pass settles due
bookings in batches (``FOR UPDATE SKIP LOCKED``, see
``server.db.bookings.settle_due``), so processes share the work instead of
queueing on each other, and a booking locked by one is never paid by another.

A booking whose payout its host's wallet cannot hold (the balance has a
limit) is passed over, stays confirmed and is logged at WARNING once by
each worker while it stays so; it settles in a later pass once the balance
allows. It never holds up the other bookings.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from server import events
from server.db import bookings as bookings_db
from server.metrics import TALLY
from server.periodic import Periodic, PeriodicWorker

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("hangout.settlement")


# Unpayable bookings named in warnings; past these, one warning covers the rest.
_UNPAYABLE_LOGGED = 20


def _parties(result: tuple[list, list, int]) -> list[uuid.UUID]:
    completed, _, _ = result
    return list({u for r in completed for u in (r["user_id"], r["host_id"])})


class Settlement(PeriodicWorker):
    """Background worker owned by ``Services`` (``start``/``stop``)."""

    def __init__(self, services: "Services", interval_s: float | None = None, batch_size: int = 200) -> None:
        interval = services.config.settlement_interval_s if interval_s is None else interval_s
        self._loop = Periodic("settlement", self.run_pass, interval, log)
        self.services = services
        self.batch_size = batch_size
        self.settled = 0  # bookings this process completed, for tests and logs
        self._reported: set[uuid.UUID] = set()  # unpayable bookings warned of (report_unpayable)
        self._reported_more = False

    async def run_pass(self) -> None:
        await self.settle_due()

    async def settle_due(self) -> int:
        """Settle everything due now; returns how many bookings this process
        settled. Then logs the due bookings left unpaid because their host's
        balance cannot take the payout."""
        total = 0
        while True:
            settled, taken = await self.settle_batch()
            total += settled
            if taken < self.batch_size:
                break
        await self.report_unpayable()
        return total

    async def report_unpayable(self) -> None:
        """Warns of each due booking that cannot be paid out, once while it
        stays so (again if it is paid and another one gets stuck later)."""
        rows = await self.services.db.read_primary(bookings_db.unpayable_due, _UNPAYABLE_LOGGED + 1)
        for r in rows[:_UNPAYABLE_LOGGED]:
            if r["id"] in self._reported:
                continue
            log.warning(
                "booking %s is due but not settled: its payout of %s would take host %s's balance of %s over its limit",
                r["id"], r["amount"], r["host_id"], r["balance"],
            )
        more = len(rows) > _UNPAYABLE_LOGGED
        if more and not self._reported_more:
            log.warning("more due bookings than these %d are not settled for the same reason", _UNPAYABLE_LOGGED)
        self._reported = {r["id"] for r in rows[:_UNPAYABLE_LOGGED]}
        self._reported_more = more

    async def settle_batch(self) -> tuple[int, int]:
        """One batch: (bookings settled, due bookings locked)."""
        completed, stored, taken = await self.services.db.write(_parties, bookings_db.settle_due, self.batch_size)
        if not completed:
            return 0, taken
        self.settled += len(completed)
        TALLY.settled += len(completed)
        log.info("settled %d bookings", len(completed))
        # Published only now that the payouts are committed, in one round trip.
        await events.to_stored(self.services, stored)
        return len(completed), taken
