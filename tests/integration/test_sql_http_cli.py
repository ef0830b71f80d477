"""`crm sql` while the stack runs. In this test session the projection writer runs in the test process
(tests/integration/conftest.py), which owns the embedded ClickHouse: `crm sql` run here opens the engine
directly, as it does when the stack is stopped, while `crm sql` in another process finds the database
busy and goes through the writer's SQL endpoint as its local admin ($CRM_STATE_DIR/run/sql-admin). Both
must print the same."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli import main
from streams.config import PROJECT_ROOT
from tests.integration.test_sql_http import customer, writer_endpoint  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

QUERIES = [
    "SELECT number, toString(number) AS s, number / 3 AS f, toDate('2026-01-01') + number AS d, "
    "if(number = 1, NULL, number) AS n, [number, 1] AS a, (number, 'x') AS t FROM numbers(4)",
    "SELECT toDateTime('2026-02-03 04:05:06', 'UTC') AS t, toDecimal64(12.5, 2) AS d, "
    "toUUID('7f1c2a9e-0000-4000-8000-000000000000') AS u, map('k', 1) AS m, 'a\\tb \"q\", ü' AS s",
    "SELECT name, engine FROM system.tables WHERE database = currentDatabase() "
    "AND name IN ('events', 'customer_profiles') ORDER BY name",
    "SELECT 1 AS x WHERE 0",
]
WIDTH = {"COLUMNS": "160"}  # the table format fits the terminal: the same width either way


def direct(capsys, *argv: str) -> tuple[int, str, str]:
    """`crm sql` in this process, which owns the engine."""
    code = main(["sql", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def through_the_writer(*argv: str) -> tuple[int, str, str]:
    """`crm sql` in a process of its own, with this session's state directory."""
    done = subprocess.run([sys.executable, "-m", "services.cli", "sql", *argv], capture_output=True,
                          env={**os.environ, **WIDTH}, cwd=PROJECT_ROOT, timeout=300)
    return done.returncode, done.stdout.decode(), done.stderr.decode()  # as printed: CSV ends lines with \r\n


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
@pytest.mark.parametrize("query", QUERIES)
def test_crm_sql_prints_the_same_through_the_running_writer_as_directly(writer_endpoint, capsys, monkeypatch,
                                                                          query, fmt):
    monkeypatch.setenv("COLUMNS", WIDTH["COLUMNS"])
    code, out, err = direct(capsys, query, "--format", fmt)
    assert (code, err) == (0, "")
    assert through_the_writer(query, "--format", fmt) == (0, out, "")


def test_crm_sql_of_live_projections_is_the_same_either_way(writer_endpoint, customer, capsys):
    query = f"SELECT type, toDate(occurred_at) AS day FROM events FINAL WHERE customer_key = '{customer}' ORDER BY day"
    code, out, _ = direct(capsys, query, "--format", "csv")
    assert code == 0 and out.count("daily_sign_in") == 3
    assert through_the_writer(query, "--format", "csv") == (0, out, "")


def test_crm_sql_reports_a_failed_query_the_same_either_way(writer_endpoint, capsys):
    code, _, err = direct(capsys, "SELECT * FROM no_such_table")
    assert code == 1 and err.startswith("error: Code: 60. DB::Exception: Unknown table expression identifier")
    other_code, _, other_err = through_the_writer("SELECT * FROM no_such_table")
    assert other_code == 1 and other_err.splitlines()[0][:90] == err.splitlines()[0][:90]


def test_crm_sql_write_while_the_stack_runs_is_refused_with_a_clear_message(writer_endpoint):
    code, out, err = through_the_writer("--write", "OPTIMIZE TABLE events FINAL")
    assert (code, out) == (2, "")
    assert "owns it while it runs" in err and "`crm sql --write` changes data" in err
