"""``twin simulate``: run the scene engine on a virtual clock over scripted telemetry.

No device is touched: commands, desired values, alarms and webhooks are validated against the
models and recorded. The report lists, in order, which scenes fired, the conditions they
evaluated and what they would have done; then conflicts (two scenes writing one property or
commanding one device differently within ``window``) and trigger loops (found statically from
the scene graph, and dynamically while running).

Scenario files:

* CSV with a header: ``time,device,point,value`` (+ optional ``kind`` column: ``reading``
  (default), ``status`` (value = the status), ``alarm`` (point = alarm type, value =
  raised/cleared), ``scene`` (device = scene name: run it by hand)). ``time`` is seconds from
  the start, a duration (``90s``, ``5m``) or an ISO timestamp.
* YAML::

    start: "2024-06-03T12:00:00+02:00"     # optional (default: now)
    duration: 30m                           # keep running after the last event (default 1h)
    events:
      - {at: 0s, device: temp_sensor_01, point: temperature, value: 29.5}
      - {at: 2m, device: plc_packer_01, status: fault}
      - {at: 3m, device: gw_edge_01, alarm: offline, event: raised, severity: major}
      - {at: 4m, scene: all-fans-max}
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from twin.control.actions import Command, RunScene, SetDesired
from twin.control.ledger import SET, Catalog
from twin.control.scenes import Scene, SceneEngine
from twin.control.triggers import DeviceData, StatusChange
from twin.errors import CommandError, TwinError
from twin.policy import doc_site
from twin.spec.units import parse_duration
from twin.spec.yamlload import load_data


class ScenarioError(TwinError):
    """A scenario file is malformed."""


@dataclass(frozen=True)
class ScenarioEvent:
    at: float  # seconds from the start
    event: dict[str, Any]


@dataclass
class Scenario:
    start: float
    events: list[ScenarioEvent]
    duration: float = 3600.0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _at(value: Any, start: float | None, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        ts = dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ScenarioError(
            f"{where}: time {text!r} is not seconds, a duration or ISO 8601"
        ) from None
    if start is None:
        raise ScenarioError(f"{where}: absolute times need a start (the first row's time)")
    return ts - start


def _event(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    kind = str(row.get("kind") or "").strip()
    if not kind:
        if "scene" in row:
            kind = "scene"
        elif "status" in row:
            kind = "status"
        elif "alarm" in row:
            kind = "alarm"
        else:
            kind = "reading"
    if kind == "reading":
        if not row.get("device") or not row.get("point") or "value" not in row:
            raise ScenarioError(f"{where}: a reading needs device, point and value")
        return {
            "kind": "reading",
            "device": row["device"],
            "point": row["point"],
            "value": row["value"],
        }
    if kind == "status":
        status = row.get("status", row.get("value"))
        return {"kind": "status", "device": row["device"], "status": str(status)}
    if kind == "alarm":
        return {
            "kind": "alarm",
            "device": row.get("device"),
            "event": str(row.get("event") or row.get("value") or "raised"),
            "alarm": {
                "type": row.get("alarm") or row.get("point"),
                "severity": row.get("severity") or "major",
            },
        }
    if kind == "scene":
        return {"kind": "scene", "scene": row.get("scene") or row.get("device")}
    raise ScenarioError(f"{where}: unknown kind {kind!r} (reading, status, alarm, scene)")


def load_scenario(path: str | Path, *, start: float | None = None) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{p}: {exc.strerror or exc}") from None
    events: list[ScenarioEvent] = []
    duration = 3600.0
    if p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        base = start
        for i, row in enumerate(rows, start=2):
            where = f"{p}:{i}"
            t_raw = row.get("time")
            if t_raw is None:
                raise ScenarioError(f"{p}: the CSV needs a 'time' column")
            if base is None:
                try:
                    base = dt.datetime.fromisoformat(t_raw.strip()).timestamp()
                except ValueError:
                    base = None
            clean = {k: v for k, v in row.items() if k and v not in (None, "")}
            if "value" in clean:
                clean["value"] = _value(clean["value"])
            events.append(ScenarioEvent(_at(t_raw, base, where), _event(clean, where)))
        start = base
    else:
        try:
            doc = load_data(text, str(p)) or {}
        except ValueError as exc:
            raise ScenarioError(f"not a valid scenario: {exc}") from None
        if not isinstance(doc, Mapping) or not isinstance(doc.get("events"), list):
            raise ScenarioError(f"{p}: expected a mapping with an 'events' list")
        if start is None and doc.get("start") is not None:
            s = doc["start"]
            start = (
                s.timestamp()
                if isinstance(s, dt.datetime)
                else dt.datetime.fromisoformat(str(s)).timestamp()
            )
        if doc.get("duration") is not None:
            duration = parse_duration(doc["duration"])
        for i, row in enumerate(doc["events"]):
            where = f"{p}: events[{i}]"
            if not isinstance(row, Mapping) or "at" not in row:
                raise ScenarioError(f"{where}: each event needs 'at'")
            events.append(ScenarioEvent(_at(row["at"], start, where), _event(row, where)))
    if start is None:
        start = float(math.floor(dt.datetime.now(dt.UTC).timestamp()))
    events.sort(key=lambda e: e.at)
    return Scenario(start, events, duration)


@dataclass
class Write:
    at: float
    scene: str
    device: str
    target: str  # property, or command:<name>
    value: Any


@dataclass
class SimulationReport:
    lines: list[tuple[float, str]] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    traces: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    fired: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "timeline": [{"at": t, "line": s} for t, s in self.lines],
            "fired": self.fired,
            "commands": [w.__dict__ for w in self.writes],
            "conflicts": self.conflicts,
            "loops": self.loops,
            "traces": self.traces,
        }


class RecordingEffects:
    """Effects that validate and record instead of acting (the simulator, tests)."""

    def __init__(
        self, catalog: Catalog, engine_ref: list[SceneEngine], report: SimulationReport, wall: Any
    ) -> None:
        self.catalog = catalog
        self.engine_ref = engine_ref
        self.report = report
        self.wall = wall
        self.n = 0

    def _scene(self, source: str) -> str:
        return source.removeprefix("scene:")

    def _line(self, text: str) -> None:
        self.report.lines.append((self.wall(), text))

    async def command(
        self,
        device: str,
        command: str,
        params: Mapping[str, Any],
        *,
        command_timeout: float | None,
        wait: bool,
        source: str,
    ) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        clean, timeout = self.catalog.validate(device, command, params, command_timeout)
        self.n += 1
        self.report.writes.append(
            Write(self.wall(), self._scene(source), device, f"command:{command}", clean)
        )
        self._line(f"    → command {device} {command} {json.dumps(clean)} (timeout {timeout:g}s)")
        return {"command": f"sim-{self.n}", "status": "success" if wait else "pending"}

    async def set_desired(
        self, device: str, prop: str, value: Any, *, source: str
    ) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.catalog.validate(device, SET, {"property": prop, "value": value}, None)
        self.report.writes.append(Write(self.wall(), self._scene(source), device, prop, value))
        self._line(f"    → desired {device}.{prop} = {json.dumps(value)}")
        return {"desired": {prop: value}}

    async def alarm(
        self, action: str, device: str, alarm: str, severity: str, message: str
    ) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self._line(f"    → alarm {action} {device}/{alarm} ({severity}) {message}")
        event = {
            "kind": "alarm",
            "device": device,
            "event": "raised" if action == "raise" else "cleared",
            "alarm": {"type": alarm, "severity": severity},
        }
        if self.engine_ref:
            self.engine_ref[0].feed(event)
        return {"alarm": alarm, "action": action}

    async def webhook(
        self, method: str, url: str, body: Any, headers: Mapping[str, str], seconds: float
    ) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self._line(f"    → webhook {method} {url} {json.dumps(body, default=str)}")
        return {"webhook": url, "sent": False}

    async def notify(
        self, channels: Sequence[Mapping[str, Any]], subject: str, text: str,
        payload: Mapping[str, Any],
    ) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        where = ", ".join(str(c.get("type")) for c in channels)
        self._line(f"    → notify {where}: {subject}")
        return {"notify": where, "sent": False}


def static_loops(scenes: Mapping[str, Scene]) -> list[str]:
    """Cycles in the graph "scene A writes a device that triggers scene B" / "A runs B"."""
    data: dict[str, list[tuple[str, str]]] = {}  # device -> [(scene, point)]
    status: dict[str, set[str]] = {}
    for s in scenes.values():
        for t in s.triggers:
            if isinstance(t, DeviceData):
                data.setdefault(t.device, []).append((s.name, t.point))
            elif isinstance(t, StatusChange) and t.device and t.to in (None, "online", "offline"):
                status.setdefault(t.device, set()).add(s.name)
    edges: dict[str, dict[str, str]] = {n: {} for n in scenes}
    for s in scenes.values():
        for a in s.all_actions():
            if isinstance(a, SetDesired):
                for other, point in data.get(a.device, ()):
                    if point == a.property:
                        edges[s.name].setdefault(other, f"via {a.device}.{a.property}")
            elif isinstance(a, Command):
                for other, _ in data.get(a.device, ()):
                    edges[s.name].setdefault(other, f"via {a.device} {a.command}")
                if a.command in ("reboot", "reset"):
                    for other in status.get(a.device, ()):
                        edges[s.name].setdefault(other, f"via {a.device} {a.command}")
            elif isinstance(a, RunScene) and a.scene in scenes:
                edges[s.name].setdefault(a.scene, "runs it")
    found: list[str] = []
    seen_cycles: set[frozenset[str]] = set()

    def dfs(node: str, path: list[str]) -> None:
        for nxt, _why in sorted(edges.get(node, {}).items()):
            if nxt in path:
                cycle = path[path.index(nxt) :]
                key = frozenset(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    hops = [
                        f"{a} → {b} ({edges[a][b]})"
                        for a, b in zip(cycle, [*cycle[1:], nxt], strict=True)
                    ]
                    found.append("possible trigger loop: " + "; ".join(hops))
            elif len(path) < 12:
                dfs(nxt, [*path, nxt])

    for n in sorted(edges):
        dfs(n, [n])
    return found


def conflicts(writes: list[Write], window: float, tz: str = "UTC") -> list[str]:
    out = []
    by_target: dict[tuple[str, str], list[Write]] = {}
    for w in writes:
        by_target.setdefault((w.device, w.target), []).append(w)
    for (device, target), ws in sorted(by_target.items()):
        ws.sort(key=lambda w: w.at)
        reported: set[tuple[str, str]] = set()
        for i, a in enumerate(ws):
            for b in ws[i + 1 :]:
                if b.at - a.at > window:
                    break
                if a.scene != b.scene and a.value != b.value and (a.scene, b.scene) not in reported:
                    reported.add((a.scene, b.scene))
                    what = target.removeprefix("command:")
                    out.append(
                        f"conflict on {device} {what}: {a.scene} → {json.dumps(a.value)} at "
                        f"{_clock(a.at, tz)} and {b.scene} → {json.dumps(b.value)} at {_clock(b.at, tz)}"
                    )
    return out


def _clock(ts: float, tz: str = "UTC") -> str:
    from twin.control.cron import tzinfo

    return dt.datetime.fromtimestamp(ts, tzinfo(tz)).strftime("%H:%M:%S")


def simulate(
    specs: Mapping[tuple[str, str], Mapping[str, Any]],
    scenario: Scenario,
    *,
    window: float = 60.0,
) -> SimulationReport:
    """Run every scene of ``specs`` over ``scenario`` on a virtual clock."""
    catalog = Catalog(specs)
    report = SimulationReport()
    tz = catalog.timezone()
    holder: list[SceneEngine] = []
    origin: list[float] = []

    def wall() -> float:
        return scenario.start + (trio.current_time() - origin[0])

    effects = RecordingEffects(catalog, holder, report, wall)

    def device_site(device: str) -> str | None:
        doc = catalog.device(device)
        return doc_site(doc) if doc is not None else None

    engine = SceneEngine(
        effects,
        timezone=lambda site: catalog.timezone(site=site),
        wall=wall,
        device_site=device_site,
    )
    holder.append(engine)
    engine.load(specs)
    report.loops.extend(static_loops(engine.scenes))

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "started":
            trig = ev["trigger"]
            report.fired[ev["scene"]] = report.fired.get(ev["scene"], 0) + 1
            report.lines.append((ev["at"], f"▶ {ev['scene']} fired by {_describe(trig)}"))
        elif kind == "conditions":
            for c in ev["conditions"]:
                extra = {k: v for k, v in c.items() if k not in ("path", "type", "result")}
                report.lines.append(
                    (
                        ev["at"],
                        f"    ? {c['path']} {c['type']} → {c['result']}  {json.dumps(extra, default=str)}",
                    )
                )
        elif kind == "finished":
            t = ev["trace"]
            report.traces.append(t)
            detail = t.get("error") or t.get("reason") or ""
            if t["status"] == "loop":
                report.loops.append(f"loop stopped at run time: {detail}")
            report.lines.append(
                (
                    t["finished_at"],
                    f"  ■ {t['scene']} {t['status']}" + (f": {detail}" if detail else ""),
                )
            )
        elif kind == "dropped":
            report.lines.append(
                (
                    ev["at"],
                    f"  ∅ {ev['scene']} triggered while running (mode {ev['mode']}): dropped",
                )
            )

    engine.listeners.append(on_event)

    async def main() -> None:
        origin.append(trio.current_time())
        async with trio.open_nursery() as n:
            await n.start(engine.run)
            for ev in scenario.events:
                delay = ev.at - (trio.current_time() - origin[0])
                if delay > 0:
                    await trio.sleep(delay)
                e = ev.event
                if e["kind"] == "scene":
                    if e["scene"] not in engine.scenes:
                        report.lines.append((wall(), f"! unknown scene {e['scene']!r}"))
                        continue
                    await engine.execute(e["scene"], {"by": "scenario"})
                else:
                    engine.feed({**e, "ts": wall()})
                await trio.lowlevel.checkpoint()
            await trio.sleep(scenario.duration)
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    report.lines.sort(key=lambda x: x[0])  # stable: same-time lines keep their order
    report.conflicts = conflicts(report.writes, window, tz)
    report.tz = tz  # type: ignore[attr-defined]
    return report


def _describe(trig: Mapping[str, Any]) -> str:
    kind = trig.get("type")
    if kind == "device_data":
        if trig.get("operator") == "changed":
            return f"{trig['device']}.{trig['point']} changed to {trig.get('value')!r}"
        held = f" for {trig['for']:g}s" if trig.get("for") else ""
        return (
            f"{trig['device']}.{trig['point']} = {trig.get('value')!r} "
            f"({trig.get('operator')} {trig.get('threshold')!r}{held})"
        )
    if kind == "status":
        return f"{trig['device']} status {trig.get('previous')} → {trig.get('status')}"
    if kind == "alarm":
        return f"alarm {trig.get('alarm')} {trig.get('event')} on {trig.get('device')}"
    if kind == "schedule":
        what = f"cron {trig['cron']!r}" if trig.get("cron") else f"every {trig.get('every'):g}s"
        return f"schedule {what} ({trig.get('local')})"
    if kind == "scene":
        return f"scene {trig.get('by')}"
    return str(kind)


def format_report(report: SimulationReport, tz: str = "UTC") -> list[str]:
    out = [f"{_clock(t, tz)}  {line}" for t, line in report.lines]
    out.append("")
    if report.fired:
        out.append("fired: " + ", ".join(f"{k} x{v}" for k, v in sorted(report.fired.items())))
    else:
        out.append("no scene fired")
    for c in report.conflicts:
        out.append(f"⚠ {c}")
    for loop in report.loops:
        out.append(f"⚠ {loop}")
    if not report.conflicts and not report.loops:
        out.append("no conflicts, no trigger loops")
    return out


__all__ = [
    "CommandError",
    "RecordingEffects",
    "Scenario",
    "ScenarioError",
    "SimulationReport",
    "format_report",
    "load_scenario",
    "simulate",
]
