"""Which alerts a webhook subscription or a live stream wants. Every criterion that is empty means
"any"; criteria that are set must all hold (and within one criterion, any listed value will do)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas.alerts import SEVERITY_ORDER, AlertChange, AlertType

_RANK = {severity.value: rank for rank, severity in enumerate(SEVERITY_ORDER)}


@dataclass(frozen=True)
class Filters:
    types: frozenset[str] = field(default_factory=frozenset)        # alert types (schemas.alerts.AlertType)
    min_severity: str | None = None                                   # this severity or a higher one
    stores: frozenset[str] = field(default_factory=frozenset)       # the record's store_id
    segments: frozenset[str] = field(default_factory=frozenset)     # "value_tier:high", or bare "high"

    @classmethod
    def build(cls, types: Iterable[str] = (), min_severity: str | None = None, stores: Iterable[str] = (),
              segments: Iterable[str] = ()) -> Filters:
        """Filters from user input; ValueError names what is not a known type or severity."""
        types = frozenset(str(t).strip() for t in types if str(t).strip())
        unknown = sorted(types - {t.value for t in AlertType})
        if unknown:
            raise ValueError(f"unknown alert type {unknown}; known: {', '.join(t.value for t in AlertType)}")
        if min_severity is not None:
            min_severity = str(min_severity).strip() or None
        if min_severity is not None and min_severity not in _RANK:
            raise ValueError(f"unknown severity {min_severity!r}; known, lowest first: "
                             f"{', '.join(s.value for s in SEVERITY_ORDER)}")
        return cls(types, min_severity, frozenset(s.strip() for s in stores if s.strip()),
                   frozenset(s.strip() for s in segments if s.strip()))

    def matches(self, alert: AlertChange) -> bool:
        if self.types and alert.alert_type.value not in self.types:
            return False
        if self.min_severity and _RANK[alert.severity.value] < _RANK[self.min_severity]:
            return False
        if self.stores and alert.store_id not in self.stores:
            return False
        if self.segments:
            # A record's segments read "dimension:segment"; a subscriber may name either the whole
            # thing or just the segment ("champions" for "rfm:champions").
            names = set(alert.segments) | {s.partition(":")[2] for s in alert.segments if ":" in s}
            if not self.segments & names:
                return False
        return True

    @property
    def empty(self) -> bool:
        return not (self.types or self.min_severity or self.stores or self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {"types": sorted(self.types), "min_severity": self.min_severity, "stores": sorted(self.stores),
                "segments": sorted(self.segments)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Filters:
        return cls.build(data.get("types") or (), data.get("min_severity"), data.get("stores") or (),
                         data.get("segments") or ())
