"""Scene conditions: classes with a load-time ``build`` and a run-time ``test``, in a dict.

```yaml
- {type: numeric, device: temp_sensor_01, point: temperature, above: 25, below: 40}
- {type: numeric, device: temp_sensor_01, point: temperature, operator: ">=", value: 30}
- {type: state, device: fan_01, point: power, value: true}       # or `in: [..]`
- {type: state, device: fan_01, status: online}                   # the device's status
- {type: time, after: "07:00", before: "19:00", weekdays: [mon, tue, wed, thu, fri]}
- {type: weekday, days: [sat, sun]}
- {type: and | or, conditions: [...]}
- {type: not, conditions: [...]}                                  # none of them holds
- {type: plugin, plugin: comfort, inputs: {t: {device: d1, point: temperature}}}
```
A ``plugin`` condition asks a Plugin (role ``condition``, twin/plugins) with
``{"inputs": {alias: value}, "trigger": ..., "now": ISO time}``; a plugin that fails (trap,
fuel, timeout, ...) is counted and the condition is false.
Times and weekdays are in the scene's site time zone.
"""

from __future__ import annotations

import datetime as dt
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from twin.errors import TwinError
from twin.plugins import registry as plugins


class SceneDefinitionError(TwinError):
    """A scene is malformed (the schema normally catches this first)."""


_Built = TypeVar("_Built")


def build_typed(
    factories: Mapping[str, Callable[[Mapping[str, Any]], _Built]],
    spec: Mapping[str, Any],
    what: str,
) -> _Built:
    """Build ``spec`` (a condition or action) with the factory its ``type`` names."""
    kind = spec.get("type")
    factory = factories.get(str(kind))
    if factory is None:
        raise SceneDefinitionError(f"unknown {what} type {kind!r}")
    return factory(spec)


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def is_number(v: Any) -> bool:
    return (
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and not (isinstance(v, float) and math.isnan(v))
    )


def compare(op: str, left: Any, right: Any) -> bool:
    """``left OP right``; ordering operators need two numbers, else they are False."""
    if op in ("==", "!="):
        same = _equal(left, right)
        return same if op == "==" else not same
    if not (is_number(left) and is_number(right)):
        return False
    return bool(OPERATORS[op](left, right))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


class StateView(Protocol):
    def value(self, device: str, point: str) -> Any: ...

    def status(self, device: str) -> str | None: ...

    def local_now(self) -> dt.datetime: ...


@dataclass
class Evaluation:
    """Each condition's result, for the trace."""

    path: str
    type: str
    result: bool
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.type, "result": self.result, **self.detail}


