"""The mapping file (TOML): which export files an import reads, what each holds, in which columns
and formats, and the import's own identity. Validated whole when loaded, so that a typo in a column
or field name stops the import before anything is read or sent (docs/import.md has an example).

    [import]                 id, as_of, timezone, currency, currencies, channel, and default formats
    [customers] [orders] [refunds] [points]   one table per kind of file: file, format options,
        .columns             catalog field = "column in the file" (or a list of columns, joined by a space)
        .defaults            catalog field = value, for fields no column holds or cells left empty
    [[events]]               any other catalog type: type, file, key columns, .columns, .payload

Invariants: every field a kind requires is given by a column or a default; every customer-bearing
file names at least one identity column; every path resolves to at least one existing file."""

from __future__ import annotations

import glob
import tomllib
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, available_timezones

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.envelope import Channel
from schemas.events import EVENT_TYPES
from services.importer.values import Format

IDENTITY = ("customer_id", "loyalty_card", "app_user_id")
ENVELOPE = (*IDENTITY, "store_id", "channel")
CONSENT_FIELDS = ("consent_email", "consent_sms", "consent_push", "consent_phone", "consent_post")
ADDRESS_FIELDS = ("address_line1", "address_line2", "city", "postal_code", "country")

# Per kind of file: the catalog fields its columns may fill, and those it must have.
FIELDS: dict[str, tuple[str, ...]] = {
    "customers": (*ENVELOPE, "registered_at", "name", "email", "phone", "birthday", *ADDRESS_FIELDS,
                  "preferred_store_id", "locale", *CONSENT_FIELDS),
    "orders": (*ENVELOPE, "order_id", "occurred_at", "sku", "category", "quantity", "unit_price", "discount",
               "order_discount", "currency", "payment_method"),
    "refunds": (*ENVELOPE, "refund_id", "order_id", "occurred_at", "amount", "currency", "full", "reason", "sku",
                "category", "quantity", "unit_price"),
    "points": (*ENVELOPE, "points", "as_of", "reason"),
    "events": (*ENVELOPE, "occurred_at"),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "customers": ("registered_at",),
    "orders": ("order_id", "occurred_at", "sku", "category", "quantity", "unit_price"),
    "refunds": ("refund_id", "order_id", "occurred_at", "amount"),
    "points": ("points",),
    "events": ("occurred_at",),
}
KINDS = ("customers", "orders", "refunds", "points")
FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
IMPORT_ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"

Columns = dict[str, str | list[str]]
Scalar = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FormatOptions(_Strict):
    """Formats a file may set for itself; unset ones come from [import]."""
    timezone: str | None = None
    datetime_format: str | None = None
    date_format: str | None = None
    decimal_separator: Annotated[str, Field(min_length=1, max_length=1)] | None = None
    thousands_separator: Annotated[str, Field(max_length=1)] | None = None
    true_values: list[str] | None = None
    false_values: list[str] | None = None
    delimiter: Annotated[str, Field(min_length=1, max_length=1)] | None = None
    encoding: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, zone: str | None) -> str | None:
        # The zones the catalog's Source accepts (schemas/envelope.py), as every event carries it.
        if zone is not None and zone not in available_timezones() | {"UTC"}:
            raise ValueError(f"unknown IANA timezone {zone!r}")
        return zone


class ImportOptions(FormatOptions):
    id: Annotated[str, Field(pattern=IMPORT_ID)]
    as_of: datetime = Field(description="when the export was taken: no row may be dated later; "
                                        "points balances are dated at it unless a column says otherwise")
    timezone: str = "UTC"
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    currencies: list[Annotated[str, Field(pattern=r"^[A-Z]{3}$")]] = []
    channel: Channel = Channel.POS


class FileSpec(FormatOptions):
    file: str = Field(min_length=1, description="a path or a glob pattern, relative to the mapping file")
    format: Literal["csv", "jsonl", "parquet"] | None = None
    columns: Columns = {}
    defaults: dict[str, Scalar] = {}


class EventsSpec(FileSpec):
    type: str
    name: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")] | None = None
    key: str | list[str] = Field(description="the column(s) whose values name each event uniquely")
    payload: Columns = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _catalog_type(cls, type_name: str) -> str:
        if type_name not in EVENT_TYPES:
            raise ValueError(f"{type_name!r} is not in the event catalog")
        return type_name


