"""What happens to one record of the events topic, as a pure function of the record and the state
it finds. The worker and the rebuild fold batches of records through it (streams/batch.py); tests
call `process` directly with dictionaries as state. One handler per kind of record (`_handle`),
each given the record's `Fold`: the record and the state it is folded against.

Customer events are folded into the customer's profile and loyalty account. The platform appends
records of its own: clock ticks (schemas/clock.py), which bring every customer of the partition with
something due up to the tick's event time; segment boundaries (schemas/boundaries.py), which the
following ticks carry to every customer of the partition (streams/segments/population.py); and
identity records (schemas/identity.py), which attribute events that came with only an alias to the
customer the alias belongs to (docs/identity.md).

Exactness under at-least-once delivery rests on two guards, both kept in state:
- `CustomerState.last_offset`: a record at or before it was already applied (a redelivery after a
  crash or rebalance). Its outputs are sent again, because the crash may have lost them: snapshots
  (profile, balance) as they are now, ledger entries from the outbox (streams/customer.py). Every
  projection row is versioned or keyed, so sending twice changes nothing.
- `seen_events[event_id]`: the producer sent this event before, at another offset. Identical
  content: a duplicate, ignored. Different content: a producer bug, dead-lettered.
The two tables are written separately, so each guard covers the case where the other's write was
lost: see `process` for the four cases. A tick is applied once per partition clock: a tick no later
than the partition's clock was applied before, and only re-sends what it changed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch
from datetime import UTC, datetime
from typing import Any, MutableMapping

from schemas.alerts import Cause, ChurnModelPublished
from schemas.boundaries import SegmentBoundaries
from schemas.clock import ClockTick
from schemas.codec import DecodeError, decode_catalog_event, decode_event, fingerprint, to_json_dict
from schemas.identity import AliasEventAttributed, AliasLinked, AliasUnlinked, derived_id
from schemas.envelope import EARLIEST_EVENT_TIME, LATEST_EVENT_TIME, Envelope
from streams import erasure
from streams.churn import fold as churn
from streams.customer import CustomerState
from streams.churn.state import ChurnState
from streams.loyalty import ledger
from streams.loyalty.calendar import to_ms
from streams import profile as profiles
from streams.profile import CustomerProfile
from streams.outputs import (
    OUTBOX, Accepted, AlertChanged, BalanceChanged, BoundariesApplied, ChurnModelApplied, DeadLetter, Duplicate, Erased,
    Forward, KeyShredded, LedgerEntry, Output, ProfileChanged, SegmentChanged,
)
from streams.records import SourceRecord
from streams.rulebooks import Rulebooks
from streams.segments import membership
from streams.segments.population import PartitionSegments
from streams.timers import PartitionTimers


@dataclass(frozen=True, slots=True)
class SeenEvent:
    fingerprint: str
    partition: int
    offset: int

    def to_list(self) -> list[Any]:
        return [self.fingerprint, self.partition, self.offset]

    @classmethod
    def from_list(cls, data: list[Any]) -> SeenEvent:
        return cls(*data)


# The record timestamps that may stand in for a missing received_at (schemas/codec.py out_of_time).
EARLIEST_MS, LATEST_MS = to_ms(EARLIEST_EVENT_TIME), to_ms(LATEST_EVENT_TIME)
# Events kept per unlinked alias for attribution at the link, at most so many and so many bytes (as
# they arrived); later ones stay only with the alias. The bytes keep the alias's state one record
# that Kafka takes (the changelog's records: 4 MiB for the worker's producer, a megabyte or so
# compressed for the broker): 500 events of up to MAX_EVENT_BYTES would not be.
HELD_LIMIT = 500
HELD_BYTES = 512 * 1024


def customer_store_key(customer_key: str) -> str:
    return f"c|{customer_key}"


def load_customer(store: MutableMapping[str, Any], customer_key: str) -> CustomerState | None:
    """The customer's state, as the fold's working copy: whatever a record changes in it, the
    record writes back (`_save`) before it ends (streams/state.py)."""
    return store.get(customer_store_key(customer_key))


@dataclass(slots=True)
class Fold:
    """One record's fold: the record, the state it meets, the rules, and the source partition's
    committed offset (everything before it was delivered; used only to forget outputs that no
    redelivery can ask for again). The partition's timers and segments are read once per record,
    when first needed, and shared by every customer the record changes."""
    record: SourceRecord
    store: MutableMapping[str, Any]
    seen: MutableMapping[str, SeenEvent]
    rules: Rulebooks
    committed_offset: int
    _timers: PartitionTimers | None = None
    _segments: PartitionSegments | None = None

    @property
    def timers(self) -> PartitionTimers:
        if self._timers is None:
            self._timers = PartitionTimers(self.store, self.record.partition)
        return self._timers

    @property
    def segments(self) -> PartitionSegments:
        if self._segments is None:
            self._segments = PartitionSegments(self.store, self.record.partition)
        return self._segments

    def dead_letter(self, reason: str, detail: str) -> list[Output]:
        return [DeadLetter(reason, detail, self.record)]

    def misrouted(self, what: str, partition: int) -> list[Output] | None:
        """A dead letter for a platform record that names another partition than the one it is in."""
        if partition == self.record.partition:
            return None
        return self.dead_letter(f"misrouted_{what}", f"{what.replace('_', ' ')} for partition {partition} found in "
                                                     f"partition {self.record.partition}")


def process(
    record: SourceRecord,
    store: MutableMapping[str, Any],
    seen_events: MutableMapping[str, SeenEvent],
    rules: Rulebooks,
    committed_offset: int = -1,
) -> list[Output]:
    """The outputs of one record. `store` holds customer states and the partition's timers and
    segments; `seen_events` the event ids accepted; see `Fold` for `committed_offset`."""
    return _handle(decode_event(record.value), Fold(record, store, seen_events, rules, committed_offset))


@singledispatch
def _handle(event: Envelope, fold: Fold) -> list[Output]:
    """A catalog event."""
    return _event(event, fold)


@_handle.register
def _undecodable(error: DecodeError, fold: Fold) -> list[Output]:
    return fold.dead_letter(error.reason, error.detail)


@_handle.register
def _attributed(record: AliasEventAttributed, fold: Fold) -> list[Output]:
    """An event that came with only an alias, now in its customer's partition."""
    inner = decode_catalog_event(record.event)
    if isinstance(inner, DecodeError):
        return fold.dead_letter(inner.reason, f"attributed event: {inner.detail}")
    event = inner.model_copy(update={"customer_id": record.customer_id})
    state = load_customer(fold.store, record.customer_id)
    if state is not None and record.alias_key in state.unlinked_aliases and state.last_offset < fold.record.offset:
        # The customer was erased, and the alias's partition still holds the link (docs/privacy.md).
        return fold.dead_letter("alias_unlinked", f"{record.alias_key} was unlinked from customer "
                                                  f"{record.customer_id} by an erasure; the event stays with the "
                                                  f"alias in crm.events")
    return _event(event, fold, str(record.event_id), record.alias_key)


