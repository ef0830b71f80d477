"""Production DDL for a ClickHouse cluster, generated from the single-node migrations.

The single-node DDL (each table module's MIGRATIONS, plus the `schema_migrations` table that
`migrations.migrate` creates) stays the one source of truth; this module rewrites it statement by
statement, so the cluster variant cannot drift from it:

- `CREATE TABLE db.t (...) ENGINE = XMergeTree(args) ...` becomes two tables:
  - `db.t_local ON CLUSTER '{cluster}'` with `ReplicatedXMergeTree('/clickhouse/tables/{shard}/{database}/{table}',
    '{replica}', args)`: the data, replicated within each shard;
  - `db.t ON CLUSTER '{cluster}' AS db.t_local ENGINE = Distributed('{cluster}', 'db', 't_local', key)`:
    the table everyone reads and the writer inserts into. It keeps the single-node name, so every
    query in the docs and every view works unchanged.
  The sharding key is `cityHash64(customer_key)` where the table has a customer key, else a hash of
  the sorting key. Either way every row of one sorting key lands on one shard, which is what makes
  `FINAL` (and `argMax ... GROUP BY customer_key`) exact through the Distributed table: a replacing
  merge only ever sees one shard.
- `schema_migrations` is replicated on every node of the cluster (one replica set, no `{shard}` in
  its path) and has no Distributed table: it is bookkeeping that every node must see whole.
- `ALTER TABLE db.t ...` runs `ON CLUSTER` on `db.t_local`, and also on the Distributed `db.t` when
  every command is a column command (a Distributed table needs the same columns to read them).
- `CREATE VIEW db.v AS ...` gets `ON CLUSTER`; it reads the Distributed tables by their names.
- Anything else (a materialized view, a DROP, an INSERT) raises `UnsupportedStatement`: decide how
  it should look on a cluster and teach this module, rather than ship something half-right.

The script ends by recording every version in `schema_migrations`, so that the projection writer
(`migrate()` on start, single-node DDL) finds nothing left to do when it connects to a cluster node.
`{cluster}`, `{shard}`, `{replica}`, `{database}` and `{table}` are ClickHouse macros (server config
`<macros>`); `crm schemas cluster --cluster NAME` puts a literal cluster name instead of `{cluster}`.
The writer commits Kafka offsets after each insert: give its user `distributed_foreground_insert = 1`
so that an insert into a Distributed table returns once the shards have the rows (docs/dictionary.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

REPLICA_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
EVERY_NODE_PATH = "/clickhouse/tables/all/{database}/{table}"  # one replica set across the cluster
LOCAL_SUFFIX = "_local"
UNSHARDED = {"schema_migrations"}
_COLUMN_COMMANDS = ("ADD COLUMN", "DROP COLUMN", "MODIFY COLUMN", "COMMENT COLUMN", "RENAME COLUMN")
_NAME = re.compile(r"^[A-Za-z0-9_.{}-]+$")


class UnsupportedStatement(ValueError):
    pass


@dataclass(frozen=True)
class Statement:
    version: int  # 0: the schema_migrations table that migrate() creates before any version
    table: str  # the single-node table or view the statement comes from
    role: str  # replicated, distributed, alter-replicated, alter-distributed, view, record-versions
    sql: str


def single_node_statements(database: str) -> list[tuple[int, str]]:
    """Exactly what `migrations.migrate` runs on an empty single node, in order, as (version, DDL):
    recorded from the function itself rather than copied."""
    from projections.migrations import MIGRATIONS, migrate

    recorded: list[str] = []

    class Recorder:
        def command(self, sql: str, *args: Any, **kwargs: Any) -> None:
            recorded.append(sql)

        def query(self, *args: Any, **kwargs: Any) -> Any:
            return SimpleNamespace(result_rows=[])

        def insert(self, *args: Any, **kwargs: Any) -> None:
            pass

    migrate(Recorder(), database)  # type: ignore[arg-type]
    if len(recorded) != len(MIGRATIONS) + 1:
        raise UnsupportedStatement("migrate() no longer runs one statement per migration after its own table")
    return [(0, recorded[0])] + [(version, sql) for (version, _), sql in zip(MIGRATIONS, recorded[1:])]


def cluster_statements(database: str = "crm", cluster: str = "{cluster}") -> list[Statement]:
    if not _NAME.match(cluster) or not _NAME.match(database):
        raise ValueError(f"not a plain cluster or database name: {cluster!r}, {database!r}")
    out: list[Statement] = []
    distributed: set[str] = set()
    versions = []
    for version, sql in single_node_statements(database):
        out += _rewrite(version, sql.strip(), database, cluster, distributed)
        if version:
            versions.append(version)
    values = ", ".join(f"({version})" for version in versions)
    out.append(Statement(0, "schema_migrations", "record-versions",
                         f"INSERT INTO {database}.schema_migrations (version) VALUES {values}"))
    return out


def render(statements: list[Statement]) -> str:
    lines = ["-- ClickHouse cluster DDL, generated by projections/cluster.py from the single-node migrations.",
             "-- Apply in order (clickhouse-client --multiquery < file). Every CREATE is IF NOT EXISTS and every",
             "-- ADD COLUMN IF NOT EXISTS, so running the whole script again is harmless.", ""]
    for statement in statements:
        lines.append(f"-- {statement.version}: {statement.role} {statement.table}")
        lines.append(statement.sql + ";")
        lines.append("")
    return "\n".join(lines)


# --- rewriting -----------------------------------------------------------------------------------

_CREATE_TABLE = re.compile(r"^CREATE TABLE (?:IF NOT EXISTS )?(\w+)\.(\w+)\s*\(", re.S)
_ENGINE = re.compile(r"^\s*ENGINE\s*=\s*(\w+)", re.S)
_ALTER = re.compile(r"^ALTER TABLE (\w+)\.(\w+)\s+(.*)$", re.S)
_CREATE_VIEW = re.compile(r"^CREATE (OR REPLACE )?VIEW (IF NOT EXISTS )?(\w+)\.(\w+)\s+AS\b(.*)$", re.S)
_ORDER_BY = re.compile(r"\bORDER BY\s+", re.S)


def _rewrite(version: int, sql: str, database: str, cluster: str, distributed: set[str]) -> list[Statement]:
    on = f"ON CLUSTER '{cluster}'"
    if match := _CREATE_TABLE.match(sql):
        db, name = match.groups()
        close = _closing(sql, match.end() - 1)
        columns, tail = sql[match.end():close], sql[close + 1:]
        engine = _ENGINE.match(tail)
        if not engine or not engine.group(1).endswith("MergeTree") or engine.group(1).startswith("Replicated"):
            raise UnsupportedStatement(f"{name}: only single-node *MergeTree engines can be made replicated")
        rest = tail[engine.end():]
        args = ""
        if rest.startswith("("):
            end = _closing(rest, 0)
            args, rest = rest[1:end].strip(), rest[end + 1:]
        unsharded = name in UNSHARDED
        local = name if unsharded else name + LOCAL_SUFFIX
        path = EVERY_NODE_PATH if unsharded else REPLICA_PATH
        engine_args = ", ".join(filter(None, [f"'{path}'", "'{replica}'", args]))
        statements = [Statement(version, name, "replicated",
                                f"CREATE TABLE IF NOT EXISTS {db}.{local} {on}\n({columns})\n"
                                f"ENGINE = Replicated{engine.group(1)}({engine_args}){rest}".rstrip())]
        if not unsharded:
            key = _sharding_key(_column_names(columns), rest, name)
            statements.append(Statement(version, name, "distributed",
                                        f"CREATE TABLE IF NOT EXISTS {db}.{name} {on} AS {db}.{local}\n"
                                        f"ENGINE = Distributed('{cluster}', '{db}', '{local}', {key})"))
            distributed.add(name)
        return statements
    if match := _ALTER.match(sql):
        db, name, commands = match.groups()
        if name not in distributed and name not in UNSHARDED:
            raise UnsupportedStatement(f"ALTER of {name}, which no earlier migration created")
        local = name if name in UNSHARDED else name + LOCAL_SUFFIX
        statements = [Statement(version, name, "alter-replicated", f"ALTER TABLE {db}.{local} {on}\n    {commands.strip()}")]
        parts = [" ".join(part.split()).upper() for part in _split_top_level(commands)]
        if name in distributed and all(part.startswith(_COLUMN_COMMANDS) for part in parts):
            statements.append(Statement(version, name, "alter-distributed",
                                        f"ALTER TABLE {db}.{name} {on}\n    {commands.strip()}"))
        return statements
    if match := _CREATE_VIEW.match(sql):
        replace, if_not_exists, db, name, body = match.groups()
        return [Statement(version, name, "view",
                          f"CREATE {replace or ''}VIEW {if_not_exists or ''}{db}.{name} {on} AS{body}")]
    raise UnsupportedStatement(f"migration {version}: no cluster form for: {sql[:80]}")


def _sharding_key(columns: list[str], rest: str, table: str) -> str:
    if "customer_key" in columns:
        return "cityHash64(customer_key)"
    order = _ORDER_BY.search(rest)
    if not order:
        raise UnsupportedStatement(f"{table}: no customer_key and no ORDER BY to shard by")
    start = order.end()
    if rest[start] == "(":
        return f"cityHash64({rest[start + 1:_closing(rest, start)].strip()})"
    return f"cityHash64({rest[start:].split(None, 1)[0]})"


def _column_names(columns: str) -> list[str]:
    names = []
    for item in _split_top_level(columns):
        first = item.split(None, 1)[0].strip("`") if item.strip() else ""
        if first.upper() not in {"", "INDEX", "PROJECTION", "CONSTRAINT"}:
            names.append(first)
    return names


def _scan(text: str):
    """(index, character, depth) for characters outside quoted strings and backquoted names."""
    depth, i, quote = 0, 0, ""
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 2
                continue
            if char == quote:
                if text[i + 1:i + 2] == quote:  # '' inside a string
                    i += 2
                    continue
                quote = ""
            i += 1
            continue
        if char in "'`\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        yield i, char, depth
        i += 1


def _closing(text: str, open_at: int) -> int:
    """Index of the parenthesis that closes the one at `open_at`."""
    base = None
    for i, char, depth in _scan(text):
        if i == open_at:
            base = depth - 1
        elif base is not None and char == ")" and depth == base:
            return i
    raise UnsupportedStatement(f"unbalanced parentheses in: {text[:80]}")


def _split_top_level(text: str) -> list[str]:
    parts, start = [], 0
    for i, char, depth in _scan(text):
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]
