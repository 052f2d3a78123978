"""Token-bucket rate limiting per key (a token's subject, a client address, a device)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"100/s"``, ``"600/m"``, optionally ``"100/s:200"`` (burst)."""
        spec, _, burst = text.partition(":")
        n, _, unit = spec.partition("/")
        per = {"s": 1.0, "m": 60.0, "h": 3600.0}[unit or "s"]
        rate = float(n) / per
        return cls(rate, float(burst) if burst else max(1.0, float(n)))


class RateLimiter:
    def __init__(
        self, rate: Rate, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.rate = rate
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated)

    def hit(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; return 0 if allowed, else seconds to wait (Retry-After)."""
        now = self.clock()
        tokens, updated = self._buckets.get(key, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + (now - updated) * self.rate.per_second)
        if tokens >= cost:
            if len(self._buckets) >= self.max_keys and key not in self._buckets:
                self._buckets.clear()  # crude but bounded
            self._buckets[key] = (tokens - cost, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if self.rate.per_second <= 0:
            return math.inf
        return (cost - tokens) / self.rate.per_second
