"""Whatever the catalog accepts, every fold can process and every projection can store; whatever it
refuses is dead-lettered with a reason that names the field, and nothing raises.

Records come from tests/catalog_strategies.py: every field of every catalog type and platform record
at the edges the models declare. They go through `batch.fold_batch`, the entry the worker and the
rebuild use, against a partition state over a `MemoryBackend`, which is flushed as the worker
flushes it (every changed key encoded, as for the changelog); the records the fold appends to the
events topic (identity records) are folded in turn. Every output is turned into its record (as the
worker sends it) and then into rows by the projection writer's row makers (projections/writer.py
SINKS), and every value of every row is checked against its ClickHouse column type, read from the
migrations' DDL: a value out of a column's range would stop the writer's batch for good."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.migrations import MIGRATIONS
from projections.writer import COLUMNS, SINKS
from schemas.codec import MAX_EVENT_BYTES, DecodeError, decode_event
from schemas.envelope import EARLIEST_EVENT_TIME, LATEST_EVENT_TIME
from schemas.events import event_model
from streams.batch import fold_batch
from streams.config import settings as crm_settings
from streams.customer import CustomerState
from streams.outputs import MAX_DEAD_LETTER_BYTES, Accepted, DeadLetter, Duplicate, Forward, Output
from streams.pipeline import HELD_BYTES, load_customer
from streams.records import SourceRecord
from streams.rulebooks import load_rulebooks
from streams.state import MemoryBackend, PartitionState
from tests.catalog_strategies import (
    CATALOG_TYPES, SYSTEM_MODELS, Record, catalog_event, customer_key, fits, log, past_limit, system_record,
)

RULES = load_rulebooks(crm_settings())
# Examples per type and per mixed log: the whole file takes about half a minute on the 2-core machine.
EDGES = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
LOGS = settings(EDGES, max_examples=150)
PARTITION = 0
EVENT_TIMES_MS = (int(EARLIEST_EVENT_TIME.timestamp() * 1000), int(LATEST_EVENT_TIME.timestamp() * 1000))
TYPICAL_MS = 1772359200000


# --- ClickHouse column types, from the DDL ------------------------------------------------------------

def _type_at(text: str) -> str:
    """The column type at the start of `text`: a name and its balanced parentheses."""
    depth, end = 0, 0
    for end, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return text[:end + 1]
        elif depth == 0 and char in " ,\n":
            return text[:end]
    return text


def column_types() -> dict[str, dict[str, str]]:
    """table -> column -> ClickHouse type, from every CREATE TABLE and ADD COLUMN of the migrations."""
    tables: dict[str, dict[str, str]] = {}
    for _, statement in MIGRATIONS:
        created = re.search(r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+)\s*\((.*)\)\s*ENGINE", statement, re.S)
        if created:
            table, body = created.groups()
            for line in body.strip().splitlines():
                name, rest = line.strip().split(None, 1)
                tables.setdefault(table, {})[name] = _type_at(rest)
        altered = re.match(r"\s*ALTER TABLE \{db\}\.(\w+)", statement)
        if altered:
            for name, rest in re.findall(r"ADD COLUMN IF NOT EXISTS (\w+) (.+)", statement):
                tables[altered.group(1)][name] = _type_at(rest)
    return tables


TYPES = column_types()
DATETIME64_RANGE = (datetime(1900, 1, 1, tzinfo=UTC), datetime(2299, 12, 31, 23, 59, 59, 999000, tzinfo=UTC))
UNSIGNED = re.compile(r"UInt(8|16|32|64)$")
SIGNED = re.compile(r"Int(8|16|32|64)$")
DECIMAL = re.compile(r"Decimal\((\d+),\s*(\d+)\)$")


def _args(type_: str) -> list[str]:
    """The arguments of `Name(a, b)`, split at top-level commas."""
    inner, parts, depth, start = type_[type_.index("(") + 1:-1], [], 0, 0
    for index, char in enumerate(inner):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(inner[start:index].strip())
            start = index + 1
    return [*parts, inner[start:].strip()]


def misfit(type_: str, value: Any) -> str | None:
    """Why `value` cannot be inserted into a column of `type_` (None: it can)."""
    if type_.startswith("Nullable("):
        return None if value is None else misfit(_args(type_)[0], value)
    if type_.startswith("LowCardinality("):
        return misfit(_args(type_)[0], value)
    if type_.startswith("Array("):
        if not isinstance(value, (list, tuple)):
            return f"{value!r} is not an array"
        return next((problem for item in value if (problem := misfit(_args(type_)[0], item))), None)
    if type_.startswith("Map("):
        key, item = _args(type_)
        if not isinstance(value, dict):
            return f"{value!r} is not a map"
        return next((p for k, v in value.items() if (p := misfit(key, k) or misfit(item, v))), None)
    if type_ == "String":
        return _string_misfit(value)
    if type_ == "UUID":
        return None if isinstance(value, UUID) else f"{value!r} is not a UUID"
    if type_ == "Float64":
        return None if isinstance(value, (int, float)) and abs(value) <= 1.7976931348623157e308 else f"{value!r} is not a finite float"
    if type_.startswith("DateTime64("):
        return _time_misfit(value)
    for pattern, signed in ((UNSIGNED, False), (SIGNED, True)):
        width = pattern.match(type_)
        if width:
            bits = int(width.group(1))
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            return None if ok else f"{value!r} is not in {type_}'s range"
    decimal = DECIMAL.match(type_)
    if decimal:
        return _decimal_misfit(value, int(decimal.group(1)), int(decimal.group(2)))
    raise AssertionError(f"teach misfit() the ClickHouse type {type_}")


def _string_misfit(value: Any) -> str | None:
    if isinstance(value, bytes):
        return None
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    try:
        value.encode()
    except UnicodeEncodeError:
        return f"{value!r} cannot be encoded as UTF-8"
    return None


def _time_misfit(value: Any) -> str | None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        return f"{value!r} is not an aware datetime"
    low, high = DATETIME64_RANGE
    return None if low <= value <= high else f"{value.isoformat()} is outside DateTime64's range"


def _decimal_misfit(value: Any, precision: int, scale: int) -> str | None:
    if not isinstance(value, Decimal) or not value.is_finite():
        return f"{value!r} is not a finite decimal"
    if value != value.quantize(Decimal(1).scaleb(-scale)):
        return f"{value} has more than {scale} decimal places"
    if abs(value) >= Decimal(10) ** (precision - scale):
        return f"{value} has more than {precision - scale} digits before the point"
    return None


# --- the whole path: fold, flush, records, rows ---------------------------------------------------------

@dataclass(frozen=True)
class Consumed:
    """An output record as the projection writer's consumer hands it over."""
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    partition: int
    offset: int


