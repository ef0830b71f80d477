"""Hypothesis strategies for records of the events topic at the edges of the catalog, read from the
pydantic models themselves (schemas/events.py, schemas/envelope.py and the platform's own records in
schemas/clock.py, boundaries.py, alerts.py, identity.py): every field of every model, at and just
inside its limits (lengths, numeric bounds, digits, event-time range, patterns), odd Unicode (RTL,
zero-width, emoji, NUL, escaped surrogate pairs), optional fields absent, present or null; and the
converse, one field of a valid record pushed just past its limit.

A field added to a model is covered without touching this module; what the walker cannot read from
the field annotations (the models' cross-field validators) is in `_FIXES`.

The unit property test (tests/unit/test_catalog_edges.py) folds what these strategies draw; the
producer fuzz (tests/integration/test_producer_fuzz.py) sends a deterministic sample of them."""

from __future__ import annotations

import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import ROUND_DOWN, Decimal
from enum import Enum
from typing import Any, Literal
from uuid import UUID

import orjson
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel

from schemas.alerts import CHURN_MODEL_TYPE, ChurnModelPublished
from schemas.boundaries import SEGMENT_BOUNDARIES_TYPE, SegmentBoundaries
from schemas.clock import CLOCK_TICK_TYPE, ClockTick
from schemas.codec import MAX_EVENT_BYTES
from schemas.envelope import _ZONES as ZONES, EARLIEST_EVENT_TIME, LATEST_EVENT_TIME, NAME_LENGTH, AliasType, Source
from schemas.events import MAX_AMOUNT, PAYLOADS, PointsAdjusted, PurchaseCompleted, SurveyAnswered, event_model
from schemas.identity import ALIAS_EVENT_ATTRIBUTED_TYPE, ALIAS_LINKED_TYPE, AliasEventAttributed, AliasLinked

# Characters that break naive code: bidi overrides and marks, zero-width joiners and spaces, a byte
# order mark, NUL and other controls, emoji outside the BMP (escaped as surrogate pairs by
# `json.dumps`), a ZWJ sequence, combining marks, CJK, the last code point, quotes and backslashes.
ODD = ["\u202e", "\u200f", "\u200b", "\u200d", "\ufeff", "\x00", "\x01", "\x7f", "😀", "👩‍👩‍👧", "e\u0301",
       "\u0627\u0644", "中", "\U0010ffff", "\"", "\\", "'", "<", "%s", " ", "\t", "\n", "a", "Z", "9", "-"]
# Unbounded strings are drawn up to this length; the whole record stays under MAX_EVENT_BYTES.
LONG = 1000
INT64 = (-(2**63), 2**63 - 1)
# The ints JSON carries as orjson reads it (past them a number becomes a float, which pydantic
# refuses for an int field as too large): an int field without bounds takes any of these.
JSON_INTS = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class Limits:
    """The constraints of one field, gathered from its annotation."""
    min_length: int | None = None
    max_length: int | None = None
    gt: Any = None
    ge: Any = None
    lt: Any = None
    le: Any = None
    pattern: str | None = None
    max_digits: int | None = None
    decimal_places: int | None = None

    def merged(self, metadata: list[Any]) -> Limits:
        """These limits and those in `metadata`; of two bounds on one side, the tighter."""
        values = dict(self.__dict__)
        for item in metadata:
            for name in values:
                found = getattr(item, name, None)
                if found is not None:
                    values[name] = found
        for strict, loose, tighter in (("gt", "ge", max), ("lt", "le", min)):
            if values[strict] is not None and values[loose] is not None:
                keep = strict if tighter(values[strict], values[loose]) == values[strict] else loose
                values[loose if keep == strict else strict] = None
        return Limits(**values)

    @property
    def low(self) -> Any:
        return self.ge if self.ge is not None else self.gt

    @property
    def high(self) -> Any:
        return self.le if self.le is not None else self.lt


@dataclass(frozen=True)
class FieldType:
    """A field's type with its optionality and limits unwrapped."""
    kind: Any
    limits: Limits
    nullable: bool


