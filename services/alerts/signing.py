"""Webhook signatures, Stripe-style, for the sender and for receivers.

    X-CRM-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is signed together with the body, so a receiver that rejects old timestamps also
rejects a captured request replayed later. A header may carry several v1 values (one per secret
while a secret is being changed); one match is enough.

A receiver needs only this module (standard library only):

    from services.alerts.signing import SignatureError, verify
    try:
        verify(secret, request.headers["X-CRM-Signature"], raw_body)
    except SignatureError as exc:
        return 400, str(exc)
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-CRM-Signature"
DEFAULT_TOLERANCE_SECONDS = 300


class SignatureError(ValueError):
    """The signature is missing, malformed, wrong, or too old (the message says which)."""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of `<timestamp>.` followed by the exact body bytes."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The X-CRM-Signature header value for this body, signed now (or at `timestamp`)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={signature(secret, t, body)}"


def verify(secret: str, header: str | None, body: bytes, tolerance_s: float = DEFAULT_TOLERANCE_SECONDS,
           now: float | None = None) -> int:
    """Check a signature header against the raw body; returns its timestamp, raises SignatureError.

    `body` must be the bytes as received, before any JSON parsing: re-encoding changes them."""
    if not header:
        raise SignatureError(f"no {HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError(f"the timestamp {value[:20]!r} is not a number") from None
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError(f"{HEADER} must read t=<unix seconds>,v1=<hex>")
    expected = signature(secret, timestamp, body)
    # compare_digest: the time taken says nothing about how much of a guess was right.
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise SignatureError("the signature does not match this body and secret")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise SignatureError(f"the timestamp is {age:+.0f} s from now, outside ±{tolerance_s:.0f} s: a replay, "
                             "or a clock that is off")
    return timestamp
