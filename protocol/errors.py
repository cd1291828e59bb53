"""Error codes of the protocol and the one exception that carries them."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    BAD_FRAME = "bad_frame"
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"
    UNAUTHENTICATED = "unauthenticated"
    TOKEN_EXPIRED = "token_expired"
    INVALID_CREDENTIALS = "invalid_credentials"
    EMAIL_TAKEN = "email_taken"
    FORBIDDEN = "forbidden"
    KYC_REQUIRED = "kyc_required"
    NOT_FOUND = "not_found"
    HOST_NOT_BOOKABLE = "host_not_bookable"
    SLOT_UNAVAILABLE = "slot_unavailable"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    INVALID_STATE = "invalid_state"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_REQUESTS = "too_many_requests"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


_DEFAULT_MESSAGES = {
    ErrorCode.BAD_FRAME: "frame could not be read as a request",
    ErrorCode.UNKNOWN_METHOD: "no such method",
    ErrorCode.INVALID_PARAMS: "invalid params",
    ErrorCode.UNAUTHENTICATED: "authentication required",
    ErrorCode.TOKEN_EXPIRED: "access token expired",
    ErrorCode.INVALID_CREDENTIALS: "invalid credentials",
    ErrorCode.EMAIL_TAKEN: "email already registered",
    ErrorCode.FORBIDDEN: "not allowed",
    ErrorCode.KYC_REQUIRED: "identity verification required",
    ErrorCode.NOT_FOUND: "not found",
    ErrorCode.HOST_NOT_BOOKABLE: "host is not bookable",
    ErrorCode.SLOT_UNAVAILABLE: "slot unavailable",
    ErrorCode.INSUFFICIENT_FUNDS: "insufficient funds",
    ErrorCode.INVALID_STATE: "action not allowed in the current state",
    ErrorCode.IDEMPOTENCY_CONFLICT: "idempotency key reused with other parameters",
    ErrorCode.RATE_LIMITED: "too many attempts",
    ErrorCode.TOO_MANY_REQUESTS: "too many requests in flight",
    ErrorCode.UNAVAILABLE: "service temporarily unavailable, retry",
    ErrorCode.INTERNAL: "internal error",
}


class RpcError(Exception):
    """A failed call: raised by handlers on the server, and by the client."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.code = ErrorCode(code)
        self.message = message or _DEFAULT_MESSAGES[self.code]
        self.data = data
        super().__init__(f"{self.code.value}: {self.message}{_detail(data)}")

    @property
    def fields(self) -> dict[str, str]:
        """For ``invalid_params``: each failing field and why (``{}`` otherwise)."""
        return {e["field"]: e["reason"] for e in _field_errors(self.data)}

    def to_wire(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    @classmethod
    def from_wire(cls, err: dict[str, Any]) -> "RpcError":
        return cls(err["code"], err.get("message"), err.get("data"))


def _field_errors(data: Any) -> list[dict[str, str]]:
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list):
        return []
    return [e for e in errors if isinstance(e, dict) and isinstance(e.get("field"), str) and isinstance(e.get("reason"), str)]


def _detail(data: Any) -> str:
    """What a traceback should show beyond the code: the failing fields of
    ``invalid_params`` (the message alone says only "invalid params"), and
    when to retry."""
    parts = [f"{e['field']}: {e['reason']}" for e in _field_errors(data)]
    if isinstance(data, dict) and "retry_after" in data:
        parts.append(f"retry after {data['retry_after']} s")
    return f" ({'; '.join(parts)})" if parts else ""
