"""Every rules file the worker folds with, loaded and validated together at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from streams.churn.rules import ChurnRules, load_churn_rules
from streams.config import Settings
from streams.loyalty.rules import RulesBook, load_rules
from streams.segments.rules import SegmentRules, load_segment_rules


@dataclass(frozen=True)
class Rulebooks:
    loyalty: RulesBook
    segments: SegmentRules
    churn: ChurnRules


def load_rulebooks(config: Settings) -> Rulebooks:
    return Rulebooks(load_rules(config.loyalty_rules), load_segment_rules(config.segment_rules),
                     load_churn_rules(config.churn_rules))