def unwrap(annotation: Any, metadata: list[Any] = ()) -> FieldType:
    """`Optional[Annotated[X, ...]]` and friends as (X, limits, nullable)."""
    limits, nullable = Limits().merged(list(metadata)), False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            args = typing.get_args(annotation)
            extra = [m for item in args[1:] for m in (getattr(item, "metadata", None) or [item])]
            limits, annotation = limits.merged(extra), args[0]
        elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
            nullable = True
            rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        else:
            return FieldType(annotation, limits, nullable)


# The fields whose time the codec holds to the range the projections store (schemas/codec.py).
EVENT_TIMES = {"occurred_at", "received_at"}


def field_of(name: str, info: Any) -> FieldType:
    """A model field's type and limits, with the event-time range the codec adds."""
    field = unwrap(info.annotation, info.metadata)
    if name in EVENT_TIMES:
        return FieldType(field.kind, Limits(ge=EARLIEST_EVENT_TIME, le=LATEST_EVENT_TIME), field.nullable)
    return field


# --- valid values -----------------------------------------------------------------------------------
# Strategies are built once per field (functools.cache) and only drawn from afterwards: building them
# is most of what drawing costs.

CHUNKS = st.lists(st.sampled_from(ODD), min_size=1, max_size=6).map("".join)
SOLIDS = st.sampled_from([c for c in ODD if not c.isspace() and len(c) == 1])
OFFSETS = st.sampled_from([0, 0, 60, -60, 330, 23 * 60 + 59, -(23 * 60 + 59)]) | st.integers(-1439, 1439)
PRECISIONS = st.sampled_from(["seconds", "milliseconds", "microseconds"])


