"""Segment rules: the thresholds behind each segment, versioned by event time like the loyalty
rules (streams/loyalty/rules.py), validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from streams.versioned_rules import Rules, RulesVersionBase, VersionedRules, load_toml

Days = Annotated[int, Field(gt=0)]


class Lifecycle(Rules):
    new_days: Days = 30
    active_days: Days = 90
    lost_days: Days = 180

    @model_validator(mode="after")
    def _lost_after_active(self) -> Lifecycle:
        if self.lost_days <= self.active_days:
            raise ValueError("lost_days must be longer than active_days")
        return self


class SegmentRulesVersion(RulesVersionBase):
    lifecycle: Lifecycle = Lifecycle()


class SegmentRules(VersionedRules[SegmentRulesVersion]):
    """Every segment rules version, oldest first."""


def load_segment_rules(path: Path) -> SegmentRules:
    """The segment rules in `path`; raises ValueError naming the file and every invalid field."""
    return load_toml(SegmentRules, path, "segment rules")
