"""Named moments in the worker's and the projection writer's batches at which a test can make the
process die as a crash would (SIGKILL: no cleanup, no flush). Off unless `CRM_FAILPOINTS` names them,
as `name=n` pairs separated by commas: the process kills itself the n-th time it reaches `name`. The
crash tests (tests/integration/test_batch_crashes.py, tests/fault/) use them to crash between each two
steps of a batch's end."""

from __future__ import annotations

import os
import signal
from collections import Counter

# Where a worker's batch can be cut short, in the order a batch reaches them.
WORKER_POINTS = (
    "batch.folded",             # state changed in memory only; nothing sent
    "flush.changelog_sent",     # the changelog records handed to the producer, the outputs not yet
    "flush.acknowledged",       # Kafka has changelog and outputs; RocksDB not written
    "flush.state_written",      # RocksDB written; the batch's source offsets not yet acknowledged
)
# Where the projection writer's batch can be cut short.
WRITER_POINTS = (
    "writer.table_inserted",    # one table's rows of a batch inserted, the others and the commit not yet
)
POINTS = WORKER_POINTS + WRITER_POINTS


class Failpoints:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get("CRM_FAILPOINTS", "") if spec is None else spec
        self.armed_counts: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, count = item.partition("=")
            if name not in POINTS:
                raise ValueError(f"CRM_FAILPOINTS: unknown failpoint {name!r} (known: {', '.join(POINTS)})")
            self.armed_counts[name] = int(count or 1)
        self.reached: Counter[str] = Counter()

    def armed(self, name: str) -> bool:
        return name in self.armed_counts

    def reach(self, name: str) -> None:
        if name in self.armed_counts:
            self.reached[name] += 1
            if self.reached[name] >= self.armed_counts[name]:
                os.kill(os.getpid(), signal.SIGKILL)
