"""Erasure by deleting the key (crypto-shredding), as part of the worker's pure fold (docs/privacy.md).

Every personal value lies in the log sealed under a data key of the customer's (privacy/seal.py).
The customer's state records the ids of the keys its events' values were sealed under (`note_keys`,
for events of the customer's own and those attributed through an alias). A
`customer_erasure_requested` event then (`erase`):

- tombstones each of those keys in crm.customer-keys (`KeyShredded`): the values sealed under them,
  in the log and in every copy of it, can no longer be opened by anyone;
- wipes the profile's personal traces (contact fields given, aliases, consent), marks it
  `erased_at_ms`, and stops time for it (no timers, ticks pass it by);
- unlinks the customer's aliases: a link held in this partition's state directly; a link held in
  another partition's state by an `alias_unlinked` record to the alias's partition (the pipeline
  appends it, like `alias_linked`); what such a link attributes here before that record is folded
  is refused as an `alias_unlinked` dead letter;
- forfeits the points balance with a `forfeited` ledger movement of reason `erasure`;
- closes every open churn alert with status `erased`;
- emits a `customer_erased` record (schemas/privacy.py) for crm.erasures (`Erased`).

Everything is a function of the log, so a replay erases alike. The outputs go through the
customer's outbox like every other fact, so a redelivered request sends them again and changes
nothing. A request for a customer the partition does not know still emits its `customer_erased`
record, with nothing shredded. After an erasure the next event of the customer starts a new
customer (`new_life`) that numbers its rows on from the erased one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kafka.partitioner.default import murmur2

from privacy.seal import SealError, token_key_id
from schemas.alerts import AlertStatus, Cause, Severity
from schemas.envelope import SEALED_PREFIX, Envelope
from schemas.events import CustomerErasureRequested, personal_payload_fields
from schemas.privacy import CustomerErased
from streams import profile as profiles
from streams.churn.alerts import _ALERT_TYPES, _change
from streams.churn.indicators import Finding
from streams.churn.rules import ChurnRules
from streams.churn.state import ChurnState
from streams.customer import CustomerState
from streams.loyalty import ledger
from streams.outputs import Erased
from streams.profile import CustomerProfile
from streams.topics import EVENT_PARTITIONS


def is_request(event: Envelope) -> bool:
    return isinstance(getattr(event, "payload", None), CustomerErasureRequested)


def key_ids(event: Envelope) -> set[str]:
    """The data keys the event's sealed values were sealed under (the typed form of
    privacy.fields.key_ids)."""
    names = personal_payload_fields(event.type)
    if not names:
        return set()
    payload = getattr(event, "payload", None)
    found = set()
    for name in names:
        value = getattr(payload, name, None)
        if isinstance(value, str) and value.startswith(SEALED_PREFIX):
            try:
                found.add(token_key_id(value))
            except SealError:
                continue  # the sealed model's pattern lets none through; nothing to shred if one did
    return found


def note_keys(state: CustomerState, event: Envelope) -> None:
    """Record the data keys of an event folded into the customer's state."""
    found = key_ids(event)
    if found and not found <= set(state.data_keys):
        state.data_keys = tuple(sorted(found.union(state.data_keys)))


def partition_of(key: str) -> int:
    """The events partition of a record key, as Kafka's default partitioner places it."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % EVENT_PARTITIONS


def record(customer_key: str, event: Envelope, shredded: list[str], unlinked: list[str], points: int,
           alerts: list[str]) -> Erased:
    request: CustomerErasureRequested = event.payload  # type: ignore[attr-defined]
    # Built from values the catalog validated, without validating again: an alias key may be longer
    # than the model's customer_key allows (NAME_LENGTH; an alias key has its type in front).
    erased = CustomerErased.model_construct(customer_key=customer_key, request_event_id=event.event_id,
                            request_id=request.request_id, requested_by=request.requested_by,
                            erased_at=event.occurred_at, data_keys_shredded=shredded, aliases_unlinked=unlinked,
                            points_forfeited=points, alerts_closed=alerts)
    return Erased(customer_key, erased.model_dump(mode="json"))


def close_alerts(profile: CustomerProfile, churn: ChurnState, rules: ChurnRules, now_ms: int,
                 cause: Cause) -> list[dict[str, Any]]:
    """Every open alert closed with status `erased` (AlertChange dicts, in AlertType order); `churn`
    loses them."""
    version = rules.at_ms(now_ms)
    changes = []
    for alert_type, kind in _ALERT_TYPES:
        alert = churn.open.pop(kind, None)
        if alert is None:
            continue
        alert.version += 1
        closed = [Finding(code, 0, {}) for code in alert.codes]
        changes.append(_change(profile, alert, AlertStatus.ERASED, alert_type, closed, Severity(alert.severity), 0.0,
                               None, version, now_ms, cause))
    return changes


def unlink(state: CustomerState, partition: int, load: Callable[[str], CustomerState | None], save: Callable[[CustomerState], None]) -> tuple[list[str], list[str]]:
    """The customer's aliases unlinked: (all of them, those whose link lives in another partition,
    which the caller tells with `alias_unlinked` records). An alias state in this partition that is
    linked to the customer forgets the link, so the alias's later events stay with the alias as
    before any link."""
    customer_id = state.profile.customer_id
    elsewhere = []
    for alias in state.profile.aliases:
        if partition_of(alias) != partition:
            elsewhere.append(alias)
            continue
        alias_state = load(alias)
        if alias_state is not None and customer_id is not None and alias_state.linked_to == customer_id:
            alias_state.linked_to = None
            save(alias_state)
    return list(state.profile.aliases), elsewhere


def wipe(profile: CustomerProfile, at_ms: int, offset: int) -> CustomerProfile:
    """The profile with its personal traces gone and the erasure marked; the figures about
    purchases and segments stay, under the pseudonymous customer key, as they stood."""
    return profiles.evolve(profile, version=profile.version + 1, last_offset=offset, contact=(), aliases=(),
                           consent={}, open_alerts=(), churn_p_alive=None, churn_expected_90d=None,
                           churn_model_id="", points_available=0, points_pending=0,
                           clock_ms=max(profile.clock_ms, at_ms), erased_at_ms=at_ms)


def new_life(state: CustomerState) -> CustomerState:
    """The state of an erased customer who comes back: a new customer, whose profile, ledger and
    alerts number on from the erased one's (their rows are keyed by those numbers)."""
    key = state.account.customer_key
    fresh = CustomerState.new(key)
    fresh.profile = profiles.evolve(fresh.profile, version=state.profile.version,
                                    segment_seq=state.profile.segment_seq)
    fresh.account = ledger.new_life(state.account)
    fresh.churn = ChurnState(opened_count=state.churn.opened_count)
    fresh.last_offset, fresh.due_ms, fresh.outbox = state.last_offset, state.due_ms, state.outbox
    fresh.unlinked_aliases = state.unlinked_aliases
    return fresh

