"""Scene triggers: classes with a load-time ``build`` and run-time methods, in a dict.

```yaml
- {type: device_data, device: temp_sensor_01, point: temperature, operator: ">", value: 30, for: 5m}
- {type: device_data, device: cam_gate_01, point: motion, operator: changed}
- {type: status, device: plc_packer_01, to: fault, from: online, for: 30s}
- {type: schedule, cron: "0 7 * * 1-5"}          # in the site's time zone
- {type: schedule, every: 15m}
- {type: alarm, event: raised, device: gw_edge_01, alarm: offline, severity: major}
- {type: manual}
```
A data or status trigger fires when its test *becomes* true (an edge, not on every reading);
with ``for:`` it fires once the test has held that long without a reading breaking it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from twin.control.conditions import SceneDefinitionError, compare
from twin.control.cron import next_fire
from twin.spec.units import parse_duration


@dataclass(eq=False)
class Trigger:
    type: ClassVar[str]
    scene: str = ""
    index: int = 0

    def describe(self) -> dict[str, Any]:
        return {"type": self.type}


@dataclass(eq=False)
class Edge(Trigger):
    """Shared run-time state of edge triggers with an optional ``for:``."""

    hold: float = 0.0
    active: bool = False  # the test holds now
    fired: bool = False  # already fired for this episode
    timer: trio.CancelScope | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.active = self.fired = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def step(self, ok: bool) -> str | None:
        """Feed the test's new result: ``fire``, ``arm`` (start the for: timer) or None."""
        if not ok:
            if self.active:
                self.reset()
            return None
        if self.active:
            return None
        self.active = True
        if self.hold > 0:
            return "arm"
        self.fired = True
        return "fire"


@dataclass(eq=False)
class DeviceData(Edge):
    type: ClassVar[str] = "device_data"
    device: str = ""
    point: str = ""
    op: str = "changed"
    value: Any = None

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> DeviceData:
        op = str(spec.get("operator", "changed" if "value" not in spec else "=="))
        if op != "changed" and "value" not in spec:
            raise SceneDefinitionError(f"device_data: operator {op!r} needs a value")
        return cls(
            device=spec["device"],
            point=spec["point"],
            op=op,
            value=spec.get("value"),
            hold=parse_duration(spec.get("for", 0)),
        )

    def test(self, value: Any) -> bool:
        return compare(self.op, value, self.value)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type,
            "device": self.device,
            "point": self.point,
            "operator": self.op,
        }
        if self.op != "changed":
            d["value"] = self.value
        if self.hold:
            d["for"] = self.hold
        return d


@dataclass(eq=False)
class StatusChange(Edge):
    type: ClassVar[str] = "status"
    device: str | None = None
    to: str | None = None
    from_: str | None = None

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> StatusChange:
        return cls(
            device=spec.get("device"),
            to=spec.get("to"),
            from_=spec.get("from"),
            hold=parse_duration(spec.get("for", 0)),
        )

    def test(self, status: str, previous: str | None) -> bool:
        if self.to is not None and status != self.to:
            return False
        return self.from_ is None or previous == self.from_ or self.active

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "device": self.device, "to": self.to, "from": self.from_}


@dataclass(eq=False)
class Schedule(Trigger):
    type: ClassVar[str] = "schedule"
    cron: str | None = None
    every: float | None = None

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Schedule:
        if ("cron" in spec) == ("every" in spec):
            raise SceneDefinitionError("schedule: give exactly one of cron or every")
        every = parse_duration(spec["every"]) if "every" in spec else None
        if every is not None and every <= 0:
            raise SceneDefinitionError("schedule: every must be positive")
        return cls(cron=spec.get("cron"), every=every)

    def next_after(self, wall: float, tz: str) -> float:
        if self.cron is not None:
            return next_fire(self.cron, wall, tz)
        assert self.every is not None
        return wall + self.every

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, **({"cron": self.cron} if self.cron else {"every": self.every})}


@dataclass(eq=False)
class AlarmEvent(Trigger):
    type: ClassVar[str] = "alarm"
    event: str = "raised"
    device: str | None = None
    alarm: str | None = None
    severity: str | None = None

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> AlarmEvent:
        return cls(
            event=spec.get("event", "raised"),
            device=spec.get("device"),
            alarm=spec.get("alarm"),
            severity=spec.get("severity"),
        )

    def matches(self, event: Mapping[str, Any]) -> bool:
        alarm = event.get("alarm") or {}
        return (
            (self.event == "any" or event.get("event") == self.event)
            and (self.device is None or event.get("device") == self.device)
            and (self.alarm is None or alarm.get("type") == self.alarm)
            and (self.severity is None or alarm.get("severity") == self.severity)
        )

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "event": self.event, "device": self.device, "alarm": self.alarm}


@dataclass(eq=False)
class Manual(Trigger):
    type: ClassVar[str] = "manual"

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Manual:
        return cls()


TRIGGERS: dict[str, Callable[[Mapping[str, Any]], Trigger]] = {
    "device_data": DeviceData.build,
    "status": StatusChange.build,
    "schedule": Schedule.build,
    "alarm": AlarmEvent.build,
    "manual": Manual.build,
}


def build_trigger(spec: Mapping[str, Any], scene: str, index: int) -> Trigger:
    kind = spec.get("type")
    factory = TRIGGERS.get(str(kind))
    if factory is None:
        raise SceneDefinitionError(f"unknown trigger type {kind!r}")
    trig = factory(spec)
    trig.scene, trig.index = scene, index
    return trig
