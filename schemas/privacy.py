"""Records about personal data (docs/privacy.md). Neither holds a personal value.

- `customer_erased` (topic crm.erasures, keyed by customer key): what the worker's fold did when it
  met a `customer_erasure_requested` event. Written by the fold, so a replay writes it again alike.
- `audit` (topic crm.audit): who read, exported or erased whose personal data, when and why, and
  whether it was allowed. Written by the process that served the request."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, Field

from schemas.envelope import AliasKey, Model, NonEmpty

CUSTOMER_ERASED_TYPE = "customer_erased"
AUDIT_TYPE = "audit"


class CustomerErased(Model):
    type: Literal["customer_erased"] = CUSTOMER_ERASED_TYPE
    customer_key: AliasKey = Field(description="customer id, or alias key for an alias's own state")
    request_event_id: UUID = Field(description="event_id of the customer_erasure_requested event")
    request_id: NonEmpty
    requested_by: NonEmpty
    erased_at: AwareDatetime = Field(description="event time of the request: when the erasure took effect")
    data_keys_shredded: list[str] = Field(description="ids of the data keys tombstoned in crm.customer-keys")
    aliases_unlinked: list[str] = Field(description="alias keys (type:value) no longer attributed to the customer")
    points_forfeited: int = Field(description="points balance written off by the erasure")
    alerts_closed: list[str] = Field(description="ids of the open alerts closed with outcome `erased`")


AuditAction = Literal["read_personal", "export", "erase", "backup", "restore", "rotate_master_key"]


class AuditRecord(Model):
    type: Literal["audit"] = AUDIT_TYPE
    audit_id: UUID
    at: AwareDatetime = Field(description="wall-clock time the request was served")
    actor: NonEmpty = Field(description="API key id, or `cli:<os user>`")
    role: NonEmpty = Field(description="the role the actor acted in: support, privacy_officer, operator")
    action: AuditAction
    customer_key: str = Field(default="", description="whose data; empty for actions on no one customer")
    reason: NonEmpty = Field(description="why, as the actor gave it (a ticket or request id)")
    outcome: Literal["allowed", "refused", "failed"]
    detail: str = Field(default="", max_length=2000, description="what was answered or why it was refused; no personal values")
