"""The rows of one export file, with the columns asked for, numbered as a person finds them:
CSV by the line a record starts on (the header is line 1), JSON Lines by line, Parquet by row
(from 1). A row that cannot be read at all (a CSV record with the wrong number of cells, a JSON
line that is not an object) comes as the text of the problem instead of a record, so that it is
rejected, not lost. `originals` gives back the exact bytes of chosen rows for the reject report
and the dead letters (Parquet has no row bytes: its rows come back as JSON).

Invariant: every row of a file comes out once, in file order, with a line number no other row has."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

from services.importer.mapping import MappingError, SourceFile

Record = Sequence[Any]
PARQUET_BATCH_ROWS = 65_536

# A CSV cell may be as large as a whole event (a long review text); the default limit is 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class Table:
    """The rows of a file: `positions[i]` is where the i-th column asked for is in each record;
    `records` gives (line, record) per row, or (line, problem) for a row that cannot be read."""
    positions: list[int]
    records: Iterator[tuple[int, Record | str]]


def table(source: SourceFile, columns: list[str]) -> Table:
    """The file's rows for `columns`. Raises MappingError when the file lacks a column the mapping
    names (a CSV or Parquet file at once, a JSON Lines file once no row had it)."""
    read = {"csv": _csv_table, "jsonl": _jsonl_table, "parquet": _parquet_table}[source.format]
    return read(source, columns)


def estimated_rows(source: SourceFile) -> int:
    """About how many rows `table` will give, for a progress bar: the lines of a text file (less the
    CSV header), the row count a Parquet file records."""
    if source.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(source.path).metadata.num_rows
    lines = 0
    with open(source.path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
    return max(lines - (source.format == "csv"), 0)


def originals(source: SourceFile, lines: set[int]) -> dict[int, bytes]:
    """The bytes of the rows starting on `lines`, without their line terminator."""
    if not lines:
        return {}
    read = {"csv": _csv_originals, "jsonl": _jsonl_originals, "parquet": _parquet_originals}[source.format]
    return read(source, lines)


def _encoding(source: SourceFile) -> str:
    """UTF-8 files from spreadsheet programs often start with a byte order mark: read past it."""
    return "utf-8-sig" if source.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else source.encoding


def _csv_table(source: SourceFile, columns: list[str]) -> Table:
    handle = open(source.path, newline="", encoding=_encoding(source))
    reader = csv.reader(handle, delimiter=source.delimiter)
    header = [name.strip() for name in next(reader, [])]
    missing = [column for column in columns if column not in header]
    if missing:
        handle.close()
        raise MappingError(f"{source.name}: no column {', '.join(map(repr, missing))}; its columns: "
                           f"{', '.join(header)}")
    return Table([header.index(column) for column in columns], _csv_records(handle, reader, len(header)))


def _csv_records(handle: TextIO, reader: Any, width: int) -> Iterator[tuple[int, Record | str]]:
    with handle:
        start = reader.line_num + 1
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record:
                continue  # a blank line
            if len(record) < width or any(record[width:]):  # trailing empty cells are harmless
                yield line, f"has {len(record)} cells, the header has {width}"
                continue
            yield line, record


def _csv_originals(source: SourceFile, lines: set[int]) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    encoding = source.encoding if _encoding(source) == source.encoding else "utf-8"
    with open(source.path, newline="", encoding=_encoding(source)) as handle:
        taken: list[str] = []

        def taking() -> Iterator[str]:
            for text in handle:
                taken.append(text)
                yield text

        reader = csv.reader(taking(), delimiter=source.delimiter)
        next(reader, None)
        start = reader.line_num + 1
        for _ in reader:
            line, start = start, reader.line_num + 1
            if line in lines:
                found[line] = "".join(taken).rstrip("\r\n").encode(encoding)
                if len(found) == len(lines):
                    break
            taken.clear()
    return found


def _jsonl_table(source: SourceFile, columns: list[str]) -> Table:
    return Table(list(range(len(columns))), _jsonl_records(source, columns))


def _jsonl_records(source: SourceFile, columns: list[str]) -> Iterator[tuple[int, Record | str]]:
    paths = [tuple(column.split(".")) for column in columns]
    unseen = set(columns)
    with open(source.path, "rb") as handle:
        for line, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                item = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                yield line, f"not JSON: {exc}"
                continue
            if not isinstance(item, dict):
                yield line, f"not a JSON object but {type(item).__name__}"
                continue
            if unseen:
                unseen -= {column for column, path in zip(columns, paths) if _dig(item, path) is not None}
            yield line, tuple([_dig(item, path) for path in paths])
    if unseen:
        raise MappingError(f"{source.name}: no row has {', '.join(map(repr, sorted(unseen)))}")


def _dig(item: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted column name ("customer.id"), or at the name itself if it has a dot."""
    if len(path) == 1 or ".".join(path) in item:
        return item.get(".".join(path))
    value: Any = item
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _jsonl_originals(source: SourceFile, lines: set[int]) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    with open(source.path, "rb") as handle:
        for line, text in enumerate(handle, 1):
            if line in lines:
                found[line] = text.rstrip(b"\r\n")
                if len(found) == len(lines):
                    break
    return found


def _parquet_table(source: SourceFile, columns: list[str]) -> Table:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source.path)
    names = parquet.schema_arrow.names
    missing = [column for column in columns if column not in names]
    if missing:
        raise MappingError(f"{source.name}: no column {', '.join(map(repr, missing))}; its columns: {', '.join(names)}")
    return Table(list(range(len(columns))), _parquet_records(parquet, columns))


def _parquet_records(parquet: Any, columns: list[str]) -> Iterator[tuple[int, Record | str]]:
    line = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        for cells in zip(*(batch.column(column).to_pylist() for column in columns)):
            line += 1
            yield line, cells


def _parquet_originals(source: SourceFile, lines: set[int]) -> dict[int, bytes]:
    import pyarrow.parquet as pq

    table = pq.read_table(source.path)
    wanted = sorted(lines)
    taken = table.take([line - 1 for line in wanted]).to_pylist()
    return {line: orjson.dumps(row, default=str) for line, row in zip(wanted, taken)}
