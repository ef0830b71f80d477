"""What the worker keeps per partition for the segments that compare a customer with everyone else:
the population boundaries and the churn model in force (schemas/boundaries.py, schemas/alerts.py), a directory of the partition's customers,
and how far the boundaries have been carried through that directory.

Kept in the worker's state table beside the customers, under `s|` keys, like the timers:
- `s|<partition>`: the boundaries in force, the directory's chunk count, and the sweep cursor;
- `s|<partition>|<chunk>`: customer keys in order of their first event, at most CHUNK per chunk.

New boundaries (or a new churn model) reach a customer at the customer's next event, and otherwise through the sweep: each
clock tick after a boundaries record rescores the customers of the next SWEEP_CHUNKS chunks. Which
chunks a tick takes is recorded with the tick's offset, so a tick redelivered after a crash takes
the same ones, and the changes carry the same event times as in a replay."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from schemas.alerts import ChurnModelPublished
from schemas.boundaries import SegmentBoundaries

# Small chunks: adding a customer rewrites the last chunk, and every write goes to the changelog.
_PARSED: dict[str, SegmentBoundaries] = {}
_PARSED_MODELS: dict[str, ChurnModelPublished] = {}
CHUNK = 100
SWEEP_CHUNKS = 50


class PartitionSegments:
    def __init__(self, store: MutableMapping[str, Any], partition: int):
        self.store = store
        self.partition = partition
        self.meta_key = f"s|{partition}"
        meta = store.get(self.meta_key) or {}
        self._boundaries: dict[str, Any] | None = meta.get("boundaries")
        self.chunks: int = meta.get("chunks", 0)
        # [boundaries id, first chunk, end chunk, offset of the tick that swept them]
        self.sweep: list[Any] | None = meta.get("sweep")
        self._parsed: SegmentBoundaries | None = None
        self._churn_model: dict[str, Any] | None = meta.get("churn_model")

    def save(self) -> None:
        self.store[self.meta_key] = {"boundaries": self._boundaries, "chunks": self.chunks, "sweep": self.sweep,
                                     "churn_model": self._churn_model}

    @property
    def churn_model(self) -> ChurnModelPublished | None:
        if self._churn_model is None:
            return None
        model_id = self._churn_model["model_id"]
        if model_id not in _PARSED_MODELS:
            _PARSED_MODELS[model_id] = ChurnModelPublished.model_validate(self._churn_model)
        return _PARSED_MODELS[model_id]

    def put_churn_model(self, model: ChurnModelPublished) -> None:
        """Put a churn model in force; the sweep carries it to every customer, as it does boundaries."""
        self._churn_model = model.model_dump(mode="json")
        _PARSED_MODELS.setdefault(model.model_id, model)
        self.sweep = [model.model_id, 0, 0, -1]
        self.save()

    @property
    def boundaries(self) -> SegmentBoundaries | None:
        if self._boundaries is not None and self._parsed is None:
            # Read on every event: validate each set of boundaries once per process (an id names
            # one content: it carries a hash of it).
            boundaries_id = self._boundaries["boundaries_id"]
            if boundaries_id not in _PARSED:
                _PARSED[boundaries_id] = SegmentBoundaries.model_validate(self._boundaries)
            self._parsed = _PARSED[boundaries_id]
        return self._parsed

    @property
    def boundaries_id(self) -> str | None:
        return None if self._boundaries is None else self._boundaries["boundaries_id"]

    def publish(self, boundaries: SegmentBoundaries) -> None:
        """Put new boundaries in force and start carrying them through the directory."""
        self._boundaries = boundaries.model_dump(mode="json")
        self._parsed = boundaries
        self.sweep = [boundaries.boundaries_id, 0, 0, -1]
        self.save()

    def _chunk_key(self, chunk: int) -> str:
        return f"s|{self.partition}|{chunk}"

    def enrol(self, customer_key: str) -> None:
        """Add a customer seen for the first time. A crash can only lose a suffix of the state
        writes, so a customer enrolled before a crash is in the last chunk when its event comes again."""
        if self.chunks:
            last = self.store.get(self._chunk_key(self.chunks - 1)) or []
            if customer_key in last:
                return
            if len(last) < CHUNK:
                self.store[self._chunk_key(self.chunks - 1)] = [*last, customer_key]
                return
        self.store[self._chunk_key(self.chunks)] = [customer_key]
        self.chunks += 1
        self.save()

    def sweep_batch(self, tick_offset: int) -> list[str]:
        """The customers the tick at `tick_offset` carries the boundaries to (none once every chunk
        has been swept). Saves the cursor; call it before saving the customers it names."""
        if self.sweep is None:
            return []
        boundaries_id, first, end, swept_by = self.sweep
        if swept_by != tick_offset:
            first, end = end, min(end + SWEEP_CHUNKS, self.chunks)
            if first >= end:
                return []
            self.sweep = [boundaries_id, first, end, tick_offset]
            self.save()
        keys: list[str] = []
        for chunk in range(first, end):
            keys.extend(self.store.get(self._chunk_key(chunk)) or [])
        return keys
