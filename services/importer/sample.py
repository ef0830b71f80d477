"""A synthetic retailer export (customers, orders with one row per line item, refunds, points
balances) with its mapping file and the figures the platform must show once it is imported:
CSV written the German way (`;`, decimal comma, thousands dot, day.month.year, local time, ja/nein),
JSON Lines (ISO 8601 with offsets, numbers, booleans) or Parquet (typed columns, naive local
timestamps). Deterministic for a seed. The tests and bench/import_throughput.py use it.

With `flaws`, a few rows are wrong on purpose, one for each of these reasons: unparseable_date,
negative_quantity (and order_rejected for the rest of that order), missing_customer,
unknown_currency, too_many_decimals, zero_points, and malformed_row (CSV, JSON Lines). The expected
figures leave exactly those rows out."""

from __future__ import annotations

import csv
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from services.simulator import CATEGORIES, STORES

ZONE = ZoneInfo("Europe/Berlin")
CENT = Decimal("0.01")

COLUMNS = {
    "customers": ["customer_no", "card_no", "first_name", "last_name", "email", "birthday", "registered",
                  "home_store", "newsletter"],
    "orders": ["order_no", "customer_no", "date", "store", "article", "group", "qty", "price", "line_discount",
               "currency", "payment"],
    "refunds": ["refund_no", "order_no", "customer_no", "date", "amount", "currency", "reason"],
    "points": ["customer_no", "balance"],
}
MAPPING_COLUMNS = """
[customers]
file = "customers.{ext}"
[customers.columns]
customer_id = "customer_no"
loyalty_card = "card_no"
name = ["first_name", "last_name"]
email = "email"
birthday = "birthday"
registered_at = "registered"
store_id = "home_store"
preferred_store_id = "home_store"
consent_email = "newsletter"

[orders]
file = "orders.{ext}"
[orders.columns]
order_id = "order_no"
customer_id = "customer_no"
occurred_at = "date"
store_id = "store"
sku = "article"
category = "group"
quantity = "qty"
unit_price = "price"
discount = "line_discount"
currency = "currency"
payment_method = "payment"

[refunds]
file = "refunds.{ext}"
[refunds.columns]
refund_id = "refund_no"
order_id = "order_no"
customer_id = "customer_no"
occurred_at = "date"
amount = "amount"
currency = "currency"
reason = "reason"

[points]
file = "points.{ext}"
[points.columns]
customer_id = "customer_no"
points = "balance"
"""
CSV_FORMATS = """delimiter = ";"
decimal_separator = ","
thousands_separator = "."
datetime_format = "%d.%m.%Y %H:%M:%S"
date_format = "%d.%m.%Y"
true_values = ["ja"]
false_values = ["nein"]
"""


@dataclass
class Expected:
    """What importing the export must give."""
    events: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    purchases: Counter[str] = field(default_factory=Counter)  # customer_id -> purchases
    spend: dict[str, Decimal] = field(default_factory=dict)   # customer_id -> EUR net of refunds

    def add_spend(self, customer_id: str, amount: Decimal) -> None:
        self.spend[customer_id] = self.spend.get(customer_id, Decimal("0.00")) + amount


@dataclass
class Export:
    folder: Path
    mapping: Path
    expected: Expected
    rows: int


@dataclass(frozen=True)
class Span:
    """The years the history covers: customers register in their first 40%, buy until their end;
    the export is taken at midnight after."""
    first: int
    last: int

    @property
    def start(self) -> datetime:
        return datetime(self.first, 1, 1, 8, 0)

    @property
    def end(self) -> datetime:
        return datetime(self.last, 12, 31, 20, 0)

    @property
    def as_of(self) -> str:
        return f"{self.last + 1}-01-01T00:00:00"


