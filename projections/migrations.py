"""Versioned schema migrations, applied in order on start. Each table module owns its DDL and the
version numbers it introduced; `schema_migrations` records what has been applied."""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from projections import (
    alerts_table,
    audit_table,
    dead_letters_table,
    erasures_table,
    events_table,
    points_table,
    profiles_table,
    segments_table,
    views,
)

MIGRATIONS: list[tuple[int, str]] = sorted(
    events_table.MIGRATIONS + profiles_table.MIGRATIONS + dead_letters_table.MIGRATIONS + points_table.MIGRATIONS
    + segments_table.MIGRATIONS + alerts_table.MIGRATIONS + erasures_table.MIGRATIONS + audit_table.MIGRATIONS
    + views.MIGRATIONS
)
assert len({version for version, _ in MIGRATIONS}) == len(MIGRATIONS), "migration versions must be unique"


def migrate(client: Client, database: str) -> list[int]:
    """Apply pending migrations; return the versions applied now."""
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY version"
    )
    done = {row[0] for row in client.query(f"SELECT version FROM {database}.schema_migrations").result_rows}
    applied = []
    for version, statement in MIGRATIONS:
        if version in done:
            continue
        client.command(statement.format(db=database))
        client.insert(f"{database}.schema_migrations", [[version]], column_names=["version"])
        applied.append(version)
    return applied
