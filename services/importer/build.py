"""Rows to catalog events, one kind of file at a time.

    customers  one row per customer: customer_registered, and consent_changed per consent column
    orders     one row per line item: the rows of an order id become one purchase_completed
    refunds    one row per refund or per refunded line: the rows of a refund id become one purchase_refunded
    points     one row per customer: the balance as points_adjusted (an opening balance)
    [[events]] one row per event of any other catalog type, payload fields from columns

Invariants:
- every row read ends up in exactly one event or as exactly one reject; a row that gives several
  events (a customer and their consents) gives all or none, and an order or refund spread over rows
  is sent whole or rejected whole (its other rows as `order_rejected` / `refund_rejected`);
- an event's id is uuid5(the import's namespace, "<kind>:<natural key>") and its content depends on
  its rows and the mapping only (never on a clock), so another run sends the same bytes; a natural
  key already sent by this import rejects the later row as `duplicate_key`;
- every event is planned as exactly the JSON that passed the catalog's model as producers submit it
  (`submitted_model`: personal fields plain), keyed by the customer key that model gives it, in the
  stream of the partition Kafka's default partitioner gives that key; its personal fields are sealed
  when it is sent (send.py), so plain values never leave the importer's memory and its reject report;
- e-mails and phones become their keyed hashes (HMAC under the identity secret), as at the API."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
from kafka.partitioner.default import murmur2

from pydantic import ValidationError

from schemas.codec import MAX_EVENT_BYTES, DecodeError, _describe, out_of_time
from schemas.envelope import AliasType, Envelope
from schemas.events import EVENT_TYPES, personal_payload_fields, submitted_model
from services.importer.mapping import (
    ADDRESS_FIELDS, CONSENT_FIELDS, IDENTITY, Columns, EventsSpec, Mapping, SourceFile, columns_of, key_columns,
)
from services.importer.readers import Record
from services.importer.values import RowError, empty
# The ingestion API's own normalisation of e-mails and phones, so that imported identity hashes equal live ones.
from services.ingest.hygiene import _email, _phone, identity_hash

# Every import's event ids live under this namespace, each import under its own id within it.
IMPORT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:crm-platform:import")
# Within one customer and one moment: the registration first, the balance last.
RANKS = {"customers": 0, "consent": 1, "orders": 2, "refunds": 3, "events": 4, "points": 5}
ZERO = Decimal("0.00")
# What the rows of one order (refund) must agree on: it belongs to the whole order.
ORDER_FIELDS = ("customer_id", "loyalty_card", "app_user_id", "occurred_at", "currency", "store_id", "channel",
                "payment_method", "order_discount")
REFUND_FIELDS = ("customer_id", "loyalty_card", "app_user_id", "occurred_at", "order_id", "currency", "full", "reason",
                 "store_id", "channel")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def import_namespace(import_id: str) -> uuid.UUID:
    return uuid.uuid5(IMPORT_NAMESPACE, import_id)


def event_id(namespace: bytes, name: str) -> str:
    """str(uuid.uuid5(UUID(bytes=namespace), name)), without building UUID objects: a third of the time."""
    digest = bytearray(hashlib.sha1(namespace + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (kafka-python's, aiokafka's, the Java client's)
    gives a record with this key: murmur2 of the key, positive, modulo the partition count."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def customer_key(customer_id: str | None, identifiers: dict[str, str]) -> str:
    """The key Envelope.customer_key gives an event with these ids: customer_id, else the first alias."""
    if customer_id:
        return customer_id
    alias = next(alias for alias in AliasType if identifiers.get(alias.value))
    return f"{alias.value}:{identifiers[alias.value]}"


@dataclass
class Tally:
    """What became of one file's rows: how many were read, rejected, and the events made by type."""
    source: SourceFile
    rows: int = 0
    rejected: int = 0
    events: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.rows += other.rows
        self.rejected += other.rejected
        self.events.update(other.events)