def write_export(folder: Path, *, customers: int = 50, file_format: str = "csv", prefix: str = "imp", seed: int = 1,
                 import_id: str = "sample", flaws: bool = True, years: tuple[int, int] = (2015, 2024)) -> Export:
    """Write customers, orders, refunds and points files and mapping.toml into `folder`."""
    span = Span(*years)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    expected = Expected()
    tables: dict[str, list[dict[str, Any]]] = {kind: [] for kind in COLUMNS}
    for number in range(customers):
        _customer(rng, f"{prefix}-{number:06d}", number, span, tables, expected)
    if flaws:
        _flaws(prefix, span, tables, expected, file_format)
    rows = 0
    for kind, records in tables.items():
        rows += len(records)
        _write(folder / f"{kind}.{_extension(file_format)}", kind, records, file_format)
    mapping = folder / "mapping.toml"
    mapping.write_text(_mapping(import_id, span, file_format))
    return Export(folder, mapping, expected, rows)


def _customer(rng: random.Random, customer_id: str, number: int, span: Span,
              tables: dict[str, list[dict[str, Any]]], expected: Expected) -> None:
    days = (span.end - span.start).days
    registered = span.start + timedelta(days=rng.randrange(max(days * 2 // 5, 1)), minutes=rng.randrange(600))
    store = rng.choice(STORES)[0]
    newsletter = rng.choice([True, False, None])
    tables["customers"].append({
        "customer_no": customer_id, "card_no": f"LC-{customer_id}", "first_name": rng.choice(["Anna", "Jan", "Mia"]),
        "last_name": f"Muster{number}", "email": f"{customer_id}@example.com",
        "birthday": datetime(1950 + rng.randrange(50), 1 + rng.randrange(12), 1 + rng.randrange(28)).date(),
        "registered": registered, "home_store": store, "newsletter": newsletter})
    expected.events += 1 + (newsletter is not None)
    expected.spend[customer_id] = Decimal("0.00")
    for _ in range(rng.randint(1, 8)):
        at = registered + timedelta(seconds=rng.randrange(int((span.end - registered).total_seconds())))
        total, lines = _order(rng, customer_id, at, rng.choice([store, rng.choice(STORES)[0]]), tables)
        expected.events += 1
        expected.purchases[customer_id] += 1
        expected.add_spend(customer_id, total)
        if rng.random() < 0.1:
            amount = min(total, lines[0]["price"] * lines[0]["qty"])
            if amount > 0:
                tables["refunds"].append({
                    "refund_no": f"R-{lines[0]['order_no']}", "order_no": lines[0]["order_no"],
                    "customer_no": customer_id, "date": min(at + timedelta(days=rng.randint(1, 20)), span.end),
                    "amount": amount, "currency": "EUR", "reason": rng.choice(["damaged", "wrong size", None])})
                expected.events += 1
                expected.add_spend(customer_id, -amount)
    if rng.random() < 0.5:
        tables["points"].append({"customer_no": customer_id, "balance": rng.randint(1, 5000)})
        expected.events += 1


def _order(rng: random.Random, customer_id: str, at: datetime, store: str,
           tables: dict[str, list[dict[str, Any]]]) -> tuple[Decimal, list[dict[str, Any]]]:
    order_id = f"O-{customer_id}-{len(tables['orders']):07d}"
    payment = rng.choice(["card", "cash"])
    lines = []
    for _ in range(rng.randint(1, 4)):
        category = rng.choice(list(CATEGORIES))
        low, high = CATEGORIES[category]
        lines.append({
            "order_no": order_id, "customer_no": customer_id, "date": at, "store": store,
            "article": f"{category[:3]}-{rng.randrange(500):04d}", "group": category, "qty": rng.randint(1, 3),
            "price": Decimal(str(round(rng.uniform(low, high), 2))).quantize(CENT), "line_discount": None,
            "currency": "EUR", "payment": payment})
    subtotal = sum(line["price"] * line["qty"] for line in lines)
    if rng.random() < 0.2:
        lines[0]["line_discount"] = (subtotal / 10).quantize(CENT)
    tables["orders"].extend(lines)
    return subtotal - (lines[0]["line_discount"] or 0), lines


def _flaws(prefix: str, span: Span, tables: dict[str, list[dict[str, Any]]], expected: Expected,
           file_format: str) -> None:
    """One wrong row (or order) per reason, none of which changes the expected figures. Parquet's
    typed columns hold neither a wrong date nor a malformed row."""
    day = span.start + (span.end - span.start) / 2
    if file_format != "parquet":  # a typed timestamp column holds no wrong dates
        customer = dict(tables["customers"][0], customer_no=f"{prefix}-bad-date", card_no=f"LC-{prefix}-bad-date",
                        registered="31.02.2019 10:00:00" if file_format == "csv" else "2019-02-31T10:00:00+01:00")
        tables["customers"].append(customer)
        expected.rejected["unparseable_date"] += 1
    base = {"customer_no": f"{prefix}-000000", "date": day, "store": "store-ams-01", "article": "gro-0001",
            "group": "grocery", "qty": 1, "price": Decimal("2.50"), "line_discount": None, "currency": "EUR",
            "payment": "card"}
    tables["orders"] += [dict(base, order_no="O-negative"), dict(base, order_no="O-negative", qty=-1),
                         dict(base, order_no="O-negative", article="gro-0002")]
    expected.rejected.update({"negative_quantity": 1, "order_rejected": 2})
    tables["orders"].append(dict(base, order_no="O-nobody", customer_no=None))
    expected.rejected["missing_customer"] += 1
    tables["orders"].append(dict(base, order_no="O-money", currency="XXX"))
    expected.rejected["unknown_currency"] += 1
    tables["refunds"].append({"refund_no": "R-cents", "order_no": "O-x", "customer_no": f"{prefix}-000000",
                              "date": day, "amount": {"csv": "1,005", "jsonl": "1.005", "parquet": 1.005}[file_format],
                              "currency": "EUR", "reason": None})
    expected.rejected["too_many_decimals"] += 1
    tables["points"].append({"customer_no": f"{prefix}-zero", "balance": 0})
    expected.rejected["zero_points"] += 1
    if file_format != "parquet":
        tables["orders"].append({"malformed": True})
        expected.rejected["malformed_row"] += 1


def _extension(file_format: str) -> str:
    return {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}[file_format]


def _mapping(import_id: str, span: Span, file_format: str) -> str:
    head = (f'[import]\nid = "{import_id}"\nas_of = {span.as_of}\ntimezone = "Europe/Berlin"\ncurrency = "EUR"\n'
            'currencies = ["CHF"]\nchannel = "pos"\n')
    if file_format == "csv":
        head += CSV_FORMATS
    return head + MAPPING_COLUMNS.format(ext=_extension(file_format))


def _write(path: Path, kind: str, records: list[dict[str, Any]], file_format: str) -> None:
    columns = COLUMNS[kind]
    if file_format == "csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter=";")
            writer.writerow(columns)
            for record in records:
                if record.get("malformed"):
                    writer.writerow(["only", "two"])
                else:
                    writer.writerow([_german(record.get(column)) for column in columns])
    elif file_format == "jsonl":
        with open(path, "wb") as handle:
            for record in records:
                handle.write(b"{not json\n" if record.get("malformed") else
                             orjson.dumps({column: _json(record.get(column)) for column in columns}) + b"\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{column: _typed(record.get(column)) for column in columns} for record in records]
        pq.write_table(pa.Table.from_pylist(rows), path)


def _german(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "ja" if value else "nein"
    if isinstance(value, datetime):
        return value.strftime("%d.%m.%Y %H:%M:%S")
    if hasattr(value, "strftime"):
        return value.strftime("%d.%m.%Y")
    if isinstance(value, Decimal):
        whole, cents = f"{value:,.2f}".split(".")
        return f"{whole.replace(',', '.')},{cents}"
    return str(value)


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=ZONE).isoformat()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def _typed(value: Any) -> Any:
    """Parquet columns of one type each: amounts as floats, as exports from data frames have them."""
    return float(value) if isinstance(value, Decimal) else value
