"""Twin state: per device, reported (value, ts, quality), desired, delta, last_seen, status.

``desired`` is the effective desired state: the spec's ``desired`` with the runtime overrides
(scenes, commands, operators; twin/registry/overrides.py) on top; ``overrides`` says which
values are runtime ones, who set them and when.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from twin.bindings.base import Quality


class Status(enum.StrEnum):
    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"
    FAULT = "fault"
    MAINTENANCE = "maintenance"


@dataclass(slots=True)
class ReportedValue:
    value: Any
    ts: float
    quality: Quality = Quality.GOOD

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "ts": self.ts, "quality": str(self.quality)}


@dataclass
class DeviceMetrics:
    """Lifetime counters; the flusher persists per-window differences."""

    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    errors: int = 0
    last_latency: float | None = None  # seconds, receipt - device timestamp
    # uptime accounting over the current window (monotonic seconds)
    window_start: float = 0.0
    online_seconds: float = 0.0
    online_since: float | None = None
    # snapshot at the start of the window
    base: tuple[int, int, int, int] = (0, 0, 0, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "errors": self.errors,
            "last_latency_ms": None if self.last_latency is None else self.last_latency * 1000,
        }


def values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return bool(a == b)


@dataclass
class DeviceTwin:
    name: str
    site: str = ""
    groups: tuple[str, ...] = ()  # the device's group and its ancestors, nearest first
    reported: dict[str, ReportedValue] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)  # effective: spec + overrides
    overrides: dict[str, Any] = field(default_factory=dict)  # property -> DesiredOverride
    last_seen: float | None = None
    status: Status = Status.UNKNOWN
    status_since: float | None = None
    maintenance: bool = False
    fault: str | None = None
    fault_source: str | None = None  # "device" | "binding"
    metrics: DeviceMetrics = field(default_factory=DeviceMetrics)
    binding: str = ""

    @property
    def group(self) -> str | None:
        return self.groups[0] if self.groups else None

    def delta(self) -> dict[str, Any]:
        """Desired properties whose reported value differs (or is missing)."""
        out = {}
        for key, want in self.desired.items():
            have = self.reported.get(key)
            if have is None or not values_equal(have.value, want):
                out[key] = want
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "site": self.site,
            "group": self.group,
            "status": str(self.status),
            "status_since": self.status_since,
            "last_seen": self.last_seen,
            "fault": self.fault,
            "reported": {k: v.to_json() for k, v in sorted(self.reported.items())},
            "desired": dict(sorted(self.desired.items())),
            "delta": self.delta(),
            # runtime overrides in force: {property: {value, set_by, set_at, spec_value}}
            "overrides": {k: o.to_json() for k, o in sorted(self.overrides.items())},
        }


class TwinStore:
    def __init__(self) -> None:
        self._twins: dict[str, DeviceTwin] = {}

    def __len__(self) -> int:
        return len(self._twins)

    def __contains__(self, name: object) -> bool:
        return name in self._twins

    def get(self, name: str) -> DeviceTwin | None:
        return self._twins.get(name)

    def ensure(self, name: str) -> DeviceTwin:
        twin = self._twins.get(name)
        if twin is None:
            twin = self._twins[name] = DeviceTwin(name)
        return twin

    def remove(self, name: str) -> None:
        self._twins.pop(name, None)

    def all(self) -> list[DeviceTwin]:
        return list(self._twins.values())
