"""What the worker keeps per customer for churn: the purchase history the indicators and the score
need beyond the profile, the alerts open now, and what keeps an expired alert from opening again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streams.loyalty.calendar import DAY_MS

# Purchases kept for the median gap: enough for a stable median, bounded for state size.
KEPT_PURCHASES = 25


@dataclass(slots=True)
class OpenAlert:
    alert_id: str
    version: int
    opened_ms: int
    severity: str
    codes: list[str]

    def to_list(self) -> list[Any]:
        return [self.alert_id, self.version, self.opened_ms, self.severity, self.codes]


@dataclass(slots=True)
class ChurnState:
    # Start of each UTC day with a purchase (the latest KEPT_PURCHASES), the first ever, and how
    # many distinct days in all: the BG/NBD inputs and the typical gap between purchases.
    purchase_days: list[int] = field(default_factory=list)
    first_purchase_ms: int | None = None
    last_purchase_ms: int | None = None
    purchase_day_count: int = 0
    # Alert type -> the open alert; alerts ever opened (numbers the next alert id).
    open: dict[str, OpenAlert] = field(default_factory=dict)
    opened_count: int = 0
    # Alert type -> reason codes present when its alert expired: they raise no new alert until
    # they have all cleared, so that a customer who stays away is not alerted over and over.
    quiet: dict[str, list[str]] = field(default_factory=dict)
    # When the churn score was last computed (to refresh it as time passes).
    scored_ms: int | None = None
    # Alert type -> when its last alert closed, kept while the cool-down of the rules in force for
    # the type (reopen_after_days) runs: no new alert of the type opens before it has passed.
    closed: dict[str, int] = field(default_factory=dict)

    def record_purchase(self, occurred_ms: int) -> None:
        day = occurred_ms - occurred_ms % DAY_MS
        self.first_purchase_ms = occurred_ms if self.first_purchase_ms is None else min(self.first_purchase_ms, occurred_ms)
        self.last_purchase_ms = occurred_ms if self.last_purchase_ms is None else max(self.last_purchase_ms, occurred_ms)
        if day in self.purchase_days:
            return
        self.purchase_day_count += 1
        self.purchase_days = sorted([*self.purchase_days, day])[-KEPT_PURCHASES:]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.purchase_day_count:
            data.update(days=self.purchase_days, first=self.first_purchase_ms, last=self.last_purchase_ms,
                        count=self.purchase_day_count)
        if self.open:
            data["open"] = {kind: alert.to_list() for kind, alert in self.open.items()}
        if self.opened_count:
            data["opened"] = self.opened_count
        if self.quiet:
            data["quiet"] = self.quiet
        if self.scored_ms is not None:
            data["scored"] = self.scored_ms
        if self.closed:
            data["closed"] = self.closed
        return data

    def copy(self) -> ChurnState:
        """A working copy that the churn fold may change in place (it does) without touching this one."""
        return ChurnState(list(self.purchase_days), self.first_purchase_ms, self.last_purchase_ms,
                          self.purchase_day_count,
                          {kind: OpenAlert(a.alert_id, a.version, a.opened_ms, a.severity, list(a.codes))
                           for kind, a in self.open.items()},
                          self.opened_count, {kind: list(codes) for kind, codes in self.quiet.items()}, self.scored_ms,
                          dict(self.closed))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ChurnState:
        if not data:
            return cls()
        return cls(data.get("days", []), data.get("first"), data.get("last"), data.get("count", 0),
                   {kind: OpenAlert(*values) for kind, values in data.get("open", {}).items()},
                   data.get("opened", 0), data.get("quiet", {}), data.get("scored"), data.get("closed", {}))
