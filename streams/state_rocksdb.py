"""The RocksDB backend of a partition's state (streams/state.py): one database per partition, with
the changelog offset the data reaches stored in the same atomic write as the data."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

# Not a key the fold can make: its keys all start with a prefix of streams/state.py.
CHECKPOINT_KEY = b"\x00changelog-offset"


class RocksDBBackend:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options)

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def keys(self, prefix: bytes) -> Iterator[bytes]:
        for key in self._db.keys(from_key=prefix):
            if not key.startswith(prefix):
                return
            yield key

    def write(self, changes: dict[bytes, bytes | None], checkpoint: int | None) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in changes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if checkpoint is not None:
            batch.put(CHECKPOINT_KEY, str(checkpoint).encode())
        self._db.write(batch)

    @property
    def checkpoint(self) -> int | None:
        """The offset of the last changelog record this database holds, or None (nothing yet)."""
        raw = self._db.get(CHECKPOINT_KEY)
        return None if raw is None else int(raw)

    def close(self) -> None:
        self._db.close()

    def destroy(self) -> None:
        """Close and delete the database (its data is then only in the changelog)."""
        self._db.close()
        shutil.rmtree(self.path, ignore_errors=True)
