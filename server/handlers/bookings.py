"""bookings.*: create, cancel, get, list."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from protocol.errors import ErrorCode, RpcError
from protocol.models import bookings as m
from protocol.models.wallet import WalletUpdatedEvent
from server import events
from server import cursors
from server.db import bookings as bookings_db
from server.rpc import Call, rpc

# Outcomes of bookings_db.create that refuse the call.
_REFUSED = {
    "kyc_required": ErrorCode.KYC_REQUIRED,
    "host_not_bookable": ErrorCode.HOST_NOT_BOOKABLE,
    "not_found": ErrorCode.NOT_FOUND,
    "conflict": ErrorCode.IDEMPOTENCY_CONFLICT,
    "slot_unavailable": ErrorCode.SLOT_UNAVAILABLE,
    "booker_unknown": ErrorCode.UNAUTHENTICATED,
}


def request_hash(p: m.CreateParams) -> bytes:
    """What makes two calls with one key the same request (the user is
    compared separately)."""
    canonical = f"{p.host_id}|{p.start_at.isoformat()}|{p.end_at.isoformat()}"
    return hashlib.sha256(canonical.encode()).digest()


def _parties_written(row: dict[str, Any]) -> list[uuid.UUID] | None:
    """Whose reads must see this call's write. A replay counts as one: the
    original call may never have recorded its position (its process died
    after the commit, or it is still on its way), yet the reply says the
    booking exists, so the booker's reads must see it."""
    if row["outcome"] == "created":
        return [row["user_id"], row["host_id"]]
    if row["outcome"] in ("failed", "replayed", "failed_replayed"):
        return [row["user_id"]]
    return None


def _booking(row: Any) -> m.Booking:
    return m.Booking.model_validate(dict(row))


@rpc("bookings.create")
async def create(call: Call, p: m.CreateParams) -> m.CreateResult:
    services = call.services
    # Calls made at the same moment share one transaction (sql/009).
    row = await services.db.write_merged(
        _parties_written, bookings_db.CREATE,
        bookings_db.create_locks(call.user_id, p.host_id, p.start_at, p.end_at),
        call.user_id, p.host_id, p.start_at, p.end_at, p.idempotency_key, request_hash(p),
    )
    outcome = row["outcome"]
    if outcome in _REFUSED:
        raise RpcError(_REFUSED[outcome])
    if outcome == "start_passed":
        raise RpcError(ErrorCode.INVALID_PARAMS, data={"errors": [m.START_PASSED]})
    if outcome in ("failed", "failed_replayed"):
        raise RpcError(
            ErrorCode.INSUFFICIENT_FUNDS,
            data={"booking_id": str(row["id"]), "replayed": outcome == "failed_replayed"},
        )
    booking = _booking(row)
    if outcome == "created":
        created = m.BookingEvent(booking=booking)
        await events.to_users_numbered(services, [
            (booking.user_id, row["booker_seq"], "booking.created", created),
            (booking.host_id, row["host_seq"], "booking.created", created),
            (booking.user_id, row["booker_seq"] + 1, "wallet.updated", WalletUpdatedEvent(balance=row["balance"])),
        ])
    return m.CreateResult(booking=booking, replayed=outcome == "replayed")


@rpc("bookings.cancel")
async def cancel(call: Call, p: m.BookingIdParams) -> m.CancelResult:
    services = call.services
    outcome, row, balance, stored = await services.db.write(
        # "unchanged" (cancelled before) records too, as a replay does.
        lambda r: [r[1]["user_id"], r[1]["host_id"]] if r[0] in ("cancelled", "unchanged") else None,
        bookings_db.cancel, p.booking_id, call.user_id,
    )
    if outcome == "not_found":
        raise RpcError(ErrorCode.NOT_FOUND)
    if outcome == "invalid_state":
        raise RpcError(ErrorCode.INVALID_STATE, "only a confirmed booking can be cancelled, before it starts")
    if outcome == "balance_limit":
        raise RpcError(ErrorCode.INVALID_STATE, "the refund would take your balance over its limit")
    if outcome == "refund_blocked":
        raise RpcError(ErrorCode.INVALID_STATE, "the booking cannot be cancelled at the moment")
    booking = _booking(row)
    if outcome == "cancelled":
        await events.to_stored(services, stored)
    return m.CancelResult(booking=booking)


@rpc("bookings.get")
async def get(call: Call, p: m.BookingIdParams) -> m.Booking:
    async with call.services.db.acquire_primary() as conn:
        row = await bookings_db.get_for(conn, p.booking_id, call.user_id)
    if row is None:
        raise RpcError(ErrorCode.NOT_FOUND)
    return _booking(row)


@rpc("bookings.list")
async def list_(call: Call, p: m.ListParams) -> m.ListResult:
    after = cursors.after(call.services.config, "bookings.list", p)
    rows = await call.services.db.read(
        call.user_id, bookings_db.list_for, call.user_id, p.role, p.status, after, p.limit + 1
    )
    bookings = [_booking(r) for r in rows[: p.limit]]
    last = bookings[-1] if bookings else None
    next_cursor = (cursors.make(call.services.config, "bookings.list", p, last.start_at, last.id)
                   if last and len(rows) > p.limit else None)
    return m.ListResult(bookings=bookings, next_cursor=next_cursor)
