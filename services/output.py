"""Printing query results for people (a table) and for programs (CSV, JSON lines)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table


def _cell(value: Any) -> str:
    return "NULL" if value is None else str(value)


def print_result(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table",
                 title: str | None = None, console: Console | None = None) -> None:
    if fmt == "csv":
        out = csv.writer(sys.stdout)
        out.writerow(columns)
        out.writerows([[_cell(v) for v in row] for row in rows])
        return
    if fmt == "json":
        for row in rows:
            sys.stdout.write(orjson.dumps(dict(zip(columns, row)), default=str).decode() + "\n")
        return
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    (console or Console()).print(table)
