"""Value generators for simulated points: pure functions of elapsed time and an RNG.

``make_generator(options)`` turns a validated ``points.<name>`` block of the sim binding into a
:class:`PointGenerator`; ``gen.value(t)`` is the value ``t`` seconds after the device started.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twin.spec.units import parse_duration

WAVES = ("sine", "random_walk", "constant", "step", "square", "sawtooth", "toggle", "counter")


@dataclass
class PointGenerator:
    wave: str
    min: float = 0.0
    max: float = 1.0
    period: float = 600.0
    value_: Any = None
    values: list[Any] = field(default_factory=list)
    step: float | None = None
    noise: float = 0.0
    decimals: int | None = None
    kind: str = "number"  # number | integer | boolean | string
    rng: random.Random = field(default_factory=random.Random)
    _walk: float | None = None

    def value(self, t: float) -> Any:
        v = self._raw(t)
        if isinstance(v, int | float) and not isinstance(v, bool):
            if self.noise:
                v = v + self.rng.gauss(0.0, self.noise)
            if self.kind == "integer":
                return round(v)
            if self.kind == "boolean":
                return v >= (self.min + self.max) / 2
            if self.decimals is not None:
                return round(v, self.decimals)
        return v

    def _raw(self, t: float) -> Any:
        span = self.max - self.min
        if self.wave == "constant":
            return self.value_ if self.value_ is not None else self.min
        if self.wave == "sine":
            mid = self.min + span / 2
            return mid + span / 2 * math.sin(2 * math.pi * t / self.period)
        if self.wave == "sawtooth":
            return self.min + span * ((t % self.period) / self.period)
        if self.wave == "counter":
            step = self.step if self.step is not None else 1.0
            return self.min + step * math.floor(t / self.period)
        if self.wave == "toggle":
            return int(t // self.period) % 2 == 1
        if self.wave == "square":
            return self.max if int(t // (self.period / 2)) % 2 else self.min
        if self.wave == "step":
            if self.values:
                return self.values[int(t // self.period) % len(self.values)]
            return self.max if int(t // (self.period / 2)) % 2 else self.min
        if self.wave == "random_walk":
            if self._walk is None:
                self._walk = self.value_ if self.value_ is not None else self.min + span / 2
            step = self.step if self.step is not None else span / 20 or 1.0
            self._walk = min(self.max, max(self.min, self._walk + self.rng.uniform(-step, step)))
            return self._walk
        raise ValueError(f"unknown wave {self.wave!r}")


def make_generator(options: Mapping[str, Any], rng: random.Random | None = None) -> PointGenerator:
    wave = str(options.get("wave", "constant"))
    if wave not in WAVES:
        raise ValueError(f"unknown wave {wave!r} (use one of {', '.join(WAVES)})")
    lo = float(options.get("min", 0.0))
    hi = float(options.get("max", lo + 1.0 if "min" in options else 1.0))
    return PointGenerator(
        wave=wave,
        min=lo,
        max=hi,
        period=parse_duration(options.get("period", "10m")) or 1.0,
        value_=options.get("value", options.get("start")),
        values=list(options.get("values", [])),
        step=float(options["step"]) if "step" in options else None,
        noise=float(options.get("noise", 0.0)),
        decimals=options.get("decimals"),
        kind=str(options.get("type", "number")),
        rng=rng or random.Random(),
    )
