"""wallet.*: sandbox top-ups and the ledger."""

from __future__ import annotations

import hashlib

from protocol.errors import ErrorCode, RpcError
from protocol.models import wallet as m
from server import events
from server import cursors
from server.db import wallet as wallet_db
from server.rpc import Call, rpc


def request_hash(p: m.TopupParams) -> bytes:
    """What makes two top-ups with one key the same request (the user is
    compared separately)."""
    return hashlib.sha256(f"topup|{p.amount:.2f}".encode()).digest()


@rpc("wallet.topup")
async def topup(call: Call, p: m.TopupParams) -> m.TopupResult:
    outcome, transaction, balance, seq = await call.services.db.write(
        # A replay records too: the original call may not have (its
        # process may have died after the commit), yet this reply says
        # the top-up happened, so the caller's reads must see it.
        lambda r: call.user_id if r[0] in ("created", "replayed") else None,
        wallet_db.topup, call.user_id, p.amount, p.idempotency_key, request_hash(p),
    )
    if outcome == "balance_limit":
        raise RpcError(
            ErrorCode.INVALID_PARAMS, data={"errors": [{"field": "amount", "reason": "the balance would exceed its limit"}]}
        )
    if outcome == "conflict":
        raise RpcError(ErrorCode.IDEMPOTENCY_CONFLICT)
    if outcome == "created":
        await events.to_users_numbered(call.services, [(call.user_id, seq, "wallet.updated",
                                                        m.WalletUpdatedEvent(balance=balance))])
    return m.TopupResult(
        balance=balance, transaction=m.Transaction.model_validate(dict(transaction)), replayed=outcome == "replayed"
    )


@rpc("wallet.transactions")
async def transactions(call: Call, p: m.TransactionsParams) -> m.TransactionsResult:
    after = cursors.after(call.services.config, "wallet.transactions", p)
    rows = await call.services.db.read(call.user_id, wallet_db.transactions, call.user_id, after, p.limit + 1)
    items = [m.Transaction.model_validate(dict(r)) for r in rows[: p.limit]]
    last = items[-1] if items else None
    next_cursor = (cursors.make(call.services.config, "wallet.transactions", p, last.created_at, last.id)
                   if last and len(rows) > p.limit else None)
    return m.TransactionsResult(transactions=items, next_cursor=next_cursor)