def fold(records: list[Record], timestamps: list[int]) -> list[Output]:
    """`fold_source` of the records, stamped in turn with the timestamps."""
    return fold_source([SourceRecord(r.key, r.value, PARTITION, offset, timestamps[offset % len(timestamps)])
                        for offset, r in enumerate(records)])


def fold_source(batch: list[SourceRecord]) -> list[Output]:
    """Every output of the records folded as one batch, then of the records the fold appended to
    the events topic, in turn, as the worker would meet them; the state flushed after each batch."""
    state = PartitionState(PARTITION, MemoryBackend())
    stamp = batch[0].timestamp_ms if batch else TYPICAL_MS
    outputs: list[Output] = []
    offset = len(batch)
    for _ in range(4):
        produced = fold_batch(batch, lambda partition: state, RULES)
        state.flush()
        outputs += produced
        forwarded = [o for o in produced if isinstance(o, Forward)]
        batch = [SourceRecord(f.key.encode(), orjson.dumps(f.record), PARTITION, offset + n, stamp)
                 for n, f in enumerate(forwarded)]
        offset += len(batch)
        if not batch:
            break
    return outputs


def rows(outputs: list[Output]) -> dict[str, list[list[Any]]]:
    """The rows the projection writer would insert for these outputs."""
    by_topic: dict[str, list[Consumed]] = {}
    for index, output in enumerate(outputs):
        record = output.to_record()
        if record is not None and record.topic in SINKS:
            by_topic.setdefault(record.topic, []).append(
                Consumed(record.topic, record.key, record.value, record.headers, 0, index))
    tables: dict[str, list[list[Any]]] = {}
    for topic, records in by_topic.items():
        for table, made in SINKS[topic](records).items():
            tables.setdefault(table, []).extend(made)
    return tables


def misfits(tables: dict[str, list[list[Any]]]) -> list[str]:
    """Every value of every row that its column cannot take."""
    problems = []
    for table, made in tables.items():
        columns = COLUMNS[table]
        for row in made:
            assert len(row) == len(columns), f"{table}: {len(row)} values for {len(columns)} columns"
            for name, value in zip(columns, row):
                problem = misfit(TYPES[table][name], value)
                if problem:
                    problems.append(f"{table}.{name}: {problem}")
    return problems


timestamps = st.lists(st.sampled_from([*EVENT_TIMES_MS, TYPICAL_MS]) | st.integers(*EVENT_TIMES_MS), min_size=1, max_size=3)


# --- whatever the catalog accepts ----------------------------------------------------------------------