@dataclass(eq=False)
class Sheet:
    """One file as the builder reads it: where each catalog field's cells are in a record, the
    defaults, and the tally of its rows."""
    source: SourceFile
    single: list[tuple[str, int]]               # field, position of its one column
    joined: list[tuple[str, tuple[int, ...]]]   # field, positions of its columns (joined by a space)
    defaults: dict[str, Any]
    tally: Tally
    group: int | None = None  # position of the order or refund id, for orders and refunds

    @classmethod
    def columns_for(cls, source: SourceFile) -> list[str]:
        """The file columns a sheet of `source` reads, in the order its reader is asked for them."""
        return columns_of(_named(source))

    @classmethod
    def of(cls, source: SourceFile, positions: list[int]) -> Sheet:
        """The sheet of `source`, whose reader has the i-th column of `columns_for` at `positions[i]`."""
        named = _named(source)
        columns = columns_of(named)
        at = dict(zip(columns, positions))
        single = [(name, at[value]) for name, value in named.items() if isinstance(value, str)]
        joined = [(name, tuple(at[column] for column in value)) for name, value in named.items()
                  if not isinstance(value, str)]
        defaults = {name: value for name, value in source.spec.defaults.items() if not empty(value)}
        group = dict(single).get({"orders": "order_id", "refunds": "refund_id"}.get(source.kind, ""))
        return cls(source, single, joined, defaults, Tally(source), group)

    def group_of(self, record: Record) -> str | None:
        """The order or refund id of a row, as its values will have it, without reading the rest."""
        return None if self.group is None else self.source.formats.text(record[self.group])

    def values(self, record: Record) -> dict[str, Any]:
        """Field -> value of one row: text stripped, empty cells left out (their default, if any, in
        their place). CSV cells are all text, which the first branch takes the short way."""
        if self.source.format == "csv":
            found = {name: text for name, position in self.single if (text := record[position].strip())}
        else:
            found = {}
            for name, position in self.single:  # values.empty, inline: its call per cell was a third of this
                cell = record[position]
                if cell is None:
                    continue
                if type(cell) is str:
                    cell = cell.strip()
                    if not cell:
                        continue
                elif isinstance(cell, float) and cell != cell:  # NaN
                    continue
                found[name] = cell
        text_of = self.source.formats.text
        for name, positions in self.joined:
            if text := " ".join(part for position in positions if (part := text_of(record[position]))):
                found[name] = text
        return {**self.defaults, **found} if self.defaults else found


def _named(source: SourceFile) -> Columns:
    """Catalog field -> file column(s); [[events]] add `payload.<field>` and `key.<n>`."""
    spec = source.spec
    named: Columns = dict(spec.columns)
    if isinstance(spec, EventsSpec):
        named.update({f"payload.{name}": column for name, column in spec.payload.items()})
        named.update({f"key.{index}": column for index, column in enumerate(key_columns(spec))})
    return named


