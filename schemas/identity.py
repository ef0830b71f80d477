"""Identity records: how events that name a customer only by an alias (a loyalty card, an app user
id, a hashed phone or e-mail, a device) reach that customer's partition. The worker writes them into
the events topic itself, so attribution is part of the log and a replay attributes alike
(docs/identity.md has the policy):

- `alias_linked`, keyed by the alias: the customer's partition saw the alias on one of the
  customer's events (or an `identity_linked` event) and tells the alias's partition who it is;
- `alias_event_attributed`, keyed by the customer: an event that arrived with only the alias,
  forwarded by the alias's partition to the customer's, unchanged inside;
- `alias_unlinked`, keyed by the alias: the customer was erased (streams/erasure.py), and the
  alias's partition forgets the link, so the alias's later events stay with it."""

from __future__ import annotations

import uuid
from typing import Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, Field

from schemas.envelope import AliasKey, Model, NonEmpty

ALIAS_LINKED_TYPE = "alias_linked"
ALIAS_EVENT_ATTRIBUTED_TYPE = "alias_event_attributed"
ALIAS_UNLINKED_TYPE = "alias_unlinked"
_NAMESPACE = uuid.UUID("5b0f3f4e-4d2a-4c55-9a57-6f1d0c1f2a10")


def derived_id(*parts: str) -> UUID:
    """A record id that every redelivery and replay computes alike, so duplicates are recognised."""
    return uuid.uuid5(_NAMESPACE, "|".join(parts))


class AliasLinked(Model):
    event_id: UUID
    type: Literal["alias_linked"] = ALIAS_LINKED_TYPE
    occurred_at: AwareDatetime = Field(description="event time of the event that showed the link")
    alias_key: AliasKey = Field(description="alias_type:value, the key of the alias's records")
    customer_id: NonEmpty
    cause_event_id: UUID


class AliasEventAttributed(Model):
    event_id: UUID
    type: Literal["alias_event_attributed"] = ALIAS_EVENT_ATTRIBUTED_TYPE
    alias_key: AliasKey
    customer_id: NonEmpty
    event: dict[str, Any] = Field(description="the event as it arrived, with only the alias")


class AliasUnlinked(Model):
    event_id: UUID
    type: Literal["alias_unlinked"] = ALIAS_UNLINKED_TYPE
    occurred_at: AwareDatetime = Field(description="event time of the erasure request")
    alias_key: AliasKey = Field(description="alias_type:value, the key of the alias's records")
    customer_id: NonEmpty = Field(description="the erased customer the alias was linked to")
    cause_event_id: UUID = Field(description="event_id of the customer_erasure_requested event")