def _event(event: Envelope, fold: Fold, record_id: str | None = None, attributed_from: str = "") -> list[Output]:
    """A customer event; `record_id` is the id of the record that carried it, when that is not the event."""
    record = fold.record
    if event.received_at is None:
        # Producers that write straight to Kafka: the broker's timestamp is the receipt time, if
        # the projections can store it (a producer sets the timestamp it likes).
        if not EARLIEST_MS <= record.timestamp_ms <= LATEST_MS:
            return fold.dead_letter("schema_invalid", f"received_at: missing, and the record timestamp "
                                                      f"{record.timestamp_ms} ms is outside the event times the "
                                                      f"platform stores")
        event = event.model_copy(update={"received_at": datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)})
    key = event.customer_key
    if record.key != key.encode():
        # Per-customer order and the offset guard both need every event of a customer in one partition.
        return fold.dead_letter("wrong_key", f"record key {record.key!r} is not the event's customer key {key!r}")

    event_id = record_id or str(event.event_id)
    content = fingerprint(event)
    seen = fold.seen.get(event_id)
    state = load_customer(fold.store, key)
    already_applied = state is not None and state.last_offset >= record.offset

    if seen is not None and (seen.partition, seen.offset) != (record.partition, record.offset):
        if seen.fingerprint != content:
            return fold.dead_letter(
                "conflicting_duplicate",
                f"event_id {event_id} was accepted before (partition {seen.partition}, offset {seen.offset}) "
                "with different content")
        return [Duplicate(event_id, record)]

    if already_applied:
        # Redelivered record (this offset or an earlier one was applied). Make sure the marker exists,
        # and send the outputs again in case the crash lost them.
        if seen is None:
            fold.seen[event_id] = SeenEvent(content, record.partition, record.offset)
        resent = _resend(state, record.offset)  # type: ignore[arg-type]
        forwarded = any(isinstance(output, Forward) for output in resent)
        return resent if forwarded else [Accepted(event, record, attributed_from), *resent]

    anonymous = event.customer_id is None
    if anonymous and state is not None and state.linked_to:
        # The alias belongs to a customer now: the event is theirs, applied in their partition.
        return _forward_to_customer(state, event, fold, content)

    if erasure.is_request(event):
        return _erase(state, event, fold, event_id, content, attributed_from)

    segments, rules = fold.segments, fold.rules
    if state is None:
        segments.enrol(key)
        state = CustomerState.new(key)
    elif state.erased:
        # The customer came back after an erasure: a new customer (docs/privacy.md).
        state = erasure.new_life(state)
    erasure.note_keys(state, event)
    aliases_before = state.profile.aliases
    alerts = _churn_until(state, to_ms(event.occurred_at), fold) if not anonymous else []
    profile, changes = profile_after_event(state.profile, event, record.offset, rules, segments.boundaries)
    if anonymous:
        # Points belong to members: an alias's purchases earn once attributed to the customer.
        loyalty: list[ledger.LoyaltyOutput] = []
        size = len(record.value)  # type: ignore[arg-type]  # decoded, so not a tombstone
        if len(state.held) < HELD_LIMIT and state.held_bytes + size <= HELD_BYTES:
            state.held.append([record.offset, to_json_dict(event)])
            state.held_bytes += size
    else:
        state.account, loyalty = ledger.apply(state.account, event, rules.loyalty)
    state.profile = _with_loyalty(profile, state.account)
    if not anonymous:
        # Aliases are not members: churn is scored and alerted for customers only.
        state.profile, alerted = churn.after_event(state.profile, state.churn, state.account, segments.churn_model,
                                                   rules.churn, event)
        alerts += alerted
    state.last_offset = record.offset
    outputs = [*_segment_outputs(key, changes), *_loyalty_outputs(key, loyalty), *_alert_outputs(key, alerts)]
    if not anonymous:
        outputs += [_link(alias, key, event) for alias in state.profile.aliases if alias not in aliases_before]
        if state.unlinked_aliases:
            # The customer's own events show the alias again: it is theirs again.
            state.unlinked_aliases = tuple(a for a in state.unlinked_aliases if a not in state.profile.aliases)
    _save(fold, state, outputs)
    fold.seen[event_id] = SeenEvent(content, record.partition, record.offset)
    return [Accepted(event, record, attributed_from), ProfileChanged(state.profile), *outputs]


