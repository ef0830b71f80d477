"""What every rules file shares: versions by event time, strict validation, TOML loading.

A rules file holds every version the business ever ran, each with the event time it took effect
from. A fold picks the version in force at each event's time, so a replay after a rules change
still reproduces history: old versions stay in the file (they are never edited, only superseded).
Validated at start-up; an invalid file stops the worker with the field that is wrong."""

import tomllib
from bisect import bisect_right
from functools import cached_property
from pathlib import Path
from typing import Annotated, Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator


class Rules(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RulesVersionBase(Rules):
    version: Annotated[str, Field(min_length=1, max_length=50)]
    effective_from: AwareDatetime


V = TypeVar("V", bound=RulesVersionBase)
M = TypeVar("M", bound=BaseModel)


class VersionedRules(Rules, Generic[V]):
    """Every version, oldest first; `at_ms(millis)` is the version in force at that event time."""

    versions: Annotated[list[V], Field(min_length=1)]

    @field_validator("versions")
    @classmethod
    def _ordered(cls, versions: list[V]) -> list[V]:
        starts = [v.effective_from for v in versions]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError("versions must be in strictly increasing effective_from order")
        if len({v.version for v in versions}) != len(versions):
            raise ValueError("version names must be unique")
        return versions

    @cached_property
    def _starts_ms(self) -> list[int]:
        return [int(version.effective_from.timestamp() * 1000) for version in self.versions]

    def at_ms(self, millis: int) -> V:
        """The version in force at `millis` (epoch milliseconds): the last one that started at or
        before it, else the first. Folds call this several times per step: a binary search over
        the strictly increasing starts (validated above)."""
        versions = self.versions
        if len(versions) == 1:
            return versions[0]
        return versions[max(bisect_right(self._starts_ms, millis) - 1, 0)]


def load_toml(model: type[M], path: Path, what: str) -> M:
    """The rules in `path`; raises ValueError naming `what`, the file and every invalid field."""
    try:
        with open(path, "rb") as handle:
            return model.model_validate(tomllib.load(handle))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ValueError(f"{what} {path}: {exc}") from exc
