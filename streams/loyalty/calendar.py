"""Calendar arithmetic on epoch milliseconds, in a rules timezone. The ledger keeps time as
integer milliseconds of event time (never a clock reading)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

DAY_MS = 86_400_000
PERIOD_MONTHS = {"month": 1, "monthly": 1, "quarter": 3, "quarterly": 3, "year": 12, "yearly": 12}


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(millis: int, zone: ZoneInfo | None = None) -> datetime:
    moment = datetime.fromtimestamp(millis / 1000, UTC)
    return moment.astimezone(zone) if zone else moment


# The calendar functions below are pure, and folds ask the same questions over and over (a tier
# review walks the same month starts for every member; a balance and its pruning both ask for the
# start of the qualifying window): remembered per process, bounded.
@lru_cache(maxsize=4096)
def add_months(millis: int, months: int, zone: ZoneInfo) -> int:
    """The same local wall-clock time `months` later (clamped to the month's last day)."""
    local = from_ms(millis, zone)
    total = local.year * 12 + local.month - 1 + months
    year, month = divmod(total, 12)
    day = min(local.day, calendar.monthrange(year, month + 1)[1])
    return to_ms(local.replace(year=year, month=month + 1, day=day))


@lru_cache(maxsize=4096)
def period_start_after(millis: int, period: str, zone: ZoneInfo) -> int:
    """The first local midnight that starts a calendar month/quarter/year strictly after `millis`."""
    step = PERIOD_MONTHS[period]
    local = from_ms(millis, zone)
    index = (local.year * 12 + local.month - 1) // step * step + step
    year, month = divmod(index, 12)
    return to_ms(datetime(year, month + 1, 1, tzinfo=zone))


@lru_cache(maxsize=1024)
def month_start(year: int, month: int, zone: ZoneInfo) -> int:
    return to_ms(datetime(year, month, 1, tzinfo=zone))


def local_day(millis: int, zone: ZoneInfo) -> str:
    return from_ms(millis, zone).date().isoformat()


def day_start(millis: int, zone: ZoneInfo) -> int:
    local = from_ms(millis, zone)
    return to_ms(datetime(local.year, local.month, local.day, tzinfo=zone))