def _erase(state: CustomerState | None, event: Envelope, fold: Fold, event_id: str, content: str,
           attributed_from: str) -> list[Output]:
    """A `customer_erasure_requested` event: the customer's data keys shredded, personal traces
    wiped, aliases unlinked, points forfeited, open alerts closed, and a `customer_erased` record
    (streams/erasure.py, docs/privacy.md)."""
    record, rules = fold.record, fold.rules
    key = event.customer_key
    at = to_ms(event.occurred_at)
    fold.seen[event_id] = SeenEvent(content, record.partition, record.offset)
    if state is None:
        # Nobody known here: nothing to shred, but the request is answered in crm.erasures.
        return [Accepted(event, record, attributed_from), erasure.record(key, event, [], [], 0, [])]
    anonymous = state.profile.customer_id is None
    outputs: list[Output] = []
    alert_ids: list[str] = []
    points = 0
    aliases, elsewhere = erasure.unlink(state, record.partition, lambda alias: load_customer(fold.store, alias),
                                        lambda alias_state: _save(fold, alias_state, [], alias_state.due_ms))
    if not state.erased:
        alerts = _churn_until(state, at, fold) if not anonymous else []
        profile, passed = profile_until(state.profile, at, rules, fold.segments.boundaries)
        cause = Cause(type="event", event_id=str(event.event_id), event_type=event.type)
        closing = erasure.close_alerts(profile, state.churn, rules.churn, at, cause)
        alert_ids = [change["alert_id"] for change in closing]
        loyalty: list[ledger.LoyaltyOutput] = []
        if not anonymous or state.account.last_balance is not None:
            state.account, loyalty, points = ledger.forfeit(state.account, event, rules.loyalty)
        state.profile = erasure.wipe(profile, at, record.offset)
        outputs += [*_segment_outputs(key, passed), *_loyalty_outputs(key, loyalty),
                    *_alert_outputs(key, alerts + closing)]
        state.churn = ChurnState(opened_count=state.churn.opened_count)
    else:
        state.profile = profiles.evolve(state.profile, version=state.profile.version + 1, last_offset=record.offset)
    if state.profile.customer_id is not None:
        outputs += [_unlink(alias, state.profile.customer_id, event) for alias in elsewhere]
    shredded = list(state.data_keys)
    outputs += [KeyShredded(key, key_id) for key_id in shredded]
    outputs.append(erasure.record(key, event, shredded, aliases, points, alert_ids))
    state.data_keys = ()
    state.unlinked_aliases = tuple(sorted({*state.unlinked_aliases, *elsewhere}))
    state.held, state.held_bytes = [], 0
    state.last_offset = record.offset
    _save(fold, state, outputs, None)
    return [Accepted(event, record, attributed_from), ProfileChanged(state.profile), *outputs]


