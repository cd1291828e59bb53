"""wallet.* methods and the wallet.updated event.

Top-ups go through the sandbox provider, which credits at once. A top-up is
idempotent by its key: the same key from the same user for the same amount
answers with the original transaction, the current balance and
``replayed: true``; another amount, or another user, is
``idempotency_conflict``. Top-up keys and booking keys are separate spaces.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator

from protocol import cursors
from protocol.methods import MethodSpec
from protocol.models.common import Id, Money, PageParams, Params, Result, Time

TOPUP_MAX = Decimal("10000.00")
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=255)]
TransactionType = Literal["topup", "booking_payment", "booking_refund", "booking_payout"]


class Transaction(Result):
    """One ledger line. ``amount`` is signed: negative is a debit."""

    id: Id
    amount: Money
    type: TransactionType
    # The booking's id for the booking types, the top-up's own id for topup.
    reference_id: Id
    created_at: Time


class TopupParams(Params):
    amount: Money
    idempotency_key: IdempotencyKey

    @field_validator("amount")
    @classmethod
    def _amount_range(cls, v: Decimal) -> Decimal:
        if not Decimal(0) < v <= TOPUP_MAX:
            raise ValueError("must be more than 0.00 and at most 10000.00")
        return v


class TopupResult(Result):
    balance: Money
    transaction: Transaction
    replayed: bool


class TransactionsParams(PageParams):
    """The caller's ledger, a page at a time."""

    cursor_key = (cursors.TIME, cursors.ID)  # created_at then id, as the list is ordered


class TransactionsResult(Result):
    """Newest first."""

    transactions: list[Transaction]
    next_cursor: Optional[str]


class WalletUpdatedEvent(Result):
    balance: Money


METHODS = (
    MethodSpec("wallet.topup", TopupParams, TopupResult),
    MethodSpec("wallet.transactions", TransactionsParams, TransactionsResult),
)
EVENTS = {"wallet.updated": WalletUpdatedEvent}
