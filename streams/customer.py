"""Everything the worker keeps per customer, in one value so that one state write is atomic:
the profile, the loyalty account, the churn state, the redelivery guard, and the outbox.

The outbox holds, per record at or after the source partition's committed offset that changed the
customer, the outputs that are not snapshots (ledger movements, tier, segment and alert changes). Faust
flushes every output before it commits an offset, so anything older was delivered; anything newer
may have been lost in a crash, and is re-sent when its record is redelivered, with the current
profile and balance: their latest snapshot supersedes all earlier ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.churn.state import ChurnState
from streams.loyalty.ledger import Account
from streams.profile import CustomerProfile


@dataclass(slots=True)
class CustomerState:
    profile: CustomerProfile
    account: Account
    # Offset (in the customer's partition) of the last event applied: the redelivery guard.
    last_offset: int = -1
    # The deadline registered in the partition's timers (see streams/timers.py).
    due_ms: int | None = None
    # [[source offset, [output dicts]]], oldest first.
    outbox: list[list[Any]] = field(default_factory=list)
    # For a key that is an alias (docs/identity.md): the customer it is linked to, and until then the
    # events that arrived with only this alias, as [offset, event], to be attributed at the link, and
    # their size as they arrived (which bounds the state's: streams/pipeline.py HELD_BYTES).
    linked_to: str | None = None
    held: list[list[Any]] = field(default_factory=list)
    held_bytes: int = 0
    # Churn: purchase history for the score and indicators, open alerts (streams/churn).
    churn: ChurnState = field(default_factory=ChurnState)
    # Ids of the data keys the personal values of the events folded here were sealed under (sorted):
    # what an erasure shreds (streams/erasure.py, docs/privacy.md).
    data_keys: tuple[str, ...] = ()
    # Aliases an erasure unlinked whose link lives in another partition's state: events they
    # still attribute here are refused (dead letter `alias_unlinked`), until the customer's own
    # events show the alias again (docs/privacy.md).
    unlinked_aliases: tuple[str, ...] = ()

    @classmethod
    def new(cls, customer_key: str) -> CustomerState:
        return cls(CustomerProfile(customer_key=customer_key), Account(customer_key=customer_key))

    def to_dict(self) -> dict[str, Any]:
        data = {"profile": self.profile.to_dict(), "account": self.account.to_dict(),
                "last_offset": self.last_offset, "due_ms": self.due_ms, "outbox": self.outbox}
        if self.linked_to is not None or self.held:
            data.update(linked_to=self.linked_to, held=self.held, held_bytes=self.held_bytes)
        churn = self.churn.to_dict()
        if churn:
            data["churn"] = churn
        if self.data_keys:
            data["data_keys"] = list(self.data_keys)
        if self.unlinked_aliases:
            data["unlinked_aliases"] = list(self.unlinked_aliases)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CustomerState:
        held = data.get("held", [])
        # States written before held_bytes existed: the size of the held events as stored.
        held_bytes = data["held_bytes"] if "held_bytes" in data else sum(len(orjson.dumps(e)) for _, e in held)
        return cls(CustomerProfile.from_dict(data["profile"]), Account.from_dict(data["account"]),
                   data["last_offset"], data["due_ms"], data["outbox"], data.get("linked_to"), held, held_bytes,
                   ChurnState.from_dict(data.get("churn")), tuple(data.get("data_keys", ())),
                   tuple(data.get("unlinked_aliases", ())))

    @property
    def erased(self) -> bool:
        """Whether the customer was erased and nothing of theirs has been folded since."""
        return self.profile.erased_at_ms is not None

    def keep_outputs(self, offset: int, outputs: list[dict[str, Any]], committed_offset: int) -> None:
        # Kept even when empty: it marks the record as applied to this customer (see `touched_at`).
        self.outbox = [entry for entry in self.outbox if entry[0] >= committed_offset and entry[0] != offset]
        self.outbox.append([offset, outputs])

    def touched_at(self, offset: int) -> bool:
        """Whether the record at `offset` changed this customer (and was not yet committed)."""
        return any(entry_offset == offset for entry_offset, _ in self.outbox)

    def outputs_at(self, offset: int) -> list[dict[str, Any]]:
        return next((outputs for entry_offset, outputs in self.outbox if entry_offset == offset), [])
