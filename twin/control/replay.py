"""``twin plan --replay 24h``: what a changed scene would have done over stored history.

For every Scene the plan creates or updates, the readings its triggers and conditions look
at (every point of every device it names) are read back from the time-series store over the
window and fed, in time order, to the scene engine on a virtual clock (the same engine as
``twin simulate``: nothing is sent to any device). For an updated scene the current version
is replayed over the same readings too, so the report shows the difference (fired N times
before, M after; the commands each would have sent).

Only readings are replayed: status changes and alarms are not in the time-series store, so
``status``/``alarm`` triggers do not fire (the report says so when a scene has them).
Schedule triggers fire on the virtual clock as they would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from twin.control.simulate import Scenario, ScenarioEvent, SimulationReport, simulate

Specs = Mapping[tuple[str, str], Mapping[str, Any]]

MAX_EVENTS = 2_000_000
"""A replay reads at most this many readings (a larger window is refused with a hint)."""


@dataclass
class SceneReplay:
    scene: str
    action: str  # create | update
    after: SimulationReport
    before: SimulationReport | None = None
    unreplayed_triggers: list[str] = field(default_factory=list)


@dataclass
class ReplayReport:
    start: float
    end: float
    readings: int
    series: int
    scenes: list[SceneReplay]


def _walk(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def referenced_devices(scene_doc: Mapping[str, Any]) -> set[str]:
    """Every device a scene's triggers and conditions name."""
    spec = scene_doc.get("spec") or {}
    out: set[str] = set()
    for part in ("triggers", "conditions"):
        for node in _walk(spec.get(part)):
            dev = node.get("device")
            if isinstance(dev, str):
                out.add(dev)
    return out


def _unreplayed(scene_doc: Mapping[str, Any]) -> list[str]:
    kinds = []
    for t in (scene_doc.get("spec") or {}).get("triggers") or []:
        if isinstance(t, Mapping) and t.get("type") in ("status", "alarm"):
            kinds.append(str(t["type"]))
    return sorted(set(kinds))


def _value(kind: int, value: Any, value_str: Any) -> Any:
    if kind == 1:
        return bool(value)
    if kind == 2:
        return value_str
    if value is not None and math.isfinite(value) and float(value).is_integer():
        return int(value) if abs(value) < 2**53 else value
    return value


def read_events(
    store: Any, devices: Iterable[str], start: float, end: float
) -> tuple[list[ScenarioEvent], int]:
    """The readings of ``devices`` in [start, end) as scenario events, in time order;
    and the number of series they came from."""
    from twin.errors import TwinError
    from twin.timeseries.base import Selector

    devs = sorted(set(devices))
    if not devs:
        return [], 0
    table = store.read_raw(Selector.of(devices=devs), start, end, limit=MAX_EVENTS + 1)
    if table.num_rows > MAX_EVENTS:
        raise TwinError(
            f"replay window holds more than {MAX_EVENTS:,} readings of the scenes' devices",
            hint="use a shorter --replay window",
        )
    cols = table.to_pydict()
    rows = sorted(
        zip(
            (t.timestamp() for t in cols["ts"]),
            cols["device"],
            cols["metric"],
            cols["kind"],
            cols["value"],
            cols["value_str"],
            strict=True,
        ),
        key=lambda r: r[0],
    )
    events = [
        ScenarioEvent(
            ts - start,
            {"kind": "reading", "device": dev, "point": metric, "value": _value(k, v, vs)},
        )
        for ts, dev, metric, k, v, vs in rows
    ]
    return events, len({(r[1], r[2]) for r in rows})


def _only_scene(specs: Specs, scene: str, doc: Mapping[str, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {k: v for k, v in specs.items() if k[0] != "Scene"}
    out[("Scene", scene)] = doc
    return out


def replay(
    current: Specs,
    desired: Specs,
    changes: Iterable[tuple[str, str]],
    store: Any,
    start: float,
    end: float,
) -> ReplayReport:
    """Replay each changed scene (``changes``: (action, scene name)) alone over the stored
    readings of [start, end): the desired version, and the current one for updates."""
    changed = [(a, n) for a, n in changes if ("Scene", n) in desired]
    devices: set[str] = set()
    for _a, name in changed:
        devices |= referenced_devices(desired[("Scene", name)])
        if ("Scene", name) in current:
            devices |= referenced_devices(current[("Scene", name)])
    events, series = read_events(store, devices, start, end)
    last = events[-1].at if events else 0.0
    scenario = Scenario(start=start, events=events, duration=max(0.0, end - start - last))
    out = []
    for action, name in changed:
        doc = desired[("Scene", name)]
        after = simulate(_only_scene(desired, name, doc), scenario)
        before = None
        if action == "update" and ("Scene", name) in current:
            before = simulate(_only_scene(current, name, current[("Scene", name)]), scenario)
        out.append(SceneReplay(name, action, after, before, _unreplayed(doc)))
    return ReplayReport(start, end, len(events), series, out)


def _actions(report: SimulationReport) -> list[str]:
    lines = []
    for w in report.writes:
        lines.append(f"{w.device}.{w.target} = {w.value!r}")
    return lines


def format_replay(report: ReplayReport, *, tz: str = "UTC", limit: int = 20) -> list[str]:
    """Human lines: per scene, how often it fired and what it would have sent."""
    import datetime as dt

    from twin.control.cron import tzinfo

    zone = tzinfo(tz)

    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, zone).strftime("%Y-%m-%d %H:%M:%S")

    out = [
        f"Replay over {when(report.start)} → {when(report.end)} ({tz}): "
        f"{report.readings:,} stored readings of {report.series} series"
    ]
    if not report.scenes:
        out.append("  no scene created or changed")
    for s in report.scenes:
        fired = sum(s.after.fired.values())
        head = f"  {'+' if s.action == 'create' else '~'} Scene {s.scene}: would have fired {fired}x"
        if s.before is not None:
            head += f" (current version: {sum(s.before.fired.values())}x)"
        out.append(head)
        writes = s.after.writes
        for w in writes[:limit]:
            out.append(f"      {when(w.at)}  {w.device}.{w.target} = {w.value!r}")
        if len(writes) > limit:
            out.append(f"      … {len(writes) - limit} more")
        if s.before is not None and _actions(s.before) != _actions(s.after):
            out.append(
                f"      current version would have sent {len(s.before.writes)} "
                f"command(s)/write(s), this one {len(writes)}"
            )
        for c in s.after.conflicts:
            out.append(f"      ⚠ {c}")
        for loop in s.after.loops:
            out.append(f"      ⚠ {loop}")
        if s.unreplayed_triggers:
            out.append(
                f"      note: {', '.join(s.unreplayed_triggers)} triggers are not replayed "
                "(only readings are stored)"
            )
    return out


def replay_json(report: ReplayReport) -> dict[str, Any]:
    return {
        "start": report.start,
        "end": report.end,
        "readings": report.readings,
        "series": report.series,
        "scenes": [
            {
                "scene": s.scene,
                "action": s.action,
                "fired": sum(s.after.fired.values()),
                "writes": [w.__dict__ for w in s.after.writes],
                "before": None
                if s.before is None
                else {
                    "fired": sum(s.before.fired.values()),
                    "writes": [w.__dict__ for w in s.before.writes],
                },
                "unreplayed_triggers": s.unreplayed_triggers,
            }
            for s in report.scenes
        ],
    }
