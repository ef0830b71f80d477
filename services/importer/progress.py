"""How far an import got, under `$CRM_STATE_DIR/imports/<import id>/`: per partition of `crm.events`,
the digest of the stream it was sending there and the length of that stream's prefix Kafka
acknowledged (`progress/<partition>.json`); and the digest of the rejects last sent to the
dead-letter topic (`dead-letters.json`). A run that finds the same digest resumes after that prefix.

Invariants: `acknowledged` only ever names a prefix of the stream every record of which Kafka
acknowledged (acks=all); each file is replaced atomically, so a crash leaves the old or the new one,
never half of either; each partition's file has one writer (the process that owns the partition);
one `crm import` at a time holds an import's folder (an exclusive lock)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass
class StreamProgress:
    partition: int
    digest: str
    events: int
    acknowledged: int = 0


class ImportBusy(RuntimeError):
    """Another process is running the same import."""


class ImportFolder:
    """An import's folder: progress per partition, the dead letters sent, the reject report."""

    def __init__(self, state_dir: Path, import_id: str):
        self.path = state_dir / "imports" / import_id

    @property
    def rejects_file(self) -> Path:
        return self.path / "rejected.csv"

    @contextmanager
    def lock(self) -> Iterator[ImportFolder]:
        """Hold the import for this run; ImportBusy if another run holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ImportBusy(f"another `crm import` of this import runs now (lock {self.path / 'lock'})") from None
            yield self
        finally:
            os.close(descriptor)

    def load(self, partition: int) -> StreamProgress | None:
        found = self._read(self.path / "progress" / f"{partition}.json")
        return StreamProgress(**found) if found is not None else None

    def save(self, progress: StreamProgress) -> None:
        self._write(self.path / "progress" / f"{progress.partition}.json", asdict(progress))

    def dead_letters_sent(self, digest: str) -> bool:
        """Whether the rejects with this digest went to the dead-letter topic already."""
        found = self._read(self.path / "dead-letters.json")
        return found is not None and found.get("digest") == digest

    def record_dead_letters(self, digest: str, count: int) -> None:
        self._write(self.path / "dead-letters.json", {"digest": digest, "sent": count})

    @staticmethod
    def _read(path: Path) -> Any:
        try:
            return orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None

    @staticmethod
    def _write(path: Path, content: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(content, option=orjson.OPT_INDENT_2))
        os.replace(temporary, path)