def _churn_until(state: CustomerState, event_ms: int, fold: Fold) -> list[dict[str, Any]]:
    """The alert changes that time made before an event, when a deadline passed since the customer's
    last tick or event: an alert may open before the event (dated when it did) that the event then
    resolves. The clock ticks usually got there first."""
    if state.due_ms is None or state.due_ms > event_ms or state.profile.first_seen_ms is None:
        return []
    segments = fold.segments
    waited, _ = profile_until(state.profile, event_ms, fold.rules, segments.boundaries)
    _, alerts = churn.after_time(waited, state.churn, state.account, segments.churn_model, fold.rules.churn,
                                 state.profile.clock_ms)
    return alerts


def _link(alias_key: str, customer_id: str, event: Envelope) -> Forward:
    link = AliasLinked(event_id=derived_id("link", alias_key, customer_id, str(event.event_id)),
                       occurred_at=event.occurred_at, alias_key=alias_key, customer_id=customer_id,
                       cause_event_id=event.event_id)
    return Forward(alias_key, link.model_dump(mode="json"))


def _unlink(alias_key: str, customer_id: str, request: Envelope) -> Forward:
    unlink = AliasUnlinked(event_id=derived_id("unlink", alias_key, customer_id, str(request.event_id)),
                           occurred_at=request.occurred_at, alias_key=alias_key, customer_id=customer_id,
                           cause_event_id=request.event_id)
    return Forward(alias_key, unlink.model_dump(mode="json"))


