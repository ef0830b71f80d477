"""The offline spool of a POS terminal: events go into a local SQLite file first and reach the
ingestion API (services/ingest/api.py, docs/ingestion.md) whenever the network allows.

    spool = Spool("/var/lib/pos/spool.db", "https://crm.example", api_key)
    spool.enqueue(event)                      # durable when it returns; gives the event_id
    threading.Thread(target=spool.run, args=(stop,), daemon=True).start()
    spool.status()                            # waiting, oldest age, rejected, last error, next attempt

What it promises, and what that rests on:

- Durable: `enqueue` commits to SQLite (WAL, synchronous=FULL) before it returns, so an enqueued event
  survives a crash or a power cut. An event without `event_id` gets a uuid4 there, so every later
  send of it carries the same id.
- No duplicates after a crash: an event leaves the spool only in the transaction that records the
  API's answer for it. A crash (or a lost answer) after sending but before that commit sends it
  again, and the API, recognising its event_id, answers `duplicate`: it is on `crm.events` once.
  (The API remembers ids for 7 days; the worker's own de-duplication covers older re-sends.)
- Order per customer: events are sent in arrival order, in batches from the head of the spool, each
  batch only after the one before was answered. A 200 answers every event of its batch (accepted,
  duplicate or rejected), so nothing is left behind: when a batch fails (429, 503, other 5xx, no
  connection, timeout) sending stops, and nothing after it goes before it has gone. A 200 that does
  not answer every event counts as a failure and the whole batch is sent again (the answered ones
  come back `duplicate`), never half of it.
- Rejected events (invalid; a person has to fix them) move to the `rejected` table with the reason
  and the field errors: they do not hold up the rest and are never dropped. The API also wrote them
  to its dead-letter topic (`crm dlq`).
- Backoff: after a failure the next attempt waits 1 s doubling up to 5 min, with jitter, and at least
  what Retry-After asks (up to the same cap). 413 halves the batch (an event too large even alone is
  rejected here, as `body_too_large`); so does 429, since a key whose burst is smaller than a batch
  would never let it through. 401 (wrong or revoked key) keeps everything and tries again only at the
  longest interval: `status()` shows why.

One sender per spool file: the terminal's `run` thread, or `crm spool send` while the terminal
software is stopped. Two at once stay correct (the API answers `duplicate`) but waste requests.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("crm.pos_spool")

MAX_BATCH_EVENTS = 500               # the API's limits (services/ingest/api.py)
MAX_BODY_BYTES = 5 * 1024 * 1024
SLOW = {400, 401, 403, 404}          # waiting a little will not fix these: retry at the longest interval

SCHEMA = """
-- AUTOINCREMENT: a seq is never reused, even after the spool was empty, so it orders arrivals and
-- names a rejected event for good.
CREATE TABLE IF NOT EXISTS waiting (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL,
                                    body TEXT NOT NULL, enqueued_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, body TEXT NOT NULL,
                                     reason TEXT, errors TEXT NOT NULL, enqueued_at REAL NOT NULL,
                                     rejected_at REAL NOT NULL, request_id TEXT);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT);
