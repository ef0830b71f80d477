"""What a person reads about an import: the rejected rows as CSV (file, line, reason, detail,
customer key, the row as it was in the file) and a plain-text summary of what each file became."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import orjson

from services.importer import readers
from services.importer.build import Reject, Tally
from services.importer.mapping import SourceFile

REJECT_COLUMNS = ["file", "line", "reason", "detail", "customer_key", "original"]


def originals(rejects: list[Reject]) -> dict[tuple[str, int], bytes]:
    """(file name, line) -> the row's bytes as in the file, for every rejected row."""
    wanted: dict[str, tuple[SourceFile, set[int]]] = {}
    for reject in rejects:
        wanted.setdefault(reject.source.name, (reject.source, set()))[1].add(reject.line)
    found: dict[tuple[str, int], bytes] = {}
    for name, (source, lines) in wanted.items():
        found.update({(name, line): raw for line, raw in readers.originals(source, lines).items()})
    return found


def write_rejects(path: Path, rejects: list[Reject], rows: dict[tuple[str, int], bytes]) -> None:
    """The reject report, replaced whole: one CSV row per rejected row, in file and line order."""
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REJECT_COLUMNS)
        for reject in rejects:
            original = rows.get((reject.source.name, reject.line), b"").decode("utf-8", errors="replace")
            writer.writerow([reject.source.name, reject.line, reject.reason, reject.detail, reject.customer_key,
                             original])
    temporary.replace(path)


def summary(files: list[Tally], rejects: list[Reject], events: int, customers: int) -> list[str]:
    """Per file: rows read, events made by type, rows rejected; then the totals and reasons."""
    lines = []
    width = max((len(tally.source.name) for tally in files), default=0)
    for tally in files:
        made = ", ".join(f"{count:,} {type_name}" for type_name, count in sorted(tally.events.items())) or "no events"
        lines.append(f"  {tally.source.name:<{width}}  {tally.rows:>10,} rows -> {made}; {tally.rejected:,} rejected")
    rows = sum(tally.rows for tally in files)
    lines.append(f"{events:,} events for {customers:,} customers from {rows:,} rows; {len(rejects):,} rows rejected")
    reasons = Counter(reject.reason for reject in rejects)
    if reasons:
        lines.append("rejected: " + ", ".join(f"{reason} {count:,}" for reason, count in reasons.most_common()))
    return lines


def rejects_digest(rejects: list[Reject]) -> str:
    """What identifies a set of rejects: file, line, reason and detail of each, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for reject in rejects:
        digest.update(orjson.dumps([reject.source.kind, reject.source.name, reject.line, reject.reason, reject.detail]))
    return digest.hexdigest()
