"""`audit_log`: who read, exported or erased whose personal data, when and why, and whether it was
allowed (schemas/privacy.py AuditRecord, topic crm.audit). No personal value is in it.

Not a projection of crm.events: the processes that serve such requests write crm.audit, so a rebuild
(projections/replay.py) leaves this table as it is; crm.audit is kept forever and the writer fills
the table from it (docs/privacy.md). Keyed by `audit_id`, so a record inserted again (a writer
crash) is one row (ReplacingMergeTree)."""

from __future__ import annotations

import logging
from datetime import UTC
from typing import Any, Iterable

from schemas.privacy import AuditRecord

log = logging.getLogger("crm.writer")

MIGRATIONS = [
    (20, """
CREATE TABLE IF NOT EXISTS {db}.audit_log
(
    audit_id      UUID,
    at            DateTime64(3, 'UTC') COMMENT 'wall-clock time the request was served',
    actor         String COMMENT 'API key id, or cli:<os user>',
    role          LowCardinality(String) COMMENT 'support, privacy_officer, operator',
    action        LowCardinality(String) COMMENT 'read_personal, export, erase, restore, rotate_master_key',
    customer_key  String COMMENT 'whose data; empty for actions on no one customer',
    reason        String COMMENT 'why, as the actor gave it (a ticket or request id)',
    outcome       LowCardinality(String) COMMENT 'allowed, refused or failed',
    detail        String COMMENT 'what was answered or why it was refused; no personal values'
)
ENGINE = ReplacingMergeTree
ORDER BY (at, audit_id)
"""),
]

COLUMNS = ["audit_id", "at", "actor", "role", "action", "customer_key", "reason", "outcome", "detail"]


def rows(records: Iterable[Any]) -> list[list[Any]]:
    """Rows from records of crm.audit; a record that is not an AuditRecord is logged and skipped."""
    out = []
    for record in records:
        if record.value is None:
            continue
        try:
            audit = AuditRecord.model_validate_json(record.value)
        except ValueError as exc:
            log.warning("skipped a record of %s partition %s offset %s that is not an audit record: %s",
                        getattr(record, "topic", "?"), getattr(record, "partition", "?"),
                        getattr(record, "offset", "?"), str(exc).replace("\n", " ")[:300])
            continue
        out.append([audit.audit_id, audit.at.astimezone(UTC), audit.actor, audit.role, audit.action,
                    audit.customer_key, audit.reason, audit.outcome, audit.detail])
    return out