"""


@dataclass
class Status:
    waiting: int
    oldest_age_seconds: float | None      # None: nothing waits
    rejected: int
    last_error: str | None
    last_error_at: float | None           # epoch seconds
    next_attempt_at: float | None         # epoch seconds; None: no failure pending, send at once


@dataclass
class SendResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    error: str | None = None              # why sending stopped with events still waiting
    retry_at: float | None = None         # epoch seconds of the next attempt after that error


@dataclass
class _Row:
    seq: int
    event_id: str
    body: str
    enqueued_at: float


class Spool:
    def __init__(self, path: str | Path, api_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, min_delay: float = 1.0, max_delay: float = 300.0,
                 clock: Callable[[], float] = time.time, random: Callable[[], float] = random.random):
        self.path = Path(path)
        self.api_url = api_url.rstrip("/") if api_url else None
        self.api_key = api_key
        self.min_delay, self.max_delay = min_delay, max_delay
        self._clock, self._random = clock, random
        self._http = httpx.Client(timeout=timeout)  # above the 30 s the API waits for Kafka before a 503
        self._lock = threading.Lock()        # the connection is shared by the sender and enqueuers
        self._sending = threading.Lock()     # one send_pending at a time in this process
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Delivered events are deleted with zeros written over them, so that their plain personal
        # values do not linger in the file's free pages (docs/pos-spool.md).
        self._db.execute("PRAGMA secure_delete=ON")
        # ... and the write-ahead log, which holds copies of recent pages, is cut back to nothing
        # whenever a checkpoint empties it, instead of keeping them until they are overwritten.
        self._db.execute("PRAGMA journal_size_limit=0")
        self._db.executescript(SCHEMA)
        # Names this spool in request ids, so that a re-sent batch has the id it had (the API then
        # replaces its dead letters instead of adding copies) and two terminals never share one.
        self._db.execute("INSERT OR IGNORE INTO state VALUES ('spool_id', ?)", (uuid.uuid4().hex[:12],))
        self._id = self._db.execute("SELECT value FROM state WHERE name = 'spool_id'").fetchone()[0]
        self._failures = 0
        self._next_attempt = 0.0
        self._state_current = False  # the state table may still hold a failure of an earlier process
        self._batch = MAX_BATCH_EVENTS

    def close(self) -> None:
        self._http.close()
        self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- the terminal's side ---------------------------------------------------------------------

    def enqueue(self, event: dict[str, Any]) -> str:
        """Store the event after those before it; its event_id (a new uuid4 if it had none). The
        event is on disk when this returns. Something JSON cannot say (NaN, a lone surrogate, an
        unknown type) raises here, not later where it would block the spool."""
        if not isinstance(event, dict):
            raise TypeError(f"an event is a dict, not {type(event).__name__}")
        event = dict(event)
        if not event.get("event_id"):
            event["event_id"] = str(uuid.uuid4())
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain)
        body.encode()  # UnicodeEncodeError for lone surrogates
        event_id = str(event["event_id"])
        with self._lock:
            self._db.execute("INSERT INTO waiting (event_id, body, enqueued_at) VALUES (?, ?, ?)",
                             (event_id, body, self._clock()))
        return event_id

    def run(self, stop: threading.Event, poll: float = 1.0) -> None:
        """Send whatever waits, when it is time, until `stop` is set: the terminal's background thread."""
        while not stop.is_set():
            if self._clock() >= self._next_attempt:
                try:
                    self.send_pending()
                except Exception as exc:  # a background thread must not die: note it, back off
                    log.exception("sending the spool failed")
                    self._failed(SendResult(), f"unexpected: {exc!r}")
            stop.wait(poll)

    def status(self) -> Status:
        with self._lock:
            waiting, oldest = self._db.execute("SELECT count(*), min(enqueued_at) FROM waiting").fetchone()
            rejected = self._db.execute("SELECT count(*) FROM rejected").fetchone()[0]
            state = dict(self._db.execute("SELECT name, value FROM state").fetchall())
        number = lambda name: float(state[name]) if state.get(name) else None  # noqa: E731
        return Status(waiting, None if oldest is None else max(0.0, self._clock() - oldest), rejected,
                      state.get("last_error"), number("last_error_at"), number("next_attempt_at"))

    def rejected(self, limit: int = 100) -> list[dict[str, Any]]:
        """Rejected events, oldest first, with the API's reason and field errors."""
        with self._lock:
            rows = self._db.execute("SELECT seq, event_id, reason, errors, rejected_at, request_id, body FROM rejected "
                                    "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [{"seq": seq, "event_id": event_id, "reason": reason, "errors": json.loads(errors),
                 "rejected_at": rejected_at, "request_id": request_id, "event": json.loads(body)}
                for seq, event_id, reason, errors, rejected_at, request_id, body in rows]

    # --- sending ---------------------------------------------------------------------------------

    def send_pending(self, max_batch: int = MAX_BATCH_EVENTS) -> SendResult:
        """Send what waits, oldest first, now (whatever the backoff says), until the spool is empty
        or a batch fails; then the result says why and when `run` tries again."""
        if not (self.api_url and self.api_key):
            raise ValueError("sending needs the API's URL and a key")
        result = SendResult()
        with self._sending:
            while rows := self._head(min(max_batch, self._batch)):
                request_id = f"spool-{self._id}-{rows[0].seq}-{rows[-1].seq}"
                try:
                    response = self._http.post(f"{self.api_url}/v1/events/batch", content=_batch(rows), headers={
                        "Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json",
                        "X-Request-ID": request_id})
                except httpx.HTTPError as exc:  # refused, timed out, connection lost before the answer
                    return self._failed(result, f"{type(exc).__name__}: {exc}")
                code = response.status_code
                if code == 413 and len(rows) > 1:
                    self._batch = len(rows) // 2
                    continue
                if code == 413:
                    self._settle(rows, [{"status": "rejected", "reason": "body_too_large", "errors": [
                        {"field": "(event)", "message": f"too large for a request alone: {response.text[:200]}"}]}],
                        request_id)
                    result.rejected += 1
                    continue
                if code == 429 and len(rows) > 1:
                    self._batch = len(rows) // 2
                if code != 200:
                    return self._failed(result, f"HTTP {code}: {response.text[:300]}",
                                        _retry_after(response, self._clock()), slow=code in SLOW)
                answers = _answers(response, len(rows))
                if answers is None:
                    return self._failed(result, f"HTTP 200 without an answer for every event: {response.text[:300]}")
                self._settle(rows, answers, request_id)
                statuses = [answer["status"] for answer in answers]
                result.accepted += statuses.count("accepted")
                result.duplicates += statuses.count("duplicate")
                result.rejected += statuses.count("rejected")
                self._recovered()
            self._batch = MAX_BATCH_EVENTS  # drained: the next backlog starts with full batches again
        return result

    def _head(self, limit: int) -> list[_Row]:
        with self._lock:
            rows = [_Row(*row) for row in self._db.execute(
                "SELECT seq, event_id, body, enqueued_at FROM waiting ORDER BY seq LIMIT ?", (limit,))]
        size, taken = 20, 0  # keep the body under the API's limit; one event always goes
        for row in rows:
            size += len(row.body.encode()) + 1
            if taken and size > MAX_BODY_BYTES:
                break
            taken += 1
        return rows[:taken]

    def _settle(self, rows: list[_Row], answers: list[dict[str, Any]], request_id: str) -> None:
        """Record the API's answers in one transaction: answered events leave `waiting`, rejected
        ones go to `rejected`. Until this commits they are sent again on the next attempt."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO rejected VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(row.seq, row.event_id, row.body, answer.get("reason"), json.dumps(answer.get("errors") or []),
                      row.enqueued_at, now, request_id)
                     for row, answer in zip(rows, answers) if answer["status"] == "rejected"])
                self._db.executemany("DELETE FROM waiting WHERE seq = ?", [(row.seq,) for row in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _failed(self, result: SendResult, error: str, retry_after: float | None = None,
                slow: bool = False) -> SendResult:
        self._failures += 1
        delay = self.max_delay if slow else min(self.max_delay, self.min_delay * 2 ** min(self._failures - 1, 30))
        # Jitter, so that the terminals of a store that went offline together do not return together.
        delay = delay / 2 + self._random() * delay / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        now = self._clock()
        self._next_attempt = now + delay
        log.warning("spool: %s; next attempt in %.1f s", error, delay)
        self._state_current = False
        self._put_state(last_error=error, last_error_at=now, next_attempt_at=self._next_attempt)
        result.error, result.retry_at = error, self._next_attempt
        return result

    def _recovered(self) -> None:
        self._failures, self._next_attempt = 0, 0.0
        if not self._state_current:
            self._put_state(next_attempt_at=None)
            self._state_current = True

    def _put_state(self, **values: Any) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                                 [(name, None if value is None else str(value)) for name, value in values.items()])


def _batch(rows: list[_Row]) -> bytes:
    """The request body, from the events exactly as stored."""
    return ('{"events":[' + ",".join(row.body for row in rows) + "]}").encode()


def _answers(response: httpx.Response, count: int) -> list[dict[str, Any]] | None:
    """The answer for each event of the batch, in order, or None unless there is one for every event."""
    try:
        by_index = {item["index"]: item for item in response.json()["results"]}
    except (ValueError, KeyError, TypeError):
        return None
    answers = [by_index.get(index) for index in range(count)]
    if any(a is None or a.get("status") not in ("accepted", "duplicate", "rejected") for a in answers):
        return None
    return answers  # type: ignore[return-value]


def _retry_after(response: httpx.Response, now: float) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """JSON for what terminal software tends to put in events."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON: {value!r}")
