"""Per-key rate limits: a token bucket per API key, refilled at the key's rate up to its burst. A
request costs one token per event; when the bucket is short, the answer is 429 with the seconds
until it would have enough (Retry-After)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key_id: str, cost: int, rate: float, burst: int) -> int:
        """0 when the request may go ahead (its tokens taken), else the seconds to wait."""
        now = self._clock()
        bucket = self._buckets.setdefault(key_id, _Bucket(float(burst), now))
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0
        return max(1, math.ceil((cost - bucket.tokens) / rate))