class Condition:
    type: ClassVar[str]

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        raise NotImplementedError

    def check(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        return self.test(s, out, path)

    def devices(self) -> set[str]:
        return set()


def _record(
    out: list[Evaluation] | None, path: str, type_: str, result: bool, **detail: Any
) -> bool:
    if out is not None:
        out.append(Evaluation(path, type_, result, detail))
    return result


@dataclass
class Numeric(Condition):
    type: ClassVar[str] = "numeric"
    device: str
    point: str
    tests: tuple[tuple[str, float], ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Numeric:
        tests: list[tuple[str, float]] = []
        if "above" in spec:
            tests.append((">", spec["above"]))
        if "below" in spec:
            tests.append(("<", spec["below"]))
        if "operator" in spec:
            tests.append((spec["operator"], spec["value"]))
        if not tests:
            raise SceneDefinitionError("numeric: give above, below or operator + value")
        return cls(spec["device"], spec["point"], tuple(tests))

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        value = s.value(self.device, self.point)
        ok = is_number(value) and all(compare(op, value, v) for op, v in self.tests)
        return _record(out, path, self.type, ok, device=self.device, point=self.point, value=value)

    def devices(self) -> set[str]:
        return {self.device}


_MISSING = object()


@dataclass
class State(Condition):
    type: ClassVar[str] = "state"
    device: str
    point: str | None
    values: tuple[Any, ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> State:
        if "status" in spec:
            status = spec["status"]
            vals = tuple(status) if isinstance(status, list) else (status,)
            return cls(spec["device"], None, vals)
        if "in" in spec:
            return cls(spec["device"], spec["point"], tuple(spec["in"]))
        return cls(spec["device"], spec["point"], (spec["value"],))

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        if self.point is None:
            have: Any = s.status(self.device)
        else:
            have = s.value(self.device, self.point)
        ok = any(_equal(have, v) for v in self.values)
        what = {"status": have} if self.point is None else {"point": self.point, "value": have}
        return _record(out, path, self.type, ok, device=self.device, **what)

    def devices(self) -> set[str]:
        return {self.device}


def parse_clock(text: str) -> dt.time:
    parts = [int(p) for p in str(text).split(":")]
    while len(parts) < 3:
        parts.append(0)
    return dt.time(parts[0], parts[1], parts[2])


def in_window(now: dt.time, after: dt.time | None, before: dt.time | None) -> bool:
    """``after <= now < before``; a window with after > before wraps midnight."""
    if after is None and before is None:
        return True
    if after is None:
        return now < before  # type: ignore[operator]
    if before is None:
        return now >= after
    if after <= before:
        return after <= now < before
    return now >= after or now < before


@dataclass
class Time(Condition):
    type: ClassVar[str] = "time"
    after: dt.time | None
    before: dt.time | None
    weekdays: frozenset[int] | None

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Time:
        days = spec.get("weekdays")
        return cls(
            parse_clock(spec["after"]) if "after" in spec else None,
            parse_clock(spec["before"]) if "before" in spec else None,
            None if days is None else frozenset(WEEKDAYS.index(d) for d in days),
        )

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        now = s.local_now()
        ok = in_window(now.time(), self.after, self.before) and (
            self.weekdays is None or now.weekday() in self.weekdays
        )
        return _record(out, path, self.type, ok, local_time=now.isoformat(timespec="seconds"))


@dataclass
class Weekday(Condition):
    type: ClassVar[str] = "weekday"
    days: frozenset[int]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Weekday:
        return cls(frozenset(WEEKDAYS.index(d) for d in spec["days"]))

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        now = s.local_now()
        return _record(
            out, path, self.type, now.weekday() in self.days, weekday=WEEKDAYS[now.weekday()]
        )


@dataclass
class And(Condition):
    type: ClassVar[str] = "and"
    children: tuple[Condition, ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Condition:
        return cls(tuple(build_condition(c) for c in spec["conditions"]))

    def _results(self, s: StateView, out: list[Evaluation] | None, path: str) -> list[bool]:
        return [c.check(s, out, f"{path}/{i}") for i, c in enumerate(self.children)]

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        return _record(out, path, self.type, all(self._results(s, out, path)))

    def devices(self) -> set[str]:
        return set().union(*(c.devices() for c in self.children)) if self.children else set()


@dataclass
class Or(And):
    type: ClassVar[str] = "or"

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        return _record(out, path, self.type, any(self._results(s, out, path)))


@dataclass
class Not(And):
    type: ClassVar[str] = "not"

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        return _record(out, path, self.type, not any(self._results(s, out, path)))


def plugin_input(s: StateView, inputs: tuple[tuple[str, str, str], ...]) -> dict[str, Any]:
    """What a plugin step gets: its inputs' current values, the run's trigger, local time."""
    return {
        "inputs": {alias: s.value(device, point) for alias, device, point in inputs},
        "trigger": getattr(s, "trigger", None),
        "now": s.local_now().isoformat(),
    }


def _inputs(spec: Mapping[str, Any]) -> tuple[tuple[str, str, str], ...]:
    return tuple((str(a), str(r["device"]), str(r["point"]))
                 for a, r in (spec.get("inputs") or {}).items())


@dataclass
class PluginCondition(Condition):
    type: ClassVar[str] = "plugin"
    plugin: str
    inputs: tuple[tuple[str, str, str], ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> PluginCondition:
        return cls(str(spec["plugin"]), _inputs(spec))

    def test(self, s: StateView, out: list[Evaluation] | None, path: str) -> bool:
        doc = plugin_input(s, self.inputs)
        result = plugins.condition(self.plugin, [doc])
        ok = bool(result and result[0])
        return _record(out, path, self.type, ok, plugin=self.plugin, inputs=doc["inputs"],
                       failed=result is None)

    def devices(self) -> set[str]:
        return {d for _, d, _ in self.inputs}


CONDITIONS: dict[str, Callable[[Mapping[str, Any]], Condition]] = {
    "numeric": Numeric.build,
    "state": State.build,
    "time": Time.build,
    "weekday": Weekday.build,
    "and": And.build,
    "or": Or.build,
    "not": Not.build,
    "plugin": PluginCondition.build,
}


def build_condition(spec: Mapping[str, Any]) -> Condition:
    return build_typed(CONDITIONS, spec, "condition")


def build_conditions(specs: Any) -> tuple[Condition, ...]:
    if isinstance(specs, Mapping):
        specs = [specs]
    return tuple(build_condition(c) for c in specs or [])


def check_all(
    conds: tuple[Condition, ...], s: StateView, out: list[Evaluation] | None, prefix: str
) -> bool:
    """Every condition must hold (all are evaluated, for the trace)."""
    results = [c.check(s, out, f"{prefix}/{i}") for i, c in enumerate(conds)]
    return all(results)