def check_accepted(records: list[Record], stamps: list[int]) -> None:
    """The records fold without a dead letter, every catalog event among them is accepted (directly,
    or once attributed to its customer), and every row of every output fits its column."""
    records = [r for r in records if fits(r)]
    for record in records:
        decoded = decode_event(record.value)
        assert not isinstance(decoded, DecodeError), f"the strategy drew an invalid record: {decoded}"
    outputs = fold(records, stamps)
    assert [f"{o.reason}: {o.detail}" for o in outputs if isinstance(o, DeadLetter)] == []
    accepted = {str(o.event.event_id) for o in outputs if isinstance(o, Accepted)}
    assert {r.body["event_id"] for r in records if r.body["type"] in CATALOG_TYPES} <= accepted
    assert misfits(rows(outputs)) == []


@LOGS
@given(log(PARTITION), timestamps)
def test_every_log_of_records_the_catalog_accepts_is_folded_and_every_row_fits_its_column(records, stamps):
    check_accepted(records, stamps)


@pytest.mark.parametrize("type_name", CATALOG_TYPES + sorted(SYSTEM_MODELS))
def test_every_record_type_at_its_edges_is_folded_and_every_row_fits_its_column(type_name):
    @EDGES
    @given(log(PARTITION, max_records=4, including=type_name), timestamps)
    def accepted(records, stamps):
        check_accepted(records, stamps)

    accepted()


# --- whatever it refuses ----------------------------------------------------------------------------------

# A personal field pushed past its limit is no sealed token any more: refused as plain personal data.
REFUSALS = {"schema_invalid", "unsupported_schema_version", "unknown_type", "personal_data_in_clear"}


def _event(customer: str | None = "c-1", **changes: Any) -> dict[str, Any]:
    """A valid daily_sign_in of `customer` (None: none), with `changes` (None: the field left out)."""
    body = {"event_id": "6f1c1f0e-8a8e-4c43-9d8e-0d7c5b1d2a01", "type": "daily_sign_in", "customer_id": customer,
            "occurred_at": "2026-03-01T10:00:00Z", "source": {"channel": "app"}, **changes}
    return {name: value for name, value in body.items() if value is not None}


def refused(records: list[Record], stamps: list[int]) -> DeadLetter:
    """The one dead letter of a refused record, checked to be all it produced and to be storable."""
    outputs = fold(records, stamps)
    assert len(outputs) == 1 and isinstance(outputs[0], DeadLetter), outputs
    assert misfits(rows(outputs)) == []
    return outputs[0]


@pytest.mark.parametrize("type_name", CATALOG_TYPES)
def test_an_event_with_one_field_past_its_limit_is_dead_lettered_naming_the_field(type_name):
    @EDGES
    @given(catalog_event(type_name).flatmap(lambda body: st.tuples(
        st.just(body), past_limit(event_model(type_name), body))))
    def dead_lettered(drawn):
        body, (broken, path) = drawn
        letter = refused([Record(customer_key(body).encode(), broken)], [TYPICAL_MS])
        assert letter.reason in REFUSALS
        named = [str(part) for part in path if isinstance(part, str)][-1]
        assert named in letter.detail

    dead_lettered()


@pytest.mark.parametrize("type_name", sorted(SYSTEM_MODELS))
def test_a_platform_record_with_one_field_past_its_limit_is_dead_lettered_naming_the_field(type_name):
    @EDGES
    @given(system_record(type_name, PARTITION, ["c-1"]).flatmap(lambda record: st.tuples(
        st.just(record), past_limit(SYSTEM_MODELS[type_name], record.body))))
    def dead_lettered(drawn):
        record, (broken, path) = drawn
        letter = refused([Record(record.key, broken)], [TYPICAL_MS])
        assert letter.reason == "schema_invalid"
        named = [str(part) for part in path if isinstance(part, str)][-1]
        assert named in letter.detail

    dead_lettered()


@pytest.mark.parametrize("stamp", [EVENT_TIMES_MS[0] - 1, EVENT_TIMES_MS[1] + 1, 2**62])
def test_an_event_without_received_at_whose_record_timestamp_is_out_of_range_is_dead_lettered(stamp):
    letter = refused([Record(b"c-1", _event())], [stamp])
    assert letter.reason == "schema_invalid" and "received_at" in letter.detail


