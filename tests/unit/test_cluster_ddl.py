"""The cluster DDL (projections/cluster.py) is generated from the single-node migrations: every table
gets a replicated and a Distributed variant, every ALTER and view is carried over ON CLUSTER, and the
statements are accepted by ClickHouse's own parser and, as far as one embedded process can go, by
its engines (chdb in a subprocess: see `test_the_statements_create_working_tables_in_chdb`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from projections import cluster
from projections.cluster import Statement, UnsupportedStatement, cluster_statements, single_node_statements
from projections.migrations import MIGRATIONS


def _created_tables() -> dict[str, str]:
    """Single-node table -> its CREATE statement."""
    tables = {}
    for _, sql in single_node_statements("crm"):
        if match := re.match(r"\s*CREATE TABLE (?:IF NOT EXISTS )?crm\.(\w+)", sql):
            tables[match.group(1)] = sql
    return tables


def _by(statements: list[Statement], role: str) -> dict[str, list[Statement]]:
    found: dict[str, list[Statement]] = {}
    for statement in statements:
        if statement.role == role:
            found.setdefault(statement.table, []).append(statement)
    return found


def test_the_single_node_statements_are_what_migrate_runs():
    statements = single_node_statements("crm")
    assert [version for version, _ in statements] == [0] + [version for version, _ in MIGRATIONS]
    assert "crm.schema_migrations" in statements[0][1]
    assert [sql for _, sql in statements[1:]] == [sql.format(db="crm") for _, sql in MIGRATIONS]


def test_every_table_gets_a_replicated_and_a_distributed_variant():
    tables = _created_tables()
    assert {"events", "customer_profiles", "dead_letters", "points_ledger", "tier_changes", "points_balances",
            "segment_changes", "segment_boundaries", "schema_migrations"} <= set(tables)
    statements = cluster_statements("crm")
    replicated, distributed = _by(statements, "replicated"), _by(statements, "distributed")
    assert set(replicated) == set(tables)
    assert set(distributed) == set(tables) - {"schema_migrations"}
    for table, single in tables.items():
        [local] = replicated[table]
        columns = single[single.index("(") + 1:single.index("ENGINE")]
        assert columns.strip().rstrip(")").strip() in local.sql, f"{table}: the columns are copied verbatim"
        assert " ON CLUSTER '{cluster}'" in local.sql
        engine = re.search(r"ENGINE = (\w+)", single).group(1)
        assert f"ENGINE = Replicated{engine}(" in local.sql
        if table == "schema_migrations":
            # Bookkeeping every node must see whole: one replica set, no shard, no Distributed table.
            assert f"crm.{table} ON CLUSTER" in local.sql
            assert "('/clickhouse/tables/all/{database}/{table}', '{replica}')" in local.sql
            continue
        assert f"crm.{table}_local ON CLUSTER" in local.sql
        assert "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'" in local.sql
        [dist] = distributed[table]
        key = "cityHash64(customer_key)" if re.search(r"^\s+customer_key\s", single, re.M) else "cityHash64("
        assert f"CREATE TABLE IF NOT EXISTS crm.{table} ON CLUSTER '{{cluster}}' AS crm.{table}_local" in dist.sql
        assert f"ENGINE = Distributed('{{cluster}}', 'crm', '{table}_local', {key}" in dist.sql
    # Replacing engines keep their version column after the replication arguments.
    assert "'{replica}', version)" in replicated["customer_profiles"][0].sql
    assert "cityHash64(source_topic, source_partition, source_offset)" in distributed["dead_letters"][0].sql
    assert "cityHash64(boundaries_id)" in distributed["segment_boundaries"][0].sql


def test_alter_migrations_and_views_are_carried_over_on_cluster():
    statements = cluster_statements("crm")
    alters = [(version, sql.format(db="crm")) for version, sql in MIGRATIONS if sql.strip().startswith("ALTER")]
    views = [(version, sql) for version, sql in MIGRATIONS if sql.strip().startswith("CREATE VIEW")]
    assert alters and views
    for version, sql in alters:
        table = re.match(r"\s*ALTER TABLE crm\.(\w+)", sql).group(1)
        commands = sql.strip().split(None, 3)[3].strip()
        carried = {s.role: s.sql for s in statements if s.version == version}
        assert carried["alter-replicated"] == f"ALTER TABLE crm.{table}_local ON CLUSTER '{{cluster}}'\n    {commands}"
        # Column changes also reach the Distributed table, or it could not read the new columns.
        assert carried["alter-distributed"] == f"ALTER TABLE crm.{table} ON CLUSTER '{{cluster}}'\n    {commands}"
    for version, sql in views:
        [view] = [s for s in statements if s.version == version]
        assert view.role == "view" and " ON CLUSTER '{cluster}' AS\n" in view.sql
        # The view body is unchanged: it reads the Distributed tables, which keep the single-node names.
        assert view.sql.split(" AS\n", 1)[1] == sql.format(db="crm").split(" AS\n", 1)[1].rstrip()
    assert all("ON CLUSTER" in s.sql for s in statements if s.role != "record-versions")
    [record] = [s for s in statements if s.role == "record-versions"]
    assert record is statements[-1]
    assert record.sql.endswith(", ".join(f"({version})" for version, _ in MIGRATIONS))


def test_a_named_cluster_and_the_command_output():
    text = cluster.render(cluster_statements("crm", cluster="prod_eu"))
    assert "{cluster}" not in text
    assert "ON CLUSTER 'prod_eu'" in text and "Distributed('prod_eu', 'crm', 'events_local'" in text
    assert text.count(";\n") == len(cluster_statements("crm"))
    with pytest.raises(ValueError):
        cluster_statements("crm", cluster="x' ; DROP TABLE y")


def test_statements_without_a_cluster_form_are_refused():
    with pytest.raises(UnsupportedStatement):
        cluster._rewrite(200, "CREATE MATERIALIZED VIEW crm.m TO crm.t AS SELECT 1", "crm", "{cluster}", set())
    with pytest.raises(UnsupportedStatement):
        cluster._rewrite(200, "ALTER TABLE crm.nowhere ADD COLUMN x UInt8", "crm", "{cluster}", set())
    with pytest.raises(UnsupportedStatement):
        cluster._rewrite(200, "CREATE TABLE crm.l (x UInt8) ENGINE = Log", "crm", "{cluster}", set())


# --- ClickHouse's own parser and engines, through chdb --------------------------------------------

_CONFIG = """<clickhouse>
    <tcp_port>9000</tcp_port>
    <macros><cluster>crm_check</cluster><shard>01</shard><replica>r1</replica></macros>
    <zookeeper><implementation>testkeeper</implementation></zookeeper>
    <remote_servers>
        <crm_check>
            <shard><replica><host>localhost</host><port>9000</port></replica></shard>
            <shard><replica><host>127.0.0.1</host><port>9000</port></replica></shard>
        </crm_check>
    </remote_servers>