class MappingFile(_Strict):
    import_: ImportOptions = Field(alias="import")
    customers: FileSpec | None = None
    orders: FileSpec | None = None
    refunds: FileSpec | None = None
    points: FileSpec | None = None
    events: list[EventsSpec] = []

    @model_validator(mode="after")
    def _fields_known_and_complete(self) -> MappingFile:
        for kind, spec in self.files():
            _check_fields("events" if isinstance(spec, EventsSpec) else kind, spec)
        names = [spec.name or spec.type for spec in self.events]
        if len(set(names)) != len(names):
            raise ValueError("two [[events]] entries share a name; give each its own `name`")
        taken = sorted(set(names) & {*KINDS, "consent"})
        if taken:
            raise ValueError(f"[[events]] name {taken[0]!r} is a kind of its own; choose another `name`")
        if not self.files():
            raise ValueError("the mapping names no file: add [customers], [orders], [refunds], [points] or [[events]]")
        return self

    def files(self) -> list[tuple[str, FileSpec]]:
        """(kind, spec) for every file table, [[events]] entries under their name."""
        found: list[tuple[str, FileSpec]] = [(kind, spec) for kind in KINDS if (spec := getattr(self, kind))]
        found.extend((spec.name or spec.type, spec) for spec in self.events)
        return found


def _check_fields(kind: str, spec: FileSpec) -> None:
    known = FIELDS[kind]
    for table, names in (("columns", spec.columns), ("defaults", spec.defaults)):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"[{kind}.{table}]: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    given = set(spec.columns) | set(spec.defaults)
    missing = [name for name in REQUIRED[kind] if name not in given]
    if missing:
        raise ValueError(f"[{kind}]: no column or default for {', '.join(missing)}")
    if not set(IDENTITY) & set(spec.columns):
        raise ValueError(f"[{kind}.columns]: name the customer: one of {', '.join(IDENTITY)}")


@dataclass(frozen=True)
class SourceFile:
    """One file to read: its kind, where it is, how it is written, its path as reported, and its
    place among the mapping's files."""
    kind: str
    path: Path
    name: str  # relative to the mapping file's folder: what reports and dead letters call it
    format: str
    delimiter: str
    encoding: str
    formats: Format
    spec: FileSpec
    index: int = 0


@dataclass(frozen=True)
class Mapping:
    """A loaded, validated mapping: the import's options and every file it reads, in mapping order."""
    path: Path
    options: ImportOptions
    as_of: datetime  # aware
    sources: tuple[SourceFile, ...]

    @property
    def import_id(self) -> str:
        return self.options.id

    @property
    def currencies(self) -> frozenset[str]:
        return frozenset([self.options.currency, *self.options.currencies])


class MappingError(ValueError):
    """The mapping file cannot be used; the message names the file and what is wrong."""


def load(path: Path) -> Mapping:
    try:
        with open(path, "rb") as handle:
            parsed = MappingFile.model_validate(tomllib.load(handle))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise MappingError(f"mapping {path}: {exc}") from exc
    options = parsed.import_
    zone = ZoneInfo(options.timezone)
    as_of = options.as_of if options.as_of.tzinfo else options.as_of.replace(tzinfo=zone)
    found = [source for kind, spec in parsed.files() for source in _sources(path, kind, spec, options)]
    return Mapping(path, options, as_of, tuple(replace(source, index=index) for index, source in enumerate(found)))


def _sources(mapping_path: Path, kind: str, spec: FileSpec, options: ImportOptions) -> list[SourceFile]:
    folder = mapping_path.parent
    pattern = str(folder / spec.file)
    paths = sorted(Path(found) for found in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    paths = [found for found in paths if found.is_file()]
    if not paths:
        raise MappingError(f"mapping {mapping_path}: [{kind}] file {spec.file!r}: no such file")
    merged = {name: value for name in FormatOptions.model_fields
              if (value := getattr(spec, name)) is not None or (value := getattr(options, name)) is not None}
    formats = Format(**{name: tuple(value) if isinstance(value, list) else value
                        for name, value in merged.items() if name in _FORMAT_FIELDS})
    sources = []
    for found in paths:
        file_format = spec.format or FORMATS.get(found.suffix.lower())
        if file_format is None:
            raise MappingError(f"mapping {mapping_path}: [{kind}] {found.name}: say its `format` (csv, jsonl, parquet)")
        delimiter = merged.get("delimiter") or ("\t" if found.suffix.lower() == ".tsv" else ",")
        sources.append(SourceFile(kind, found, _relative(found, folder), file_format, delimiter,
                                  merged.get("encoding") or "utf-8", formats, spec))
    return sources


_FORMAT_FIELDS = ("timezone", "datetime_format", "date_format", "decimal_separator", "thousands_separator",
                  "true_values", "false_values")


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def columns_of(columns: Columns) -> list[str]:
    """Every file column a columns table reads, each once, in order."""
    seen: dict[str, None] = {}
    for value in columns.values():
        for column in ([value] if isinstance(value, str) else value):
            seen.setdefault(column, None)
    return list(seen)


def key_columns(spec: EventsSpec) -> list[str]:
    return [spec.key] if isinstance(spec.key, str) else list(spec.key)