RAW_REFUSALS = [
    (b"c-1", None, "malformed_json"),
    (b"c-1", b"", "malformed_json"),
    (b"c-1", b"\xff\xfe{}", "malformed_json"),
    (b"c-1", b'{"type": "daily_sign_in", "customer_id": "\\ud800"}', "malformed_json"),
    (b"c-1", b"[" * 10_000 + b"]" * 10_000, "malformed_json"),
    (b"c-1", b'{"type": "daily_sign_in", "n": 1e400}', "malformed_json"),
    (b"c-1", b'{"type": "daily_sign_in", "n": ' + b"9" * 400 + b"}", "malformed_json"),
    (b"c-1", b"[1, 2]", "not_an_object"),
    (b"c-1", b'"an event"', "not_an_object"),
    (b"c-1", b'{"pad": "' + b"x" * MAX_EVENT_BYTES + b'"}', "too_large"),
    (b"c-1", b'{"type": "no_such_type"}', "unknown_type"),
    (b"c-1", orjson.dumps(_event(schema_version=2)), "unsupported_schema_version"),
    (b"c-1", orjson.dumps(_event(schema_version="1")), "unsupported_schema_version"),
    (b"c-2", orjson.dumps(_event()), "wrong_key"),
    (None, orjson.dumps(_event()), "wrong_key"),
    (b"c-1\xff\x00", orjson.dumps(_event()), "wrong_key"),
    (b"clock", b'{"type": "clock_ticked", "event_id": "6f1c1f0e-8a8e-4c43-9d8e-0d7c5b1d2a01", '
               b'"occurred_at": "2026-03-01T10:00:00Z", "partition": 3}', "misrouted_tick"),
    (b"clock", b'{"type": "clock_ticked", "partition": "zero"}', "schema_invalid"),
]


@pytest.mark.parametrize("key, value, reason", RAW_REFUSALS)
def test_a_record_that_is_no_valid_event_is_dead_lettered_with_its_reason(key, value, reason):
    outputs = fold_source([SourceRecord(key, value, PARTITION, 0, TYPICAL_MS)])
    assert [(type(o).__name__, getattr(o, "reason", None)) for o in outputs] == [("DeadLetter", reason)]
    assert outputs[0].detail and misfits(rows(outputs)) == []


def test_an_event_id_sent_again_is_ignored_with_the_same_content_and_dead_lettered_with_other_content():
    first, same, other = _event(), _event(received_at="2026-03-01T10:00:05Z"), _event(source={"channel": "web"})
    outputs = fold_source([SourceRecord(b"c-1", orjson.dumps(body), PARTITION, offset, TYPICAL_MS)
                           for offset, body in enumerate([first, same, other])])
    facts = [o for o in outputs if isinstance(o, (Accepted, Duplicate, DeadLetter))]
    assert [(type(o).__name__, o.record.offset) for o in facts] == [("Accepted", 0), ("Duplicate", 1), ("DeadLetter", 2)]
    assert facts[-1].reason == "conflicting_duplicate"


def test_the_dead_letter_of_a_record_past_a_megabyte_carries_its_head_and_its_size():
    original = b"\xff" * (MAX_DEAD_LETTER_BYTES + 1)
    record = fold_source([SourceRecord(b"c-1", original, PARTITION, 0, TYPICAL_MS)])[0].to_record()
    assert record.value == original[:MAX_DEAD_LETTER_BYTES]
    assert ("crm.dlq.truncated_from", str(len(original)).encode()) in record.headers


def test_an_alias_holds_events_for_its_link_up_to_a_budget_so_that_its_state_stays_one_kafka_record():
    # Purchases of a thousand lines with the longest skus: about 230 KB each, as large as the catalog's
    # limits let a record be (personal fields are sealed in the log: at most 4 KiB each).
    lines = [{"sku": f"{line:04d}" + "s" * 196, "category": "c", "quantity": 1, "unit_price": "1.00"}
             for line in range(1000)]
    big = [SourceRecord(b"loyalty_card:card-1", orjson.dumps(_event(
                            None, event_id=f"6f1c1f0e-8a8e-4c43-9d8e-{n:012d}", identifiers={"loyalty_card": "card-1"},
                            payload={"order_id": f"o-{n}", "currency": "EUR", "lines": lines},
                            type="purchase_completed")),
                        PARTITION, n, TYPICAL_MS) for n in range(6)]
    state = PartitionState(PARTITION, MemoryBackend())
    outputs = fold_batch(big, lambda partition: state, RULES)
    assert sum(isinstance(o, Accepted) for o in outputs) == 6
    held = load_customer(state.store, "loyalty_card:card-1").held
    assert 0 < len(held) < 6
    assert len(state.changes()[b"f|c|loyalty_card:card-1"]) < HELD_BYTES + 10_000


def test_an_alias_state_stored_before_its_budget_existed_loads_with_the_size_of_its_held_events():
    state = CustomerState.new("loyalty_card:card-1")
    state.held = [[0, _event(None, identifiers={"loyalty_card": "card-1"})]]
    stored = state.to_dict()
    del stored["held_bytes"]
    assert CustomerState.from_dict(stored).held_bytes == len(orjson.dumps(state.held[0][1]))