def _attribution(alias_key: str, customer_id: str, event: dict[str, Any]) -> Forward:
    record = AliasEventAttributed(event_id=derived_id("attributed", event["event_id"], customer_id),
                                  alias_key=alias_key, customer_id=customer_id, event=event)
    return Forward(customer_id, record.model_dump(mode="json"))


def _forward_to_customer(state: CustomerState, event: Envelope, fold: Fold, content: str) -> list[Output]:
    outputs: list[Output] = [_attribution(state.account.customer_key, state.linked_to, to_json_dict(event))]  # type: ignore[arg-type]
    state.last_offset = fold.record.offset
    _save(fold, state, outputs)
    fold.seen[str(event.event_id)] = SeenEvent(content, fold.record.partition, fold.record.offset)
    return outputs


@_handle.register
def _alias_linked(link: AliasLinked, fold: Fold) -> list[Output]:
    """The alias's partition learns whose alias it is: the events it held go to that customer, and
    the profile kept under the alias is marked merged into theirs."""
    key, record = link.alias_key, fold.record
    if record.key != key.encode():
        return fold.dead_letter("wrong_key", f"record key {record.key!r} is not the alias key {key!r}")
    state = load_customer(fold.store, key) or CustomerState.new(key)
    if state.last_offset >= record.offset:
        return _resend(state, record.offset)
    outputs: list[Output] = []
    if state.linked_to != link.customer_id:
        # A later link to someone else takes the alias's later events; attributed ones stay where they went.
        outputs = [_attribution(key, link.customer_id, event) for _, event in state.held]
        state.held, state.held_bytes = [], 0
        state.linked_to = link.customer_id
        if state.profile.first_seen_ms is not None and not state.profile.merged_into:
            state.profile = profiles.evolve(state.profile, merged_into=link.customer_id, version=state.profile.version + 1)
            outputs.insert(0, ProfileChanged(state.profile))
    state.last_offset = record.offset
    _save(fold, state, outputs)
    return outputs


@_handle.register
def _alias_unlinked(unlink: AliasUnlinked, fold: Fold) -> list[Output]:
    """The customer the alias was linked to was erased in another partition: the alias forgets the
    link (if it still names that customer), so its later events stay with it as before any link,
    as erasure.unlink does for an alias in the customer's own partition."""
    key, record = unlink.alias_key, fold.record
    if record.key != key.encode():
        return fold.dead_letter("wrong_key", f"record key {record.key!r} is not the alias key {key!r}")
    state = load_customer(fold.store, key)
    if state is None:
        return []
    if state.last_offset >= record.offset:
        return _resend(state, record.offset)
    if state.linked_to == unlink.customer_id:
        state.linked_to = None
    state.last_offset = record.offset
    _save(fold, state, [], state.due_ms)
    return []


@_handle.register
def _tick(tick: ClockTick, fold: Fold) -> list[Output]:
    """Time passes in the partition: every customer with something due by the tick's time (and the
    next share of the directory, while new boundaries or a new churn model are carried through it)
    is brought up to it."""
    misrouted = fold.misrouted("tick", tick.partition)
    if misrouted:
        return misrouted
    record, timers = fold.record, fold.timers
    now = to_ms(tick.occurred_at)
    if now <= timers.clock_ms:
        # Applied before (or an older tick from a second clock): re-send what it changed, if known.
        resent: list[Output] = []
        for customer_key in timers.swept_at(record.offset):
            state = load_customer(fold.store, customer_key)
            if state is not None:
                resent.extend(_resend(state, record.offset))
        return resent

    outputs: list[Output] = []
    changed: list[str] = []
    due_keys, chunk_keys = timers.due(now)
    customer_keys = list(dict.fromkeys([*due_keys, *fold.segments.sweep_batch(record.offset)]))
    for customer_key in customer_keys:
        state = load_customer(fold.store, customer_key)
        if state is None or state.linked_to or state.erased:
            continue
        customer_outputs = _wake(state, now, fold)
        if customer_outputs is not None:
            changed.append(customer_key)
            outputs.extend(customer_outputs)
    timers.clock_ms = now
    timers.record_sweep(record.offset, changed, fold.committed_offset)
    timers.forget(now, chunk_keys)
    return outputs


