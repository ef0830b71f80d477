"""docs/dictionary.md cannot fall behind the DDL: after the migrations, every table and view of the
database has a section there, with its engine and keys as ClickHouse reports them, and exactly its
columns (name, and for tables the type) as `system.columns` lists them. And every query in
docs/cookbook.md runs."""

from __future__ import annotations

import re
from pathlib import Path

DICTIONARY = Path(__file__).resolve().parents[2] / "docs" / "dictionary.md"


def _sections() -> dict[str, str]:
    """`## `name`` heading -> the text up to the next heading."""
    text = DICTIONARY.read_text()
    parts = re.split(r"^#{1,2} ", text, flags=re.M)
    return {match.group(1): part for part in parts if (match := re.match(r"`(\w+)`\n", part))}


def _documented_columns(section: str) -> dict[str, str]:
    return dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", section, flags=re.M))


def test_every_table_view_and_column_is_in_the_dictionary_as_the_ddl_says(stack):
    database = stack.settings.clickhouse_database
    tables = {name: (engine, sorting, partition) for name, engine, sorting, partition in stack.query(
        "SELECT name, engine, sorting_key, partition_key FROM system.tables WHERE database = {d:String}",
        {"d": database})}
    columns: dict[str, dict[str, str]] = {}
    for table, name, type_ in stack.query("SELECT table, name, type FROM system.columns WHERE database = {d:String} "
                                          "ORDER BY table, position", {"d": database}):
        columns.setdefault(table, {})[name] = type_
    sections = _sections()

    # A rebuild of the projections (if one ran in this session) leaves `<table>__<suffix>` copies.
    copies = {name for name in tables if "__" in name and name.split("__")[0] in tables}
    expected = set(tables) - copies
    assert {"events", "customer_profiles", "dead_letters", "points_ledger", "tier_changes", "points_balances",
            "segment_changes", "segment_boundaries", "schema_migrations", "daily_store_channel", "retention_cohorts",
            "points_liability_daily", "segment_sizes_daily"} <= expected
    assert expected - set(sections) == set(), "tables and views without a section in docs/dictionary.md"
    assert set(sections) - expected == set(), "sections in docs/dictionary.md for tables that do not exist"

    for name in sorted(expected):
        section = sections[name]
        engine, sorting, partition = tables[name]
        assert f"**Engine:** `{engine}`" in section, name
        if sorting:
            assert f"**Sorting key:** `{sorting}`" in section, name
        if partition:
            assert f"**Partition key:** `{partition}`" in section, name
        documented = _documented_columns(section)
        assert list(documented) == list(columns[name]), f"{name}: columns in docs/dictionary.md differ from the DDL"
        if engine != "View":
            # A view's column types are inferred by the server and may be spelled differently by
            # another ClickHouse version; a table's are declared by the migrations.
            assert documented == columns[name], f"{name}: column types in docs/dictionary.md differ from the DDL"
        for column in columns[name]:
            meaning = re.search(rf"^\| `{column}` \| `[^`]+` \| (.+) \|$", section, flags=re.M)
            assert meaning and meaning.group(1).strip(), f"{name}.{column}: no meaning given"


def test_every_query_in_the_cookbook_runs(stack):
    """docs/cookbook.md shows its queries' output on the demo data; here they run on the test data
    (other rows), so a renamed column or a broken query shows up."""
    text = (DICTIONARY.parent / "cookbook.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    assert len(queries) >= 15
    for query in queries:
        stack.query(query)
    # The views are part of it: each is queried at least once.
    for view in ("daily_store_channel", "retention_cohorts", "points_liability_daily", "segment_sizes_daily"):
        assert any(view in query for query in queries), view
