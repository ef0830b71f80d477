"""One way to reach ClickHouse: embedded chdb by default, a real server when CRM_CLICKHOUSE_DSN is set.
The same clickhouse-connect client API either way, so no code above this module knows which."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from projections.sql_profile import engine_options
from streams.config import Settings

_owner_lock: Any = None
# Every insert of the projections: a batch may span any number of months (an import of years of
# history, events dated decades apart), each its own partition of the monthly-partitioned tables;
# ClickHouse's default refuses an insert touching more than 100, which would stop the writer for good.
INSERT_SETTINGS: dict[str, Any] = {"max_partitions_per_insert_block": 0}  # held open for the life of the process that owns the embedded database


class EmbeddedDatabaseBusy(RuntimeError):
    pass


def connect(settings: Settings) -> Client:
    """A client whose default database is the platform's, created if missing."""
    if settings.clickhouse_dsn:
        options: dict[str, Any] = {"dsn": settings.clickhouse_dsn}
    else:
        _claim_embedded(settings.chdb_dir)
        # The embedded engine shares a small machine with Kafka and the worker: size its background
        # pools (merges, scheduling) for that rather than for a dedicated server.
        # The engine's configuration defines the profile of analysts' SQL (projections/sql_profile.py).
        options = {"interface": "chdb", "path": str(settings.chdb_dir),
                   "chdb_options": {"background_pool_size": 2, "background_schedule_pool_size": 4,
                                    **engine_options(settings)}}
    bootstrap = clickhouse_connect.get_client(**options, database="default")
    bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {settings.clickhouse_database}")
    bootstrap.close()
    return clickhouse_connect.get_client(**options, database=settings.clickhouse_database)


def _claim_embedded(path: Path) -> None:
    """chdb lets one process open a data directory. Take an exclusive lock so that a second process
    gets a clear message instead of a corrupted or locked engine."""
    global _owner_lock
    if _owner_lock is not None:
        return
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / ".owner.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise EmbeddedDatabaseBusy(
            f"The embedded ClickHouse at {path} is open in process {owner} (the projection writer owns it "
            "while it runs). Stop it first (`crm stop`), or point CRM_CLICKHOUSE_DSN at a ClickHouse server."
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    _owner_lock = lock