class Row:
    """One row: its sheet, its line, its values by catalog field name (see Sheet.values), and the
    partition of crm.events its group goes to."""
    __slots__ = ("sheet", "line", "values", "partition")

    def __init__(self, sheet: Sheet, line: int, values: dict[str, Any]):
        self.sheet, self.line, self.values = sheet, line, values
        self.partition = 0

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if value is None or type(value) is str else self.sheet.source.formats.text(value)

    def required(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise RowError("missing_value", f"{name} is empty")
        return value

    def parsed(self, name: str, parse: Callable[[Any, str], Any]) -> Any:
        """The field read by a Format method; None when it is empty."""
        value = self.values.get(name)
        return None if value is None else parse(value, name)

    def needed(self, name: str, parse: Callable[[Any, str], Any]) -> Any:
        """The field read by a Format method; a `missing_value` RowError when it is empty."""
        value = self.values.get(name)
        if value is None:
            raise RowError("missing_value", f"{name} is empty")
        return parse(value, name)


@dataclass(frozen=True, slots=True)
class Reject:
    source: SourceFile
    line: int
    reason: str
    detail: str
    customer_key: str


class Planned(NamedTuple):
    """An event ready to send: where it sorts (sort_key), its Kafka key and value; plain bytes, as
    compact as an event can wait in memory. `personal`: it holds personal values, which send.py seals
    before Kafka sees them."""
    order: bytes
    key: bytes
    value: bytes
    personal: bool = False


def validate(body: dict[str, Any]) -> Envelope | DecodeError:
    """The event as producers submit it (personal fields plain), or why the catalog refuses it: the
    checks of schemas.codec.decode_catalog_event on the submitted form."""
    type_name = body.get("type")
    if type_name not in EVENT_TYPES:
        return DecodeError("unknown_type", f"type {type_name!r} is not in the event catalog")
    version = body.get("schema_version", 1)
    model = submitted_model(type_name, version) if isinstance(version, int) else None
    if model is None:
        return DecodeError("unsupported_schema_version", f"{type_name} has no schema_version {version!r}")
    try:
        event = model.model_validate(body)
    except ValidationError as exc:
        return DecodeError("schema_invalid", _describe(exc))
    return out_of_time(event) or event


def sort_key(customer: str, occurred_at: datetime, rank: int, kind: str, natural_key: str) -> bytes:
    """Bytes that sort as (customer key, event time, rank of the kind, kind, natural key) do: UTF-8
    keeps the order of text, a 0 byte ends each text (a key sorts before a longer one it begins), and
    the time is in microseconds, offset to be positive, big-endian. No two events share kind and
    natural key, so the order is total."""
    micros = (occurred_at - _EPOCH) // _MICROSECOND + 2**63
    return b"".join((customer.encode(), b"\0", micros.to_bytes(8, "big"), bytes((rank,)), kind.encode(), b"\0",
                     natural_key.encode()))


@dataclass(frozen=True, slots=True)
class Draft:
    kind: str
    natural_key: str
    body: dict[str, Any]


class LineErrors(Exception):
    """Rows of one order or refund that cannot be read, each with its own error."""

    def __init__(self, errors: dict[Row, RowError]):
        super().__init__(f"{len(errors)} rows")
        self.errors = errors


class Builder:
    """Collects rows file by file, and turns them into Planned events and Rejects (see the module's
    invariants). Orders and refunds are grouped across all their files, so they are built in `finish`.

    A builder takes only the rows of its `owned` partitions (of `partitions` of crm.events): those of
    groups (an order, a refund, a customer, an [[events]] key) whose first row names a customer whose
    key Kafka's default partitioner puts there; a row naming no group or no customer goes to
    partition 0 (it will be rejected there). Every row that can meet another lands in one builder,
    so builders of disjoint partitions together make exactly what one builder of all makes."""

    def __init__(self, mapping: Mapping, phone_region: str, partitions: int, owned: frozenset[int],
                 identity_secret: bytes):
        self.mapping = mapping
        self.phone_region = phone_region
        self.identity_secret = identity_secret
        self.partitions, self.owned = partitions, owned
        self.namespace = import_namespace(mapping.import_id).bytes
        self.marker = f"import:{mapping.import_id}"
        self.streams: dict[int, list[Planned]] = {partition: [] for partition in owned}
        self.rejects: list[Reject] = []
        self._placed: dict[tuple[str, str], int] = {}  # (kind, order/refund/event key) -> partition
        self._partitions: dict[str, int] = {}  # customer key -> its partition (murmur2 is slow Python)
        self._sent_keys: dict[str, tuple[str, int]] = {}  # kind:natural key -> file and line it came from
        self._sources: dict[tuple[str | None, str | None, str], dict[str, Any]] = {}
        self._groups: dict[str, dict[str, list[Row]]] = {"orders": {}, "refunds": {}}

    # --- entry points ---

    def add(self, sheet: Sheet, line: int, record: Record | str) -> None:
        """One row of `sheet`: built now (customers, points, events), or kept for its group; or
        left alone if it belongs to a partition this builder does not own."""
        if not isinstance(record, str) and (group := sheet.group_of(record)) is not None:
            placed = self._placed.get((sheet.source.kind, group))
            if placed is not None and placed not in self.owned:
                return  # a later line of another builder's order: not even read
        row = Row(sheet, line, {} if isinstance(record, str) else sheet.values(record))
        row.partition = self._partition(row)
        if row.partition not in self.owned:
            return
        sheet.tally.rows += 1
        if isinstance(record, str):
            self._reject(row, RowError("malformed_row", record))
            return
        kind = sheet.source.kind
        try:
            if kind in self._groups:
                group = "order_id" if kind == "orders" else "refund_id"
                self._groups[kind].setdefault(row.required(group), []).append(row)
            elif kind == "customers":
                self._emit([row], self._customer(row))
            elif kind == "points":
                self._emit([row], [self._balance(row)])
            else:
                self._emit([row], [self._event(row)])
        except RowError as error:
            self._reject(row, error)

    def finish(self) -> None:
        for order_id, rows in self._groups["orders"].items():
            self._emit_group(rows, lambda: self._purchase(order_id, rows), "order_rejected")
        for refund_id, rows in self._groups["refunds"].items():
            self._emit_group(rows, lambda: self._refund(refund_id, rows), "refund_rejected")
        self._groups = {"orders": {}, "refunds": {}}

    def _partition(self, row: Row) -> int:
        """The partition of the row's group: where the customer of the group's first row is (for a
        customer's or a balance's row, its own customer)."""
        kind = row.sheet.source.kind
        try:
            if kind in ("customers", "points"):
                return self._partition_of(customer_key(*self._identity(row)))
            if kind in self._groups:
                group = row.required("order_id" if kind == "orders" else "refund_id")
            else:
                group = self._natural_key(row)
        except RowError:
            return 0
        placed = self._placed.get((kind, group))
        if placed is None:
            try:
                placed = self._partition_of(customer_key(*self._identity(row)))
            except RowError:
                placed = 0
            self._placed[(kind, group)] = placed
        return placed

    def _partition_of(self, customer: str) -> int:
        found = self._partitions.get(customer)
        if found is None:
            found = self._partitions[customer] = partition_of(customer.encode(), self.partitions)
        return found

    # --- what all events share ---

    def _identity(self, row: Row) -> tuple[str | None, dict[str, str]]:
        customer_id = row.text("customer_id")
        identifiers = {name: value for name in IDENTITY[1:] if (value := row.text(name))}
        if customer_id is None and not identifiers:
            raise RowError("missing_customer", f"none of {', '.join(IDENTITY)} is given")
        return customer_id, identifiers

    def _moment(self, row: Row, name: str) -> datetime:
        moment = row.needed(name, row.sheet.source.formats.moment)
        if moment > self.mapping.as_of:
            raise RowError("after_as_of", f"{name}: {moment.isoformat()} is after the export's as_of, "
                                          f"{self.mapping.as_of.isoformat()}")
        return moment

    def _currency(self, row: Row) -> str:
        currency = (row.text("currency") or self.mapping.options.currency).upper()
        if currency not in self.mapping.currencies:
            raise RowError("unknown_currency", f"currency {currency!r} is not one of the import's "
                                               f"{', '.join(sorted(self.mapping.currencies))}")
        return currency

    def _source(self, row: Row) -> dict[str, Any]:
        """The event's source: its channel and store, the import as its terminal, the file's zone.
        Shared between events (nothing changes it), one per channel, store and zone."""
        channel, store, zone = row.text("channel"), row.text("store_id"), row.sheet.source.formats.timezone
        found = self._sources.get((channel, store, zone))
        if found is None:
            found = {"channel": (channel or self.mapping.options.channel.value).lower(), "terminal_id": self.marker,
                     "timezone": zone}
            if store is not None:
                found["store_id"] = store
            self._sources[(channel, store, zone)] = found
        return found

    def _body(self, type_name: str, row: Row, ids: tuple[str | None, dict[str, str]], at: datetime,
              payload: dict[str, Any]) -> dict[str, Any]:
        customer_id, identifiers = ids
        body: dict[str, Any] = {"type": type_name, "schema_version": 1, "occurred_at": at.isoformat(),
                                "source": self._source(row), "payload": payload}
        if customer_id is not None:
            body["customer_id"] = customer_id
        if identifiers:
            body["identifiers"] = identifiers
        return body

    # --- one kind each ---

    def _customer(self, row: Row) -> list[Draft]:
        customer_id, identifiers = self._identity(row)
        at = self._moment(row, "registered_at")
        formats = row.sheet.source.formats
        payload: dict[str, Any] = {name: value for name in ("name", "preferred_store_id", "locale")
                                   if (value := row.text(name)) is not None}
        for name, normalise in (("email", _email), ("phone", lambda text: _phone(text, self.phone_region))):
            written = row.text(name)
            if written is None:
                continue
            normal = normalise(written)
            if normal is None:
                # The value stays out of the detail: details go to the dead-letter topic (send.py).
                raise RowError(f"invalid_{name}", f"{name}: not a valid {name}")
            payload[name] = normal
            identifiers.setdefault(f"{name}_hash", identity_hash(self.identity_secret, normal))
        birthday = row.parsed("birthday", formats.day)
        if birthday is not None:
            payload["birthday"] = birthday.isoformat()
        address = {name.removeprefix("address_"): value for name in ADDRESS_FIELDS if (value := row.text(name))}
        if "country" in address:
            address["country"] = address["country"].upper()
        if address:
            payload["address"] = address
        ids = (customer_id, identifiers)
        key = customer_key(customer_id, identifiers)
        drafts = [Draft("customers", key, self._body("customer_registered", row, ids, at, payload))]
        for name in CONSENT_FIELDS:
            granted = row.parsed(name, formats.boolean)
            if granted is not None:
                channel = name.removeprefix("consent_")
                drafts.append(Draft("consent", f"{key}:{channel}", self._body(
                    "consent_changed", row, ids, at, {"channel": channel, "granted": granted})))
        return drafts

    def _balance(self, row: Row) -> Draft:
        ids = self._identity(row)
        points = row.needed("points", row.sheet.source.formats.integer)
        if points == 0:
            raise RowError("zero_points", "a balance of zero needs no adjustment")
        if points < 0:
            raise RowError("negative_points", f"points: {points} is a negative balance")
        at = self._moment(row, "as_of") if "as_of" in row.values else self.mapping.as_of
        key = customer_key(*ids)
        payload = {"adjustment_id": f"{self.marker}:{key}", "points": points,
                   "reason": row.text("reason") or "opening balance", "operator": self.marker}
        return Draft("points", key, self._body("points_adjusted", row, ids, at, payload))

    def _event(self, row: Row) -> Draft:
        spec = row.sheet.source.spec
        assert isinstance(spec, EventsSpec)
        natural_key = self._natural_key(row)
        ids = self._identity(row)
        at = self._moment(row, "occurred_at")
        payload = {name: _plain(value) for name in spec.payload
                   if (value := row.values.get(f"payload.{name}")) is not None}
        return Draft(spec.name or spec.type, natural_key, self._body(spec.type, row, ids, at, payload))

    @staticmethod
    def _natural_key(row: Row) -> str:
        """An [[events]] row's key: its key columns' values, joined by "|"."""
        spec = row.sheet.source.spec
        assert isinstance(spec, EventsSpec)
        return "|".join(row.required(f"key.{index}") for index in range(len(key_columns(spec))))

    def _purchase(self, order_id: str, rows: list[Row]) -> Draft:
        """The order's rows as one purchase: each row a line, the order's own fields from the first."""
        first = rows[0]
        errors = _disagreements(rows, ORDER_FIELDS, "inconsistent_order")
        lines, discount = [], ZERO
        for row in rows:
            try:
                lines.append(self._line(row))
                discount += row.parsed("discount", row.sheet.source.formats.money) or ZERO
            except RowError as error:
                errors.setdefault(row, error)
        try:
            ids = self._identity(first)
            at = self._moment(first, "occurred_at")
            currency = self._currency(first)
            discount += first.parsed("order_discount", first.sheet.source.formats.money) or ZERO
        except RowError as error:
            errors.setdefault(first, error)
        if errors:
            raise LineErrors(errors)
        payload: dict[str, Any] = {"order_id": order_id, "currency": currency, "lines": lines,
                                   "discount": str(discount)}
        for name in ("store_id", "payment_method"):
            if (value := first.text(name)) is not None:
                payload[name] = value
        return Draft("orders", order_id, self._body("purchase_completed", first, ids, at, payload))

    def _refund(self, refund_id: str, rows: list[Row]) -> Draft:
        """The refund's rows as one refund: the amounts summed, a line per row that names a sku."""
        first = rows[0]
        errors = _disagreements(rows, REFUND_FIELDS, "inconsistent_refund")
        lines, amount = [], ZERO
        for row in rows:
            try:
                amount += row.needed("amount", row.sheet.source.formats.money)
                if row.text("sku") is not None:
                    lines.append(self._line(row))
            except RowError as error:
                errors.setdefault(row, error)
        try:
            ids = self._identity(first)
            at = self._moment(first, "occurred_at")
            payload: dict[str, Any] = {"refund_id": refund_id, "order_id": first.required("order_id"),
                                       "currency": self._currency(first), "amount": str(amount)}
            full = first.parsed("full", first.sheet.source.formats.boolean)
        except RowError as error:
            errors.setdefault(first, error)
        if errors:
            raise LineErrors(errors)
        if full is not None:
            payload["full"] = full
        if lines:
            payload["lines"] = lines
        if (reason := first.text("reason")) is not None:
            payload["reason"] = reason
        return Draft("refunds", refund_id, self._body("purchase_refunded", first, ids, at, payload))

    def _line(self, row: Row) -> dict[str, Any]:
        formats = row.sheet.source.formats
        quantity = row.needed("quantity", formats.integer)
        if quantity < 0:
            raise RowError("negative_quantity", f"quantity: {quantity}")
        if quantity == 0:
            raise RowError("zero_quantity", "quantity: 0")
        unit_price = row.needed("unit_price", formats.money)
        return {"sku": row.required("sku"), "category": row.required("category"), "quantity": quantity,
                "unit_price": str(unit_price)}

    # --- the end of every row: an event or a reject ---

    def _emit(self, rows: list[Row], drafts: list[Draft]) -> None:
        """Validate and encode every draft of these rows; keep all, or reject the rows."""
        planned = []
        for draft in drafts:
            claimed = self._sent_keys.get(f"{draft.kind}:{draft.natural_key}")
            if claimed is not None:
                raise RowError("duplicate_key", f"{draft.kind} {draft.natural_key!r} is also on line "
                                                f"{claimed[1]} of {claimed[0]}")
            body = {"event_id": event_id(self.namespace, f"{draft.kind}:{draft.natural_key}"), **draft.body}
            event = validate(body)
            if isinstance(event, DecodeError):
                raise RowError(event.reason, event.detail)
            # What passed the model; the worker reads these bytes back into it. Copied: orjson's own
            # bytes keep a 4 KiB buffer, seven times an event, for as long as the event waits.
            value = memoryview(orjson.dumps(body)).tobytes()
            if len(value) > MAX_EVENT_BYTES:
                raise RowError("too_large", f"the event is {len(value)} bytes, the limit is {MAX_EVENT_BYTES}")
            key = event.customer_key
            if self._partition_of(key) != rows[0].partition:
                raise AssertionError(f"{key!r} is not the customer its group was placed by")
            rank = RANKS.get(draft.kind, RANKS["events"])
            order = sort_key(key, event.occurred_at, rank, draft.kind, draft.natural_key)
            personal = any(payload.get(name) is not None for name in personal_payload_fields(event.type)) \
                if isinstance(payload := body.get("payload"), dict) else False
            planned.append(Planned(order, key.encode(), value, personal))
        for draft in drafts:
            self._sent_keys[f"{draft.kind}:{draft.natural_key}"] = (rows[0].sheet.source.name, rows[0].line)
        self.streams[rows[0].partition].extend(planned)
        rows[0].sheet.tally.events.update(draft.body["type"] for draft in drafts)

    def _emit_group(self, rows: list[Row], draft: Callable[[], Draft], sibling_reason: str) -> None:
        try:
            self._emit(rows, [draft()])
        except LineErrors as failed:
            first_row = next(row for row in rows if row in failed.errors)
            first_error = failed.errors[first_row]
            for row in rows:
                error = failed.errors.get(row) or RowError(
                    sibling_reason, f"line {first_row.line} of {first_row.sheet.source.name}: {first_error}")
                self._reject(row, error)
        except RowError as error:
            for row in rows:
                self._reject(row, error)

    def _reject(self, row: Row, error: RowError) -> None:
        row.sheet.tally.rejected += 1
        try:
            key = customer_key(*self._identity(row))
        except RowError:
            key = ""
        self.rejects.append(Reject(row.sheet.source, row.line, error.reason, error.detail, key))


def _plain(cell: Any) -> Any:
    """A payload cell as JSON carries it: text stripped, dates and timestamps in ISO 8601."""
    if isinstance(cell, str):
        return cell.strip()
    if isinstance(cell, date):
        return cell.isoformat()
    return str(cell) if isinstance(cell, Decimal) else cell


def _disagreements(rows: list[Row], names: tuple[str, ...], reason: str) -> dict[Row, RowError]:
    """The rows of one order (refund) that disagree with its first row on what belongs to the
    whole order, each with the first field it differs in."""
    first = rows[0]
    errors: dict[Row, RowError] = {}
    if len(rows) == 1:
        return errors
    expected = [(name, first.values.get(name)) for name in names]
    for row in rows[1:]:
        for name, value in expected:
            if row.values.get(name) != value:
                errors[row] = RowError(reason, f"{name} is {row.text(name)!r} here and {first.text(name)!r} on line "
                                               f"{first.line}")
                break
    return errors
