"""API keys: one per source (a store's POS terminals, an app, a back office), kept in SQLite under
the state directory. Only a SHA-256 of each secret is stored: the secrets are 32 random bytes, so a
fast hash is as safe as a slow one, and a lookup is one indexed read per request.

A secret reads `crm_<key id>_<random>`; the key id is public (logs, dead letters), the rest is not.
Rotating a key issues a new secret for the same key id and source; the old one stops working."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from schemas.events import EVENT_TYPES

# Event types each kind of source may send unless the key narrows them.
DEFAULT_TYPES: dict[str, frozenset[str]] = {
    "pos": frozenset({
        "purchase_completed", "purchase_refunded", "coupon_redeemed", "points_redemption_requested",
        "customer_registered", "profile_updated", "identity_linked", "consent_changed",
    }),
    "app": frozenset(EVENT_TYPES) - {"points_adjusted", "customer_erasure_requested", "complaint_resolved"},
    "backoffice": frozenset(EVENT_TYPES) - {"customer_erasure_requested"},
}
# Erasure requests enter the log only through the privacy endpoints (services/privacy/), which check
# the privacy_officer role and audit them; no key may send them as plain events.
PRIVACY_ONLY_TYPES = frozenset({"customer_erasure_requested"})


class SourceKind(StrEnum):
    POS = "pos"
    APP = "app"
    BACKOFFICE = "backoffice"


class Role(StrEnum):
    """What a key may do with personal data (docs/privacy.md); only back-office keys have one."""
    NONE = ""                          # sends events only
    SUPPORT = "support"                # reads one customer's personal fields, exports a customer
    PRIVACY_OFFICER = "privacy_officer"  # also requests erasure


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    source: SourceKind
    name: str
    store_id: str | None          # a POS key is bound to its store
    event_types: frozenset[str]
    rate_per_second: float
    burst: int
    created_at: float
    revoked_at: float | None
    role: Role = Role.NONE

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyProblem(ValueError):
    """A key operation that cannot be done (unknown key, invalid scope)."""


class ApiKeyStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left in free pages
        self._db.execute("""
            CREATE TABLE IF NOT EXISTS api_keys (
                key_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL UNIQUE, source TEXT NOT NULL,
                name TEXT NOT NULL, store_id TEXT, event_types TEXT NOT NULL, rate_per_second REAL NOT NULL,
                burst INTEGER NOT NULL, created_at REAL NOT NULL, revoked_at REAL)""")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
        if "role" not in columns:  # keys made before roles existed have none
            self._db.execute("ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self._db.close()

    def create(self, source: SourceKind, name: str, store_id: str | None = None,
               event_types: frozenset[str] | None = None, rate_per_second: float = 200.0,
               burst: int = 2000, role: Role | str = Role.NONE) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once: only its hash is kept)."""
        source = SourceKind(source)
        try:
            role = Role(role or "")
        except ValueError:
            raise KeyProblem(f"unknown role {role!r}; roles: {', '.join(r.value for r in Role if r.value)}") from None
        if role is not Role.NONE and source is not SourceKind.BACKOFFICE:
            raise KeyProblem(f"the {role.value} role is for back-office keys only (--source backoffice)")
        if source is SourceKind.POS and not store_id:
            raise KeyProblem("a POS key is bound to a store: give its store id")
        if source is not SourceKind.POS and store_id:
            raise KeyProblem("only POS keys are bound to a store")
        types = frozenset(event_types) if event_types else DEFAULT_TYPES[source.value]
        unknown = sorted(types - set(EVENT_TYPES))
        if unknown:
            raise KeyProblem(f"unknown event types {unknown}")
        if types & PRIVACY_ONLY_TYPES:
            raise KeyProblem(f"{sorted(types & PRIVACY_ONLY_TYPES)}: erasure requests go through `crm privacy erase` "
                             "or POST /v1/privacy/customers/{customer}/erasure (docs/privacy.md)")
        if rate_per_second <= 0 or burst < 1:
            raise KeyProblem("the rate must be positive and the burst at least 1")
        key_id = secrets.token_hex(6)
        secret = _secret(key_id)
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, secret_sha256, source, name, store_id, event_types, rate_per_second, "
                "burst, created_at, revoked_at, role) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (key_id, _digest(secret), source.value, name, store_id, json.dumps(sorted(types)), rate_per_second,
                 burst, time.time(), role.value))
        return self.get(key_id), secret

    def rotate(self, key_id: str) -> str:
        secret = _secret(key_id)
        with self._lock:
            changed = self._db.execute("UPDATE api_keys SET secret_sha256 = ? WHERE key_id = ? AND revoked_at IS NULL",
                                       (_digest(secret), key_id)).rowcount
        if not changed:
            raise KeyProblem(f"no active key {key_id!r}")
        return secret

    def revoke(self, key_id: str) -> None:
        with self._lock:
            changed = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                       (time.time(), key_id)).rowcount
        if not changed:
            raise KeyProblem(f"no active key {key_id!r}")

    def get(self, key_id: str) -> ApiKey:
        row = self._db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyProblem(f"no key {key_id!r}")
        return _key(row)

    def list(self) -> list[ApiKey]:
        return [_key(row) for row in self._db.execute("SELECT * FROM api_keys ORDER BY created_at")]

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None."""
        row = self._db.execute("SELECT * FROM api_keys WHERE secret_sha256 = ? AND revoked_at IS NULL",
                               (_digest(secret),)).fetchone()
        return None if row is None else _key(row)


def _secret(key_id: str) -> str:
    return f"crm_{key_id}_{secrets.token_urlsafe(32)}"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(row: tuple) -> ApiKey:
    key_id, _, source, name, store_id, types, rate, burst, created_at, revoked_at, role = row[:11]
    # Keys made before erasure requests became privacy-only may list the type; it no longer counts.
    allowed = frozenset(json.loads(types)) - PRIVACY_ONLY_TYPES
    return ApiKey(key_id, SourceKind(source), name, store_id, allowed, rate, burst, created_at, revoked_at,
                  Role(role or ""))
