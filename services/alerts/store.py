"""The alert service's SQLite file (`<state dir>/alerts/alerts.sqlite`): webhook subscriptions, the
alert log that feeds the live stream and the deliveries, and each delivery's state.

One process (`crm alerts`) consumes and delivers; the CLI (`crm webhooks ...`) opens the same file to
add or remove subscriptions and to redeliver dead letters while it runs. WAL lets the readers run
beside the writer, and the busy timeout makes the rare concurrent writer wait instead of failing.
Every multi-statement change is one `BEGIN IMMEDIATE` transaction, so the service never sees half
of a CLI change or the other way round.

The webhook secrets are kept as they are (not hashed): the service needs them to sign each request.

Erasure (docs/privacy.md): a `customer_erased` record deletes the customer's alerts and deliveries
(`erase`), with `secure_delete` on, so SQLite overwrites the deleted content in the file instead of
leaving it in free pages. The customer key and the erasure time are kept in `erased_customers`: an
alert change of the customer dated at or before the erasure (the `erased` closing change, a resend)
that arrives after it is not logged again; alerts of a customer who came back are.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.alerts import AlertChange
from schemas.privacy import CustomerErased
from services.alerts.filters import Filters

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    filters TEXT NOT NULL,              -- JSON: Filters.to_dict()
    created_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 1   -- 0 once removed; kept so its delivery history stays readable
);
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- AUTOINCREMENT: a seq is never reused, so stream positions stay valid
    change_id TEXT NOT NULL UNIQUE,          -- a change sent again (Kafka redelivery, worker resend) is ignored
    alert_id TEXT NOT NULL,
    customer_key TEXT NOT NULL,
    record BLOB NOT NULL,                    -- the Kafka record value, byte for byte: what receivers get and verify
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    subscription_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    customer_key TEXT NOT NULL,              -- copied from alerts: per-customer order is decided on this table alone
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    response_status INTEGER,
    updated_at REAL NOT NULL,
    PRIMARY KEY (subscription_id, seq)
);
CREATE INDEX IF NOT EXISTS deliveries_by_customer ON deliveries (subscription_id, status, customer_key, seq);
CREATE TABLE IF NOT EXISTS erased_customers (
    customer_key TEXT PRIMARY KEY,
    erased_at REAL NOT NULL                  -- event time of the (latest) erasure, epoch seconds
);
CREATE TABLE IF NOT EXISTS invalid_records (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    error TEXT NOT NULL,
    value BLOB,                              -- the first KiB, for whoever investigates
    seen_at REAL NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
);
"""


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class Subscription:
    id: str
    url: str
    filters: Filters
    created_at: float
    active: bool
    secret: str

    def public(self) -> dict[str, Any]:
        """What the API and the CLI show after creation: everything but the secret."""
        return {"id": self.id, "url": self.url, "filters": self.filters.to_dict(), "created_at": self.created_at,
                "active": self.active}


@dataclass(frozen=True)
class LoggedAlert:
    seq: int
    change_id: str
    alert_id: str
    customer_key: str
    record: bytes


@dataclass(frozen=True)
class Due:
    """A delivery that may be attempted now: the oldest undelivered alert of its customer."""
    seq: int
    customer_key: str
    attempts: int
    change_id: str
    alert_id: str
    record: bytes


@dataclass(frozen=True)
class Delivery:
    subscription_id: str
    seq: int
    change_id: str
    customer_key: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    response_status: int | None
    updated_at: float
    record: bytes


@dataclass(frozen=True)
class InvalidRecord:
    topic: str
    partition: int
    offset: int
    error: str
    value: bytes | None


@dataclass(frozen=True)
class Appended:
    alerts: int        # new entries in the log
    duplicates: int    # change_ids the log already had (or of an erased customer, from before the erasure)
    deliveries: int    # deliveries queued for subscriptions
    invalid: int
    erased: int = 0    # customers whose alerts and deliveries were deleted


class AlertStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from the service's event loop and, in tests, from other threads: the
        # lock keeps each call (and each transaction) whole.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Deleted rows (an erased customer's alerts) are overwritten in the file, not left in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        # synchronous stays FULL (the default): Kafka offsets are committed once a batch is in this
        # file, so a transaction that an OS crash could still lose would lose alerts.
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # --- subscriptions ------------------------------------------------------------------------------

    def create_subscription(self, url: str, filters: Filters, now: float | None = None) -> Subscription:
        """A new subscription; its `secret` is returned here and shown to the user once."""
        subscription = Subscription(id=f"wh_{secrets.token_hex(6)}", url=url, filters=filters,
                                    created_at=time.time() if now is None else now, active=True,
                                    secret=f"whsec_{secrets.token_urlsafe(32)}")
        with self._transaction() as db:
            db.execute("INSERT INTO subscriptions (id, url, secret, filters, created_at, active) VALUES (?, ?, ?, ?, ?, 1)",
                       (subscription.id, url, subscription.secret, json.dumps(filters.to_dict()),
                        subscription.created_at))
        return subscription

    def subscription(self, subscription_id: str) -> Subscription:
        rows = self._rows("SELECT id, url, filters, created_at, active, secret FROM subscriptions WHERE id = ?",
                          (subscription_id,))
        if not rows:
            raise NotFound(f"no webhook {subscription_id!r}")
        return _subscription(rows[0])

    def subscriptions(self, include_removed: bool = False) -> list[Subscription]:
        where = "" if include_removed else "WHERE active = 1"
        return [_subscription(row) for row in self._rows(
            f"SELECT id, url, filters, created_at, active, secret FROM subscriptions {where} ORDER BY created_at, id")]

    def remove_subscription(self, subscription_id: str) -> None:
        """Stops deliveries to it; its pending deliveries stay as they are, never sent."""
        with self._transaction() as db:
            if not db.execute("UPDATE subscriptions SET active = 0 WHERE id = ? AND active = 1",
                              (subscription_id,)).rowcount:
                raise NotFound(f"no active webhook {subscription_id!r}")

    def delivery_counts(self, subscription_id: str) -> dict[str, int]:
        counts = dict.fromkeys((PENDING, DELIVERED, DEAD), 0)
        counts.update(self._rows("SELECT status, count(*) FROM deliveries WHERE subscription_id = ? GROUP BY status",
                                 (subscription_id,)))
        return counts

    def unsettled_deliveries(self) -> dict[str, tuple[int, int]]:
        """(pending, dead) deliveries per active subscription, in one query that counts through the
        index and never reads the delivered ones, however many there are."""
        return {row[0]: (row[1], row[2]) for row in self._rows(
            "SELECT s.id, "
            "(SELECT count(*) FROM deliveries d WHERE d.subscription_id = s.id AND d.status = 'pending'), "
            "(SELECT count(*) FROM deliveries d WHERE d.subscription_id = s.id AND d.status = 'dead') "
            "FROM subscriptions s WHERE s.active = 1")}

    # --- the alert log ------------------------------------------------------------------------------

    def append(self, alerts: Sequence[tuple[AlertChange, bytes]], invalid: Sequence[InvalidRecord] = (),
               now: float | None = None, erasures: Sequence[CustomerErased] = ()) -> Appended:
        """Log new alerts and queue a delivery for every active subscription that wants each, and carry
        out `erasures` after them, in one transaction: a crash leaves either all of it or none (and then
        Kafka delivers the batch again)."""
        now = time.time() if now is None else now
        added = duplicates = queued = 0
        with self._transaction() as db:
            erased_at = self._erased_at(db, {alert.customer_key for alert, _ in alerts})
            # Read inside the transaction: a subscription created by the CLI at this moment either
            # sees this batch queued for it or starts after it, never half.
            subscriptions = [_subscription(row) for row in db.execute(
                "SELECT id, url, filters, created_at, active, secret FROM subscriptions WHERE active = 1")]
            for alert, record in alerts:
                erased = erased_at.get(alert.customer_key)
                if erased is not None and alert.occurred_at.timestamp() <= erased:
                    duplicates += 1  # of a customer erased since: not logged again
                    continue
                cursor = db.execute(
                    "INSERT INTO alerts (change_id, alert_id, customer_key, record, received_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (change_id) DO NOTHING",
                    (str(alert.change_id), str(alert.alert_id), alert.customer_key, record, now))
                if not cursor.rowcount:
                    duplicates += 1
                    continue
                added += 1
                seq = cursor.lastrowid
                wanted = [(s.id, seq, alert.customer_key, now, now) for s in subscriptions if s.filters.matches(alert)]
                db.executemany("INSERT INTO deliveries (subscription_id, seq, customer_key, status, attempts, "
                               "next_attempt_at, updated_at) VALUES (?, ?, ?, 'pending', 0, ?, ?)", wanted)
                queued += len(wanted)
            db.executemany(
                'INSERT INTO invalid_records (topic, partition, "offset", error, value, seen_at) VALUES (?, ?, ?, ?, ?, ?) '
                'ON CONFLICT DO NOTHING',
                [(r.topic, r.partition, r.offset, r.error, None if r.value is None else r.value[:1024], now)
                 for r in invalid])
            for erasure in erasures:
                self._erase(db, erasure.customer_key, erasure.erased_at.timestamp())
        return Appended(added, duplicates, queued, len(invalid), len(erasures))

    def erase(self, customer_key: str, erased_at: float) -> None:
        """Delete the customer's alerts and deliveries (an erasure, docs/privacy.md); idempotent."""
        with self._transaction() as db:
            self._erase(db, customer_key, erased_at)

    @staticmethod
    def _erase(db: sqlite3.Connection, customer_key: str, erased_at: float) -> None:
        db.execute("DELETE FROM deliveries WHERE customer_key = ?", (customer_key,))
        db.execute("DELETE FROM alerts WHERE customer_key = ?", (customer_key,))
        db.execute("INSERT INTO erased_customers (customer_key, erased_at) VALUES (?, ?) ON CONFLICT (customer_key) "
                   "DO UPDATE SET erased_at = max(erased_at, excluded.erased_at)", (customer_key, erased_at))

    @staticmethod
    def _erased_at(db: sqlite3.Connection, customer_keys: Collection[str]) -> dict[str, float]:
        keys = list(customer_keys)
        found: dict[str, float] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            found.update(db.execute(f"SELECT customer_key, erased_at FROM erased_customers WHERE customer_key IN "
                                    f"({','.join('?' * len(chunk))})", chunk).fetchall())
        return found

    def erased_customers(self) -> dict[str, float]:
        return dict(self._rows("SELECT customer_key, erased_at FROM erased_customers"))

    def last_seq(self) -> int:
        return self._rows("SELECT coalesce(max(seq), 0) FROM alerts")[0][0]

    def seq_of(self, change_id: str) -> int | None:
        rows = self._rows("SELECT seq FROM alerts WHERE change_id = ?", (change_id,))
        return rows[0][0] if rows else None

    def alerts_after(self, seq: int, limit: int = 500) -> list[LoggedAlert]:
        return [LoggedAlert(*row) for row in self._rows(
            "SELECT seq, change_id, alert_id, customer_key, record FROM alerts WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit))]

    def alert_count(self) -> int:
        return self._rows("SELECT count(*) FROM alerts")[0][0]

    def invalid_records(self, limit: int = 100) -> list[InvalidRecord]:
        return [InvalidRecord(*row) for row in self._rows(
            'SELECT topic, partition, "offset", error, value FROM invalid_records ORDER BY seen_at DESC LIMIT ?',
            (limit,))]

    def invalid_count(self) -> int:
        return self._rows("SELECT count(*) FROM invalid_records")[0][0]

    # --- deliveries ---------------------------------------------------------------------------------

    def due(self, subscription_id: str, now: float, busy_customers: Collection[str] = (),
            limit: int = 10) -> tuple[list[Due], float | None]:
        """Deliveries to attempt now, and when the next one not yet due will be.

        Only the oldest pending delivery of each customer is a candidate, so a customer's later alert
        waits until the earlier one is delivered or dead; customers whose delivery is in flight
        (`busy_customers`) are skipped altogether."""
        busy = list(busy_customers)
        not_busy = f"AND d.customer_key NOT IN ({','.join('?' * len(busy))})" if busy else ""
        heads = f"""
            FROM deliveries d JOIN alerts a ON a.seq = d.seq
            WHERE d.subscription_id = ? AND d.status = 'pending' {not_busy}
              AND d.seq = (SELECT min(seq) FROM deliveries o
                           WHERE o.subscription_id = d.subscription_id AND o.customer_key = d.customer_key
                             AND o.status = 'pending')"""
        params = [subscription_id, *busy]
        with self._lock:
            due = [Due(*row) for row in self._db.execute(
                f"SELECT d.seq, d.customer_key, d.attempts, a.change_id, a.alert_id, a.record {heads} "
                "AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.seq LIMIT ?", (*params, now, limit))]
            later = self._db.execute(f"SELECT min(d.next_attempt_at) {heads} AND d.next_attempt_at > ?",
                                     (*params, now)).fetchone()[0]
        return due, later

    def delivered(self, subscription_id: str, seq: int, attempts: int, response_status: int,
                  now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("UPDATE deliveries SET status = 'delivered', attempts = ?, response_status = ?, last_error = NULL, "
                       "updated_at = ? WHERE subscription_id = ? AND seq = ?",
                       (attempts, response_status, now, subscription_id, seq))

    def failed(self, subscription_id: str, seq: int, attempts: int, error: str, response_status: int | None,
               retry_at: float | None, now: float | None = None) -> None:
        """A failed attempt: try again at `retry_at`, or, when None, the delivery is dead."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("UPDATE deliveries SET status = ?, attempts = ?, last_error = ?, response_status = ?, "
                       "next_attempt_at = ?, updated_at = ? WHERE subscription_id = ? AND seq = ?",
                       (PENDING if retry_at is not None else DEAD, attempts, error[:500], response_status,
                        retry_at if retry_at is not None else now, now, subscription_id, seq))

    def deliveries(self, subscription_id: str, status: str | None = None, limit: int = 1000) -> list[Delivery]:
        where, params = "d.subscription_id = ?", [subscription_id]
        if status:
            where, params = where + " AND d.status = ?", params + [status]
        return [Delivery(*row) for row in self._rows(
            "SELECT d.subscription_id, d.seq, a.change_id, d.customer_key, d.status, d.attempts, d.next_attempt_at, "
            "d.last_error, d.response_status, d.updated_at, a.record FROM deliveries d JOIN alerts a ON a.seq = d.seq "
            f"WHERE {where} ORDER BY d.seq LIMIT ?", (*params, limit))]

    def dead(self, subscription_id: str, limit: int = 1000) -> list[Delivery]:
        self.subscription(subscription_id)
        return self.deliveries(subscription_id, DEAD, limit)

    def redeliver(self, subscription_id: str, seq: int | None = None, now: float | None = None) -> int:
        """Dead deliveries (all, or one) become pending again with a fresh set of attempts. They are
        older than what was delivered since, so the receiver gets them out of order: it orders by
        the record's `version` and `occurred_at`."""
        now = time.time() if now is None else now
        self.subscription(subscription_id)
        with self._transaction() as db:
            one = "" if seq is None else " AND seq = ?"
            count = db.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ? "
                f"WHERE subscription_id = ? AND status = 'dead'{one}",
                (now, now, subscription_id, *(() if seq is None else (seq,)))).rowcount
        if seq is not None and not count:
            raise NotFound(f"webhook {subscription_id} has no dead delivery of alert log seq {seq}")
        return count


def _subscription(row: tuple) -> Subscription:
    id_, url, filters, created_at, active, secret = row
    return Subscription(id_, url, Filters.from_dict(json.loads(filters)), created_at, bool(active), secret)
