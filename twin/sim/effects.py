"""What a simulated point does in response to its device's (or another device's) state.

A sim point's value is its wave, then its ``effects`` in order, then an optional first-order
``response`` lag, so a simulated plant reacts to commands and desired values like a real one:

```yaml
binding:
  sim:
    points:
      current:                   # a fan's motor current: + speed * 0.04 A while it is on,
        wave: random_walk        # reached with a 5 s time constant
        min: 0.1
        max: 0.3
        effects: [{when: power, is: true, add: speed, times: 0.04}]
        response: 5s
      temperature:               # a room cooled by another device's fan
        wave: sine
        min: 22
        max: 34
        period: 10m
        effects: [{when: fan_01.power, is: true, add: -6}]
        response: 1m
      motor_rpm:                 # the wave re-centred on the setpoint; 0 when stopped
        {wave: sine, min: 1400, max: 1500, period: 2m, response: 10s,
         effects: [{follow: setpoint_rpm}, {when: mode, is: stop, set: 0}]}
```
A reference is ``property`` (this device: a value written to it, one of its points, or what it
reported) or ``device.point`` (another device's last reported value). Conditions: ``when: REF,
is: VALUE`` (equal), or ``when: REF`` alone (truthy). Actions: ``add: NUMBER | REF`` (times
``times``), ``set: VALUE``, ``follow: REF`` (shift the wave's centre ``(min+max)/2`` to REF's
value). An effect whose reference has no value yet does nothing.

The commands a device understands act through its model (``commands.<name>.sets``,
twin/spec/commands.py): the sim binding writes those properties, and effects follow them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twin.spec.units import parse_duration

_MISSING: Any = object()

Lookup = Callable[[str], Any]
"""A reference (``prop`` or ``device.point``) to its current value, None when unknown."""


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    na, nb = _num(a), _num(b)
    if na is not None and nb is not None:
        return abs(na - nb) <= 1e-9 * max(1.0, abs(na), abs(nb))
    return bool(a == b)


@dataclass(frozen=True)
class Effect:
    when: str | None = None
    is_: Any = _MISSING
    add: float | str | None = None
    times: float = 1.0
    set: Any = _MISSING
    follow: str | None = None

    def active(self, lookup: Lookup) -> bool:
        if self.when is None:
            return True
        v = lookup(self.when)
        if self.is_ is _MISSING:
            return bool(v)
        return v is not None and _equal(v, self.is_)

    def apply(self, value: Any, center: float, lookup: Lookup) -> Any:
        if not self.active(lookup):
            return value
        if self.set is not _MISSING:
            return self.set
        if self.follow is not None:
            target, now = _num(lookup(self.follow)), _num(value)
            return value if target is None or now is None else now - center + target
        if self.add is not None:
            delta = _num(lookup(self.add)) if isinstance(self.add, str) else _num(self.add)
            now = _num(value)
            return value if delta is None or now is None else now + delta * self.times
        return value


def make_effects(options: Sequence[Mapping[str, Any]] | None) -> list[Effect]:
    out = []
    for e in options or []:
        out.append(
            Effect(
                when=e.get("when"),
                is_=e.get("is", _MISSING),
                add=e.get("add"),
                times=float(e.get("times", 1.0)),
                set=e.get("set", _MISSING),
                follow=e.get("follow"),
            )
        )
    return out


@dataclass
class Response:
    """A first-order lag: the output moves toward its target with time constant ``tau``."""

    tau: float
    value: Any = None
    t: float | None = None

    def step(self, target: Any, t: float) -> Any:
        now, want = _num(self.value), _num(target)
        if self.tau <= 0 or now is None or want is None or self.t is None:
            self.value, self.t = target, t
            return target
        k = 1.0 - math.exp(-max(0.0, t - self.t) / self.tau)
        self.value, self.t = now + (want - now) * k, t  # the state stays a float
        return round(self.value) if isinstance(target, int) else self.value


def make_response(value: Any) -> Response | None:
    return None if value is None else Response(parse_duration(value))