def edges_or_any(edges: list[Any], anything: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The edges half the time, anything in the range otherwise."""
    return st.sampled_from(sorted(set(edges))) | anything


@functools.cache
def text(limits: Limits, compact: bool = False) -> st.SearchStrategy[str]:
    """Strings of edge length whose ends are not whitespace (the catalog strips whitespace, which
    would shorten them below their minimum), built from odd characters."""
    if limits.pattern:
        return st.from_regex(limits.pattern, fullmatch=True)
    low = limits.min_length or 0
    high = limits.max_length if limits.max_length is not None else LONG
    high = min(high, max(low, 8)) if compact else high
    lengths = edges_or_any([low, min(low + 1, high), max(high - 1, low), high], st.integers(low, high))
    return st.tuples(lengths, CHUNKS, SOLIDS).map(_spell)


def _spell(drawn: tuple[int, str, str]) -> str:
    length, chunk, solid = drawn
    if length <= 1:
        return solid[:length]
    body = (chunk * (length // len(chunk) + 1))[:length]
    return solid + body[1:-1] + solid


def integer(limits: Limits) -> st.SearchStrategy[int]:
    low = limits.ge if limits.ge is not None else (limits.gt + 1 if limits.gt is not None else JSON_INTS[0])
    high = limits.le if limits.le is not None else (limits.lt - 1 if limits.lt is not None else JSON_INTS[1])
    edges = [low, min(low + 1, high), max(high - 1, low), high, *(v for v in (0, 1, -1, *INT64) if low <= v <= high)]
    return edges_or_any(edges, st.integers(low, high))


def floating(limits: Limits) -> st.SearchStrategy[float]:
    low = limits.low if limits.low is not None else -1.7e308
    high = limits.high if limits.high is not None else 1.7e308
    edges = [v for v in (low, high, 5e-324, 1e-300, 1.0, 1e300, 1.7e308) if low <= v <= high and v != limits.gt]
    return edges_or_any(edges, st.floats(low, high, allow_nan=False, allow_infinity=False,
                                         exclude_min=limits.gt is not None))


def money(limits: Limits) -> st.SearchStrategy[str | int | float]:
    """A decimal as text, or as a JSON number where one carries it exactly."""
    places = limits.decimal_places or 0
    step = Decimal(1).scaleb(-places)
    top = Decimal(10) ** ((limits.max_digits or 28) - places) - step
    high = min(top, Decimal(limits.high)) if limits.high is not None else top
    low = Decimal(limits.low) if limits.low is not None else -high
    if limits.gt is not None:
        low += step
    amounts = edges_or_any([low, low + step, high - step, high],
                           st.integers(int(low / step), int(high / step)).map(lambda n: n * step))
    return st.tuples(amounts, st.integers(0, 2)).map(lambda drawn: _spellings(drawn[0], places)[drawn[1]])


def _spellings(value: Decimal, places: int) -> list[str | int | float]:
    """Three ways to write `value`: with its places, normalised (maybe with an exponent), as a
    JSON number where one is exact (else with its places again)."""
    number: str | int | float = f"{value:.{places}f}"
    if value == value.to_integral_value() and abs(value) < 2**53:
        number = int(value)
    elif abs(value) < 10**9:
        number = float(value)
    return [f"{value:.{places}f}", str(value.normalize()), number]


def moment(limits: Limits) -> st.SearchStrategy[str]:
    """Instants in the field's range, written with an offset that keeps each the same instant."""
    low = limits.low or EARLIEST_EVENT_TIME
    high = limits.high or LATEST_EVENT_TIME
    ms = timedelta(milliseconds=1)
    if limits.gt is not None:
        low += ms
    typical = datetime(2026, 3, 1, 10, tzinfo=UTC)
    instants = edges_or_any([low, low + ms, high - ms, high, *([typical] if low <= typical <= high else [])],
                            st.datetimes(low.replace(tzinfo=None), high.replace(tzinfo=None))
                            .map(lambda naive: naive.replace(tzinfo=UTC)))
    return st.tuples(instants, OFFSETS, PRECISIONS, st.booleans()).map(_written)


def _written(drawn: tuple[datetime, int, str, bool]) -> str:
    instant, minutes, precision, zulu = drawn
    written = instant.astimezone(timezone(timedelta(minutes=minutes))).isoformat(timespec=precision)
    return written.replace("+00:00", "Z") if zulu else written


@functools.cache
def value(field: FieldType, compact: bool = False) -> st.SearchStrategy[Any]:
    """Valid JSON values for a field of the catalog."""
    kind, limits = field.kind, field.limits
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        strategy = model_dict(kind, compact)
    elif typing.get_origin(kind) is list:
        strategy = items(unwrap(typing.get_args(kind)[0]), limits, compact)
    elif typing.get_origin(kind) is dict:
        strategy = st.just({})
    elif typing.get_origin(kind) is Literal:
        strategy = st.sampled_from(typing.get_args(kind))
    elif isinstance(kind, type) and issubclass(kind, Enum):
        strategy = st.sampled_from([member.value for member in kind])
    elif kind is bool:
        strategy = st.booleans()
    elif kind is int:
        strategy = integer(limits)
    elif kind is float:
        strategy = floating(limits)
    elif kind is Decimal:
        strategy = money(limits)
    elif kind is AwareDatetime or kind is datetime:
        strategy = moment(limits)
    elif kind is date:
        strategy = st.dates().map(date.isoformat)
    elif kind is UUID:
        strategy = st.uuids().map(str)
    elif kind is str:
        strategy = text(limits, compact)
    else:
        raise TypeError(f"no strategy for {kind!r}: teach tests/catalog_strategies.py this type")
    return strategy | st.none() if field.nullable else strategy


def items(item: FieldType, limits: Limits, compact: bool) -> st.SearchStrategy[list[Any]]:
    """Lists at their length limits: a few items at their edges, or the longest list of one compact
    item (so that the record stays within MAX_EVENT_BYTES)."""
    low, high = limits.min_length or 0, limits.max_length if limits.max_length is not None else 20
    few = st.lists(value(item, compact), min_size=low, max_size=min(high, low + 3))
    if high <= 20:
        return few
    return few | value(item, compact=True).map(lambda one: [one] * high)


@functools.cache
def model_dict(model: type[BaseModel], compact: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Valid JSON objects for `model`: required fields always, optional ones absent or present."""
    required, optional = {}, {}
    for name, info in model.model_fields.items():
        (required if info.is_required() else optional)[name] = value(field_of(name, info), compact)
    fields = st.fixed_dictionaries(required, optional=optional)
    fix = _FIXES.get(model)
    return fields if fix is None else _fixed(fields, fix)


@st.composite
def _fixed(draw: st.DrawFn, fields: st.SearchStrategy[dict[str, Any]], fix: Any) -> dict[str, Any]:
    return fix(draw, draw(fields))


def _fix_purchase(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    """The lines' sum within MAX_AMOUNT (prices cut to the most that keeps it), the discount within the sum."""
    units = sum(line["quantity"] for line in data["lines"])
    cap = (MAX_AMOUNT / units).quantize(Decimal("0.01"), rounding=ROUND_DOWN)
    data["lines"] = [line if Decimal(str(line["unit_price"])) <= cap else {**line, "unit_price": str(cap)}
                     for line in data["lines"]]
    subtotal = sum(Decimal(str(line["unit_price"])) * line["quantity"] for line in data["lines"])
    if Decimal(str(data.get("discount", 0))) > subtotal:
        data["discount"] = str(subtotal)
    return data


def _fix_survey(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    low, high = (0, 10) if data["kind"] == "nps" else (1, 5)
    data["score"] = draw(st.sampled_from([low, high]) | st.integers(low, high))
    return data


def _fix_adjustment(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "points": data["points"] or 1}


def _fix_source(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    if data.get("timezone") is not None:
        data["timezone"] = draw(ZONE_NAMES)
    return data


# The models' cross-field validators and checks against lists, which no annotation shows.
_FIXES = {PurchaseCompleted: _fix_purchase, SurveyAnswered: _fix_survey, PointsAdjusted: _fix_adjustment,
          Source: _fix_source}
# Zones at the ends of the offsets: +14, -12, quarter hours, and the names that are no region.
ZONE_NAMES = st.sampled_from(["UTC", "Pacific/Kiritimati", "Etc/GMT+12", "Pacific/Chatham", "Asia/Kathmandu",
                              "America/St_Johns", "Australia/Lord_Howe", "Etc/GMT-14", "Factory"]) \
    | st.sampled_from(sorted(ZONES))


# --- records of the events topic --------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """A record to fold or to produce: the key, the JSON value and how it is written."""
    key: bytes | None
    body: Any
    escaped: bool = False  # written by json.dumps with \\uXXXX escapes (surrogate pairs for emoji)

    @property
    def value(self) -> bytes:
        if self.escaped:
            return json.dumps(self.body, ensure_ascii=True).encode()
        try:
            return orjson.dumps(self.body)
        except TypeError:  # an int past 64 bits, which only json writes
            return json.dumps(self.body, ensure_ascii=False).encode()


SYSTEM_MODELS = {CLOCK_TICK_TYPE: ClockTick, SEGMENT_BOUNDARIES_TYPE: SegmentBoundaries,
                 CHURN_MODEL_TYPE: ChurnModelPublished, ALIAS_LINKED_TYPE: AliasLinked,
                 ALIAS_EVENT_ATTRIBUTED_TYPE: AliasEventAttributed}
CATALOG_TYPES = sorted(PAYLOADS)
NAMES = text(Limits(min_length=1, max_length=NAME_LENGTH))
ALIASES = st.sampled_from(list(AliasType))


def customer_key(body: dict[str, Any]) -> str:
    """The Kafka key of a catalog event (Envelope.customer_key, on the JSON as the catalog strips it)."""
    event = event_model(body["type"]).model_validate(body)
    return event.customer_key


@st.composite
def catalog_event(draw: st.DrawFn, type_name: str, customers: list[str] | None = None,
                  anonymous: bool | None = None) -> dict[str, Any]:
    """A valid event of `type_name`; its customer one of `customers` when given, or known only by
    identifiers when `anonymous` (drawn when None)."""
    body = draw(model_dict(event_model(type_name)))
    body["type"] = type_name
    if draw(st.booleans()):
        body.pop("schema_version", None)
    else:
        body["schema_version"] = 1
    anonymous = draw(st.booleans()) if anonymous is None else anonymous
    identifiers = {k: v for k, v in (body.get("identifiers") or {}).items() if v is not None}
    if anonymous:
        body.pop("customer_id", None)
        if not identifiers:
            alias = draw(ALIASES)
            identifiers[alias.value] = draw(NAMES)
        body["identifiers"] = identifiers
    else:
        body["customer_id"] = draw(st.sampled_from(customers) if customers else NAMES)
    return body


@st.composite
def system_record(draw: st.DrawFn, type_name: str, partition: int, customers: list[str]) -> Record:
    """A valid platform record of `type_name`, naming `partition` where it names one."""
    body = draw(model_dict(SYSTEM_MODELS[type_name]))
    body["type"] = type_name
    if "partition" in body:
        body["partition"] = partition
    if type_name == ALIAS_EVENT_ATTRIBUTED_TYPE:
        inner = draw(catalog_event(draw(st.sampled_from(CATALOG_TYPES)), anonymous=True))
        body.update(customer_id=draw(st.sampled_from(customers)), event=inner,
                    alias_key=customer_key(inner))
        return Record(body["customer_id"].encode(), body, draw(st.booleans()))
    if type_name == ALIAS_LINKED_TYPE:
        body["customer_id"] = draw(st.sampled_from(customers))
        return Record(body["alias_key"].encode(), body, draw(st.booleans()))
    return Record(type_name.encode(), body, draw(st.booleans()))


@st.composite
def log(draw: st.DrawFn, partition: int = 0, max_records: int = 8, including: str | None = None) -> list[Record]:
    """A few records of one partition: catalog events of a small set of customers (some known only
    by an alias) and platform records, each valid and keyed as the platform expects; at least one
    of type `including` when given."""
    customers = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    types_ = draw(st.lists(st.sampled_from(CATALOG_TYPES * 3 + sorted(SYSTEM_MODELS)), min_size=1,
                           max_size=max_records))
    if including:
        types_.insert(draw(st.integers(0, len(types_))), including)
    return [draw(record(type_name, partition, customers)) for type_name in types_]


@st.composite
def record(draw: st.DrawFn, type_name: str, partition: int, customers: list[str]) -> Record:
    """A valid record of `type_name` (a catalog type or a platform record), keyed as it must be."""
    if type_name in SYSTEM_MODELS:
        return draw(system_record(type_name, partition, customers))
    body = draw(catalog_event(type_name, customers))
    return Record(customer_key(body).encode(), body, draw(st.booleans()))


def fits(record: Record) -> bool:
    """Whether the record is within MAX_EVENT_BYTES as written (long strings, escaped, may not be)."""
    return len(record.value) <= MAX_EVENT_BYTES


# --- one field past its limit -------------------------------------------------------------------------

@dataclass(frozen=True)
class Spot:
    """A place in a record's JSON where a model field is, with that field."""
    path: tuple[str | int, ...]
    field: FieldType | None  # None: the object of a model (for an unknown or a missing field)
    model: type[BaseModel] | None = None


def spots(model: type[BaseModel], data: dict[str, Any], path: tuple[str | int, ...] = ()) -> list[Spot]:
    """Every field present in `data` (nested models and list items included), and every object."""
    found = [Spot(path, None, model)]
    for name, info in model.model_fields.items():
        if name not in data or name == "type":
            continue
        field = field_of(name, info)
        found.append(Spot((*path, name), field))
        nested, kind = data[name], field.kind
        if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(nested, dict):
            found += spots(kind, nested, (*path, name))
        elif typing.get_origin(kind) is list and nested:
            item = unwrap(typing.get_args(kind)[0])
            if isinstance(item.kind, type) and issubclass(item.kind, BaseModel):
                found += spots(item.kind, nested[0], (*path, name, 0))
            else:
                found.append(Spot((*path, name, 0), item))
    return found


def invalid(field: FieldType) -> list[Any]:
    """JSON values just past the field's limits, or of the wrong kind: each one the catalog refuses."""
    kind, limits = field.kind, field.limits
    if (isinstance(kind, type) and issubclass(kind, BaseModel)) or typing.get_origin(kind) is dict:
        return ["not an object", [1]]
    if typing.get_origin(kind) is list:
        long = [] if limits.max_length is None else [[None] * (limits.max_length + 1)]
        short = [[]] if limits.min_length else []
        return ["not a list", *long, *short]
    if typing.get_origin(kind) is Literal or (isinstance(kind, type) and issubclass(kind, Enum)):
        return ["no-such-value", 7]
    if kind is bool:
        return ["maybe", 2]
    if kind is int:
        return [*_past(limits, 1), "twelve", 1.5]
    if kind is float:
        return [*_past_float(limits), "fast", "Infinity", "NaN"]
    if kind is Decimal:
        places = limits.decimal_places or 0
        digits = limits.max_digits or 28
        return [*_past(limits, Decimal(1).scaleb(-places), as_text=True), "1." + "1" * (places + 1),
                "1" * (digits - places + 1), "NaN", "Infinity", "ten"]
    if kind is AwareDatetime or kind is datetime:
        return [*_past_time(limits), "2026-03-01T10:00:00", "2026-02-30T10:00:00Z", "yesterday"]
    if kind is date:
        return ["2026-02-30", "12/01/1990", 19900101.5]
    if kind is UUID:
        return ["not-a-uuid", 12]
    if kind is str:
        return _bad_strings(limits)
    raise TypeError(f"no invalid values for {kind!r}")


def _past(limits: Limits, step: Any, as_text: bool = False) -> list[Any]:
    values = []
    if limits.low is not None:
        values.append(limits.gt if limits.gt is not None else limits.ge - step)
    if limits.high is not None:
        values.append(limits.lt if limits.lt is not None else limits.le + step)
    return [str(v) if as_text else v for v in values]


def _past_float(limits: Limits) -> list[float]:
    values = []
    if limits.low is not None:
        values.append(limits.gt if limits.gt is not None else math.nextafter(limits.ge, -math.inf))
    if limits.high is not None:
        values.append(limits.lt if limits.lt is not None else math.nextafter(limits.le, math.inf))
    return values


def _past_time(limits: Limits) -> list[str]:
    ms = timedelta(milliseconds=1)
    values = []
    if limits.low is not None:
        values.append((limits.gt if limits.gt is not None else limits.ge - ms).isoformat())
    if limits.high is not None:
        values.append((limits.lt if limits.lt is not None else limits.le + ms).isoformat())
    return values


def _bad_strings(limits: Limits) -> list[Any]:
    values: list[Any] = [12, ["a"]]
    if limits.max_length is not None:
        values.append("x" * (limits.max_length + 1))
    if limits.min_length:
        values += ["", "   "]
    if limits.pattern:
        values += ["lower", "TOOLONG"]
    return values


@st.composite
def past_limit(draw: st.DrawFn, model: type[BaseModel], body: dict[str, Any]) -> tuple[dict[str, Any], tuple]:
    """`body` with one thing wrong: a field past its limit, an unknown field, or a required field
    missing; and the path of the fault (which the dead letter's detail must name)."""
    spot = draw(st.sampled_from(spots(model, body)))
    broken = orjson.loads(orjson.dumps(body))
    if spot.field is None:
        target = _at(broken, spot.path)
        required = [name for name, info in spot.model.model_fields.items() if info.is_required() and name != "type"]
        if required and draw(st.booleans()):
            name = draw(st.sampled_from(required))
            del target[name]
            return broken, (*spot.path, name)
        target["unexpected_field"] = 1
        return broken, (*spot.path, "unexpected_field")
    _at(broken, spot.path[:-1])[spot.path[-1]] = draw(st.sampled_from(invalid(spot.field)))
    return broken, spot.path


def _at(data: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        data = data[part]
    return data