def _wake(state: CustomerState, now: int, fold: Fold) -> list[Output] | None:
    """One customer brought up to the tick's time: its outputs, or None when the tick changed nothing."""
    rules, record = fold.rules, fold.record
    boundaries, model = fold.segments.boundaries, fold.segments.churn_model
    customer_key = state.account.customer_key
    account, loyalty = ledger.advance(state.account, now, rules.loyalty)
    profile, passed = profile_until(state.profile, now, rules, boundaries)
    if boundaries is not None:
        profile, rescored = membership.rescore(profile, rules.segments, boundaries)
        passed += rescored
    profile = _with_loyalty(profile, account)
    alerts: list[dict[str, Any]] = []
    # The churn fold changes its state in place; a customer the tick leaves unchanged keeps its own.
    churn_state = state.churn.copy()
    if profile.customer_id is not None:
        profile, alerts = churn.after_time(profile, churn_state, account, model, rules.churn, state.profile.clock_ms)
    news = profile.figures() != state.profile.figures()
    # A churn deadline may pass with nothing to show (a window moved, no indicator turned); the
    # customer is still saved then, to list the next one.
    due = _next_due(churn_state, profile, account, rules, boundaries, model)
    if not (loyalty or news or alerts or due != state.due_ms):
        # Nothing due after all (a stale listing), or applied before a crash lost the rest of
        # this tick's writes: then its outputs are in the outbox, to be sent again.
        return _resend(state, record.offset) if state.touched_at(record.offset) else None
    state.account, state.profile, state.churn = account, profile, churn_state
    outputs = (_segment_outputs(customer_key, passed) + _loyalty_outputs(customer_key, loyalty)
               + _alert_outputs(customer_key, alerts))
    if news:
        # A new version only when a figure changed, not for the clock alone.
        state.profile = profiles.evolve(profile, version=profile.version + 1)
        outputs.insert(0, ProfileChanged(state.profile))
    _save(fold, state, outputs, due)
    return outputs


@_handle.register
def _boundaries(boundaries: SegmentBoundaries, fold: Fold) -> list[Output]:
    misrouted = fold.misrouted("boundaries", boundaries.partition)
    if misrouted:
        return misrouted
    if fold.segments.boundaries_id != boundaries.boundaries_id:
        fold.segments.publish(boundaries)
    # Sent again on redelivery: the row is keyed by the boundaries id.
    return [BoundariesApplied(boundaries.boundaries_id,
                              {"entry": "boundaries", **boundaries.model_dump(mode="json", exclude={"partition"})})]


@_handle.register
def _churn_model(model: ChurnModelPublished, fold: Fold) -> list[Output]:
    misrouted = fold.misrouted("churn_model", model.partition)
    if misrouted:
        return misrouted
    current = fold.segments.churn_model
    if current is None or current.model_id != model.model_id:
        fold.segments.put_churn_model(model)
    # Sent again on redelivery: the row is keyed by the model id.
    return [ChurnModelApplied(model.model_id, model.model_dump(mode="json", exclude={"partition"}))]


def profile_after_event(profile: CustomerProfile, event: Envelope, offset: int, rules: Rulebooks,
                        boundaries: SegmentBoundaries | None = None) -> tuple[CustomerProfile, list[membership.SegmentChange]]:
    """Time first (what the gap before this event did to the segments), then the event itself."""
    profile, passed = profile_until(profile, to_ms(event.occurred_at), rules, boundaries)
    zone = rules.segments.at_ms(to_ms(event.occurred_at)).zone
    profile = profiles.fold_profile(profile, event, offset, zone)
    profile, entered = membership.settle(profile, rules.segments, boundaries, str(event.event_id))
    return profile, passed + entered


