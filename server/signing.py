"""The webhook signature, one scheme both ways: ``X-Signature: t=<unix
seconds>,sha256=<hex>``, the hex an HMAC-SHA256 with the shared secret of
``b"<t>."`` followed by the raw body. Signing the time with the body lets a
receiver refuse an old request replayed. The KYC webhook checks it
(server/kyc.py); the push hook signs its POSTs with it (server/push.py)."""

from __future__ import annotations

import hashlib
import hmac


def digest(secret: str, t: str, body: bytes) -> str:
    """The hex HMAC of ``body`` sent at ``t`` (unix seconds, as written)."""
    return hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()


def header(secret: str, body: bytes, t: int) -> str:
    """The ``X-Signature`` value for ``body`` sent at ``t``."""
    return f"t={t},sha256={digest(secret, str(t), body)}"