</clickhouse>
"""

# Runs in its own process: chdb allows one engine per process (an integration test may hold one),
# and it can abort while shutting down an engine with a test keeper, so the result is printed first
# and the process leaves with os._exit.
_CHECK = textwrap.dedent("""
    import json, os, re, sys
    import chdb
    from projections.cluster import cluster_statements

    results = {"parsed": 0, "executed": {}, "errors": []}
    def run(cursor, sql, label):
        try:
            cursor.execute(sql)
            cursor.fetchall()
            results["executed"][label] = results["executed"].get(label, 0) + 1
            return True
        except Exception as exc:
            results["errors"].append(f"{label}: {str(exc)[:300]}")
            return False

    def local(sql):
        # chdb cannot run distributed DDL (no DDL worker): run each statement on this node alone.
        return re.sub(r" ON CLUSTER '[^']*'", "", sql)

    connection = chdb.connect(f"file:{sys.argv[1]}/data?config-file={sys.argv[1]}/config.xml")
    cursor = connection.cursor()

    # 1. The parser: every statement as generated, ON CLUSTER and macros included.
    for s in cluster_statements("crm"):
        if run(cursor, "EXPLAIN AST " + s.sql, "parse"):
            results["parsed"] += 1

    # 2. Replicated engines (paths, macros, version columns) and Distributed tables (cluster, shard
    #    key) are created; column ALTERs apply to the Distributed tables; the views are created over
    #    them. A replicated table stays read-only here (no replication queue in an embedded engine),
    #    so ALTERs of the replicated tables and reads through them are checked in step 3.
    run(cursor, "CREATE DATABASE replicated", "setup")
    for s in cluster_statements("replicated"):
        if s.role != "alter-replicated" and s.role != "record-versions":
            run(cursor, local(s.sql), "replicated:" + s.role)

    # 3. The same layout with the replicated engines swapped for their single-node originals: every
    #    statement runs, then every Distributed table (with FINAL) and every view is read through a
    #    two-shard cluster, which is where ClickHouse refuses subqueries on Distributed tables inside
    #    distributed queries unless they are GLOBAL.
    run(cursor, "CREATE DATABASE crm", "setup")
    for s in cluster_statements("crm"):
        plain = re.sub(r"ENGINE = Replicated(\\w+)\\('[^']*', '[^']*'(, )?", r"ENGINE = \\1(", local(s.sql))
        run(cursor, plain.replace("MergeTree()", "MergeTree"), "plain:" + s.role)
    for s in cluster_statements("crm"):
        if s.role == "distributed":
            run(cursor, f"SELECT count() FROM crm.{s.table} FINAL", "read:distributed")
        elif s.role == "view":
            run(cursor, f"SELECT count() FROM crm.{s.table}", "read:view")
    print(json.dumps(results), flush=True)
    os._exit(0)
""")


def test_the_statements_create_working_tables_in_chdb(tmp_path):
    pytest.importorskip("chdb")
    (tmp_path / "config.xml").write_text(_CONFIG)
    done = subprocess.run([sys.executable, "-c", _CHECK, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the chdb check: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    results = json.loads(lines[-1])
    assert results["errors"] == []
    statements = cluster_statements("crm")
    roles = {role: sum(1 for s in statements if s.role == role) for role in {s.role for s in statements}}
    assert results["parsed"] == len(statements)
    executed = results["executed"]
    assert executed["replicated:replicated"] == roles["replicated"]
    assert executed["replicated:distributed"] == roles["distributed"]
    assert executed["replicated:alter-distributed"] == roles["alter-distributed"]
    assert executed["replicated:view"] == roles["view"]
    assert all(executed[f"plain:{role}"] == n for role, n in roles.items())
    assert executed["read:distributed"] == roles["distributed"]
    assert executed["read:view"] == roles["view"]