def profile_until(profile: CustomerProfile, until_ms: int, rules: Rulebooks,
                  boundaries: SegmentBoundaries | None = None) -> tuple[CustomerProfile, list[membership.SegmentChange]]:
    """Time passes with no event from the customer, up to `until_ms`."""
    return membership.advance(profile, until_ms, rules.segments, boundaries)


def _with_loyalty(profile: CustomerProfile, account: ledger.Account) -> CustomerProfile:
    return profiles.with_loyalty(profile, account.available, account.pending, account.tier)


def _next_due(churn_state: Any, profile: CustomerProfile, account: ledger.Account, rules: Rulebooks,
              boundaries: SegmentBoundaries | None, model: ChurnModelPublished | None) -> int | None:
    deadlines = [ledger.next_due_ms(account, rules.loyalty),
                 membership.next_due_ms(profile, rules.segments, boundaries)]
    if profile.customer_id is not None:
        deadlines.append(churn.next_due_ms(profile, churn_state, account, model, rules.churn))
    return min((d for d in deadlines if d is not None), default=None)


class _Unknown:
    """`_save`'s deadline when the caller has not computed it."""


def _save(fold: Fold, state: CustomerState, outputs: list[Output], due: int | None | type[_Unknown] = _Unknown) -> None:
    """Write the customer's state, listing its next deadline in the timers first: if a crash loses
    the tail of the changelog, it loses the state write (and the record is applied again) rather
    than leaving a state whose deadline nobody will wake. `due` is that deadline when the caller
    has just computed it."""
    if due is _Unknown:
        # A profile merged into a customer's stays as it was at the link: time no longer moves it.
        # An erased one stands still until the customer comes back (docs/privacy.md).
        due = None if state.linked_to or state.erased else _next_due(
            state.churn, state.profile, state.account, fold.rules, fold.segments.boundaries, fold.segments.churn_model)
    if due is not None and due != state.due_ms:
        fold.timers.add(state.account.customer_key, due)
    state.due_ms = due
    state.keep_outputs(fold.record.offset, [o.data for o in outputs if isinstance(o, OUTBOX)], fold.committed_offset)
    fold.store[customer_store_key(state.account.customer_key)] = state


def _segment_outputs(customer_key: str, changes: list[membership.SegmentChange]) -> list[Output]:
    return [SegmentChanged(customer_key, change.to_dict()) for change in changes]


def _alert_outputs(customer_key: str, changes: list[dict[str, Any]]) -> list[Output]:
    return [AlertChanged(customer_key, change) for change in changes]


def _loyalty_outputs(customer_key: str, loyalty: list[ledger.LoyaltyOutput]) -> list[Output]:
    outputs: list[Output] = []
    for item in loyalty:
        if isinstance(item, ledger.Balance):
            outputs.append(BalanceChanged(customer_key, item.to_dict()))
        else:
            entry = "movement" if isinstance(item, ledger.Movement) else "tier_changed"
            outputs.append(LedgerEntry(customer_key, {"entry": entry, **item.to_dict()}))
    return outputs


def _resend(state: CustomerState, offset: int) -> list[Output]:
    key = state.account.customer_key
    outputs: list[Output] = [ProfileChanged(state.profile)] if state.profile.first_seen_ms is not None else []
    for data in state.outputs_at(offset):
        if data.get("type") == "alert_change":
            outputs.append(AlertChanged(key, data))
        elif data.get("type") == "customer_erased":
            outputs.append(Erased(key, data))
        elif data["entry"] == "segment_changed":
            outputs.append(SegmentChanged(key, data))
        elif data["entry"] == "forward":
            outputs.append(Forward(data["key"], data["record"]))
        elif data["entry"] == "key_shredded":
            outputs.append(KeyShredded(key, data["key_id"]))
        else:
            outputs.append(LedgerEntry(key, data))
    if state.account.last_balance is not None:
        outputs.append(BalanceChanged(key, state.account.last_balance))
    return outputs
