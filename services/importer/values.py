"""One cell of an export to one typed value, as the mapping's formats say, or a RowError naming why
it cannot be read. A cell is what the reader gave: text from CSV, and from JSON Lines or Parquet
also numbers, booleans, dates and timestamps. Empty text is no value (None).

Invariants: the same cell and format always give the same value (no clock, no locale); money has
exactly two decimal places; every moment is timezone-aware UTC."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

CENT = Decimal("0.01")
# Distinct timestamps cached per file format; order lines share their order's timestamp.
_MOMENT_CACHE_LIMIT = 200_000
# strptime directives of the numeric fields, as strptime itself matches them (_strptime.TimeRE).
_DIRECTIVES = {"%d": r"(?P<day>3[01]|[12]\d|0[1-9]|[1-9]| [1-9])", "%m": r"(?P<month>1[0-2]|0[1-9]|[1-9])",
               "%Y": r"(?P<year>\d\d\d\d)", "%H": r"(?P<hour>2[0-3]|[0-1]\d|\d)",
               "%M": r"(?P<minute>[0-5]\d|\d)", "%S": r"(?P<second>6[0-1]|[0-5]\d|\d)"}


class RowError(Exception):
    """Why a row cannot be imported: a machine-readable reason (as in the reject report) and the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Format:
    """How one file writes its values. `datetime_format` and `date_format` are "iso" or a strptime
    pattern; timestamps without an offset are in `timezone`."""
    timezone: str = "UTC"
    datetime_format: str = "iso"
    date_format: str = "iso"
    decimal_separator: str = "."
    thousands_separator: str = ""
    true_values: tuple[str, ...] = ("true", "yes", "y", "1")
    false_values: tuple[str, ...] = ("false", "no", "n", "0")
    _zone: ZoneInfo = field(init=False, repr=False)
    _moments: dict[str, datetime] = field(init=False, repr=False, default_factory=dict)
    _patterns: dict[str, re.Pattern[str] | None] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._zone = ZoneInfo(self.timezone)
        self.true_values = tuple(value.casefold() for value in self.true_values)
        self.false_values = tuple(value.casefold() for value in self.false_values)

    def __getstate__(self) -> dict[str, Any]:
        """Without its caches, which hold hundreds of kilobytes once a file was read: a Format
        crosses between processes (an import's worker sends back its tallies and rejects)."""
        return {**self.__dict__, "_moments": {}, "_patterns": {}}

    def text(self, cell: Any) -> str | None:
        """The cell as stripped text; None when empty. Whole floats lose their ".0" (a Parquet
        float column of ids), dates and timestamps are ISO 8601, other values their str()."""
        if empty(cell):
            return None
        if isinstance(cell, float) and cell.is_integer():
            cell = int(cell)
        if isinstance(cell, date):
            return cell.isoformat()
        return cell.strip() if isinstance(cell, str) else str(cell)

    def decimal(self, cell: Any, name: str) -> Decimal:
        """A number written with the file's separators, or given as a number (not a boolean)."""
        if type(cell) is not str:
            if isinstance(cell, bool) or not isinstance(cell, (int, float, Decimal)):
                raise RowError("unparseable_number", f"{name}: {cell!r} is not a number")
            number = Decimal(repr(cell)) if isinstance(cell, float) else Decimal(cell)
        else:
            written = cell.strip()
            if self.thousands_separator:
                written = written.replace(self.thousands_separator, "")
            if self.decimal_separator != ".":
                written = written.replace(self.decimal_separator, ".")
            try:
                number = Decimal(written)
            except InvalidOperation:
                raise RowError("unparseable_number", f"{name}: {cell!r} is not a number") from None
        if not number.is_finite():
            raise RowError("unparseable_number", f"{name}: {cell!r} is not a finite number")
        return number

    def money(self, cell: Any, name: str) -> Decimal:
        """A non-negative amount with exactly two decimal places (more places only if they are zeros)."""
        amount = self.decimal(cell, name)
        if amount < 0:
            raise RowError("negative_amount", f"{name}: {cell!r} is negative")
        cents = amount.quantize(CENT)
        if cents != amount:
            raise RowError("too_many_decimals", f"{name}: {cell!r} has more than two decimal places")
        return cents

    def integer(self, cell: Any, name: str) -> int:
        if type(cell) is str and cell.isascii() and cell.isdigit():
            return int(cell)  # the usual case, twenty times faster than the general one below
        if type(cell) is int:  # a JSON or Parquet integer (not a boolean, whose type is bool)
            return cell
        number = self.decimal(cell, name)
        if number != number.to_integral_value():
            raise RowError("unparseable_number", f"{name}: {cell!r} is not a whole number")
        return int(number)

    def boolean(self, cell: Any, name: str) -> bool:
        if isinstance(cell, bool):
            return cell
        written = str(cell).strip().casefold()
        if written in self.true_values:
            return True
        if written in self.false_values:
            return False
        raise RowError("unparseable_boolean", f"{name}: {cell!r} is none of {self.true_values + self.false_values}")

    def moment(self, cell: Any, name: str) -> datetime:
        """A timestamp in UTC. Naive ones (and plain dates, at midnight) are in the file's timezone."""
        if isinstance(cell, datetime):
            return self._utc(cell)
        if isinstance(cell, date):
            return self._utc(datetime.combine(cell, time()))
        written = str(cell).strip()
        found = self._moments.get(written)
        if found is None:
            found = self._utc(self._parse(written, self.datetime_format, name))
            if len(self._moments) >= _MOMENT_CACHE_LIMIT:
                self._moments.clear()
            self._moments[written] = found
        return found

    def day(self, cell: Any, name: str) -> date:
        """A calendar date (a birthday): no time, no zone."""
        if isinstance(cell, datetime):
            return cell.date()
        if isinstance(cell, date):
            return cell
        return self._parse(str(cell).strip(), self.date_format, name).date()

    def _parse(self, written: str, pattern: str, name: str) -> datetime:
        try:
            if pattern == "iso":
                return datetime.fromisoformat(written)
            if pattern not in self._patterns:
                self._patterns[pattern] = numeric_pattern(pattern)
            numeric = self._patterns[pattern]
            if numeric is None:
                return datetime.strptime(written, pattern)
            found = numeric.fullmatch(written)
            if found is None:
                raise ValueError(written)
            return datetime(**{part: int(value) for part, value in found.groupdict().items()})  # type: ignore[arg-type]
        except ValueError:
            raise RowError("unparseable_date", f"{name}: {written!r} does not match {pattern!r}") from None

    def _utc(self, moment: datetime) -> datetime:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=self._zone)
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise RowError("unparseable_date", f"{moment.isoformat()} is outside the calendar") from None


def numeric_pattern(pattern: str) -> re.Pattern[str] | None:
    """A regular expression that reads what datetime.strptime(text, pattern) reads, for patterns
    made of %d %m %Y %H %M %S (each at most once, day, month and year present) and literal text;
    None for any other pattern (strptime then reads it, ten times slower). Whitespace in the
    pattern matches any run of whitespace, as in strptime."""
    parts = re.split(r"(%.)", pattern)
    directives = [part for part in parts if part.startswith("%")]
    if (any(part not in _DIRECTIVES for part in directives) or len(set(directives)) != len(directives)
            or not {"%d", "%m", "%Y"} <= set(directives)):
        return None
    regex = "".join(_DIRECTIVES[part] if part.startswith("%") else r"\s+".join(map(re.escape, re.split(r"\s+", part)))
                    for part in parts)
    return re.compile(regex, re.IGNORECASE)


def empty(cell: Any) -> bool:
    """No value: a missing cell, blank text, or a NaN a Parquet float column may hold."""
    if cell is None:
        return True
    if isinstance(cell, str):
        return not cell.strip()
    return isinstance(cell, float) and math.isnan(cell)
