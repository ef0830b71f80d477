"""Which event ids the API has already written to Kafka, with a fingerprint of their content, so
that a retried request gets `duplicate` instead of a second copy on the topic. SQLite under the state
directory; entries older than RETENTION are forgotten (the worker's own de-duplication covers
anything older, and a crash between Kafka's acknowledgement and the insert here)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

RETENTION_SECONDS = 7 * 24 * 3600


class SeenEvents:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Forgotten entries are overwritten with zeros, not left in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen_events (event_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
                         "written_at REAL NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS seen_events_written ON seen_events (written_at)")

    def close(self) -> None:
        self._db.close()

    def fingerprints(self, event_ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start:start + 500]
            rows = self._db.execute(f"SELECT event_id, fingerprint FROM seen_events WHERE event_id IN "
                                    f"({','.join('?' * len(chunk))})", chunk)
            found.update(rows.fetchall())
        return found

    def remember(self, entries: list[tuple[str, str]]) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO seen_events VALUES (?, ?, ?)",
                                 [(event_id, fingerprint, now) for event_id, fingerprint in entries])
            self._db.execute("COMMIT")

    def forget_old(self) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM seen_events WHERE written_at < ?",
                                    (time.time() - RETENTION_SECONDS,)).rowcount
