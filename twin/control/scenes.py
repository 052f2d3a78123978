"""Scenes (``kind: Scene``): triggers → conditions → actions, with run modes and traces.

```yaml
apiVersion: flux.iot/v1
kind: Scene
metadata: {name: fan_on_when_hot, site: plant-a}
spec:
  description: Temperature above 30 → fan on
  enabled: true
  mode: single              # single | restart | queued | parallel
  max: 10                   # queued: queue length; parallel: concurrent runs
  triggers:   [{type: device_data, device: temp_sensor_01, point: temperature, operator: ">", value: 30}]
  conditions: [{type: time, after: "06:00", before: "22:00"}]
  actions:    [{type: command, device: fan_01, command: set_state, params: {state: true}}]
```
The :class:`SceneEngine` is fed the engine's live events (readings, status changes, alarms),
keeps its own view of the latest values, and starts runs. Each run records a trace (trigger,
every condition's result, every step's outcome and timing) handed to ``trace_sink``.

Run modes: ``single`` ignores a trigger while a run is active; ``restart`` cancels the active
run and starts again; ``queued`` runs them one after another (at most ``max`` waiting);
``parallel`` runs up to ``max`` at once.

Sites: a scene acts only on devices of its own site and of the sites its ``spec.reach`` lists
(:func:`twin.policy.scene_may_act`). ``twin validate`` reports a scene that names another
site's device; at run time (``device_site`` given) such a step fails without acting.

Loops: a run carries the chain of scenes that caused it. Running another scene extends the
chain; so does a device write: for ``loop_window`` seconds after a scene commanded a device,
triggers from that device inherit the chain. A scene that would trigger itself through the
chain is not run; a trace with status ``loop`` says why.

The engine works the same on a real clock (inside ``twin up``) and a virtual one
(``twin simulate``): timers are Trio sleeps, wall time comes from ``wall()``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from twin.control.actions import Action, StepError, StopRun, build_actions, run_sequence
from twin.control.conditions import (
    Condition,
    Evaluation,
    SceneDefinitionError,
    _equal,
    build_conditions,
    check_all,
)
from twin.control.cron import tzinfo
from twin.control.triggers import (
    AlarmEvent,
    DeviceData,
    Edge,
    Manual,
    Schedule,
    StatusChange,
    Trigger,
    build_trigger,
)
from twin.errors import NotFoundError, TwinError
from twin.policy import scene_may_act, scene_reach
from twin.registry.base import doc_hash

log = logging.getLogger(__name__)

MODES = ("single", "restart", "queued", "parallel")
_MISSING: Any = object()


@dataclass(eq=False)
class Scene:
    name: str
    site: str | None
    enabled: bool
    mode: str
    max: int
    triggers: tuple[Trigger, ...]
    conditions: tuple[Condition, ...]
    actions: tuple[Action, ...]
    hash: str
    description: str = ""
    tz: str = "UTC"
    doc: Mapping[str, Any] = field(default_factory=dict)
    reach: frozenset[str] = frozenset()  # other sites its actions may act on

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], tz: str = "UTC") -> Scene:
        meta = doc.get("metadata") or {}
        spec = doc.get("spec") or {}
        name = str(meta["name"])
        mode = str(spec.get("mode", "single"))
        if mode not in MODES:
            raise SceneDefinitionError(f"scene {name}: unknown mode {mode!r}")
        return cls(
            name=name,
            site=meta.get("site"),
            enabled=bool(spec.get("enabled", True)),
            mode=mode,
            max=int(spec.get("max", 10)),
            triggers=tuple(
                build_trigger(t, name, i) for i, t in enumerate(spec.get("triggers") or [])
            ),
            conditions=build_conditions(spec.get("conditions")),
            actions=build_actions(spec.get("actions")),
            hash=doc_hash(doc),
            description=str(spec.get("description", "")),
            tz=tz,
            doc=doc,
            reach=scene_reach(doc),
        )

    def all_actions(self) -> list[Action]:
        return [a for top in self.actions for a in top.walk()]


class Effects(Protocol):
    """What scene actions do to the world (the engine's ledger, or a simulator's log)."""

    async def command(
        self,
        device: str,
        command: str,
        params: Mapping[str, Any],
        *,
        command_timeout: float | None,
        wait: bool,
        source: str,
    ) -> dict[str, Any]: ...

    async def set_desired(
        self, device: str, prop: str, value: Any, *, source: str
    ) -> dict[str, Any]: ...

    async def alarm(
        self, action: str, device: str, alarm: str, severity: str, message: str
    ) -> dict[str, Any]: ...

    async def webhook(
        self, method: str, url: str, body: Any, headers: Mapping[str, str], seconds: float
    ) -> dict[str, Any]: ...

    async def notify(
        self, channels: Sequence[Mapping[str, Any]], subject: str, text: str,
        payload: Mapping[str, Any],
    ) -> dict[str, Any]: ...


@dataclass
class _Runtime:
    running: dict[str, trio.CancelScope] = field(default_factory=dict)
    queue: deque[tuple[dict[str, Any], tuple[str, ...], str, trio.Event]] = field(
        default_factory=deque
    )
    runs: int = 0
    dropped: int = 0
    loops: int = 0
    schedule_scope: trio.CancelScope | None = None
    crashed: bool = False  # the last finished run crashed (an alarm is up)


class RunContext:
    """One run of one scene: what actions see (state, effects, the trace)."""

    def __init__(
        self,
        engine: SceneEngine,
        scene: Scene,
        run_id: str,
        trigger: dict[str, Any],
        chain: tuple[str, ...],
        trace: dict[str, Any],
    ) -> None:
        self.engine = engine
        self.scene = scene.name
        self.scene_obj = scene
        self.run_id = run_id
        self.trigger = trigger
        self.chain = chain
        self.trace = trace
        self.effects = engine.effects
        self.source = f"scene:{scene.name}"

    # StateView
    def value(self, device: str, point: str) -> Any:
        return self.engine.values.get((device, point))

    def status(self, device: str) -> str | None:
        return self.engine.statuses.get(device)

    def local_now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.engine.wall(), tzinfo(self.scene_obj.tz))

    @property
    def state(self) -> RunContext:
        return self

    def conditions(self, conds: tuple[Condition, ...], prefix: str) -> bool:
        out: list[Evaluation] = []
        ok = check_all(conds, self, out, prefix)
        evaluated = [e.to_json() for e in out]
        self.trace["conditions"].extend(evaluated)
        if self.engine.listeners and evaluated:
            self.engine.emit(
                {
                    "event": "conditions",
                    "scene": self.scene,
                    "run_id": self.run_id,
                    "at": self.engine.wall(),
                    "result": ok,
                    "conditions": evaluated,
                }
            )
        return ok

    async def step(self, action: Action, path: str) -> None:
        entry: dict[str, Any] = {
            "path": path,
            "type": action.type,
            "started_at": self.engine.wall(),
        }
        if action.alias:
            entry["alias"] = action.alias
        self.trace["steps"].append(entry)
        t0 = trio.current_time()
        try:
            self._check_reach(action)
            for device, target in action.writes():
                point = None if target.startswith("command:") else target
                self.engine.note_write(device, self.chain, point)
            result = await action.run(self, path)
            entry["outcome"] = "ok"
            if result:
                entry["result"] = result
        except StopRun as stop:
            entry["outcome"] = "stop"
            entry["reason"] = stop.reason
            raise
        except (StepError, TwinError, OSError, ValueError) as exc:
            entry["outcome"] = "error"
            entry["error"] = str(exc) or type(exc).__name__
            if not action.continue_on_error:
                raise StepError(f"{path} ({action.type}): {entry['error']}") from exc
            entry["continued"] = True
        finally:
            entry.setdefault("outcome", "cancelled")
            entry["duration"] = trio.current_time() - t0


    def _check_reach(self, action: Action) -> None:
        where = self.engine.device_site
        device = getattr(action, "device", None)
        if where is None or action.type not in SITE_BOUND or not isinstance(device, str):
            return
        scene = self.scene_obj
        site = where(device)
        if not scene_may_act(scene.site, scene.reach, site):
            raise StepError(
                f"device {device!r} is in site {site!r}, outside scene site {scene.site!r} "
                "(and its spec.reach)"
            )


# actions that act on a device, and so must stay within the scene's site and reach
SITE_BOUND = frozenset({"command", "set_desired", "alarm"})


class SceneEngine:
    def __init__(
        self,
        effects: Effects,
        *,
        timezone: Callable[[str | None], str] = lambda site: "UTC",
        wall: Callable[[], float] = time.time,
        trace_sink: Callable[[dict[str, Any]], None] | None = None,
        on_crash: Callable[[Scene, BaseException | None], None] | None = None,
        loop_window: float = 5.0,
        max_chain: int = 8,
        keep_traces: int = 1000,
        device_site: Callable[[str], str | None] | None = None,
        gate: Callable[[str, str], Awaitable[bool]] | None = None,
    ) -> None:
        self.effects = effects
        # scale-out: ``gate(scene, event key)`` is True for exactly one engine per trigger
        # event (twin/runtime/cluster.py); a run it refuses leaves no trace
        self.gate = gate
        self.gated = 0
        # the site of a device (None: unknown device); None: sites are not checked at run time
        self.device_site = device_site
        self.timezone = timezone
        self.wall = wall
        self.trace_sink = trace_sink
        # a run crashed (exc), or the first good run of a scene after a crash (None): the
        # engine counts, alarms and clears (twin.runtime.supervisor); the run itself is
        # isolated here, so one failing scene never stops the others
        self.on_crash = on_crash
        self.loop_window = loop_window
        self.max_chain = max_chain
        self.scenes: dict[str, Scene] = {}
        self.values: dict[tuple[str, str], Any] = {}
        self.statuses: dict[str, str] = {}
        self.traces: deque[dict[str, Any]] = deque(maxlen=keep_traces)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._rt: dict[str, _Runtime] = {}
        self._by_point: dict[tuple[str, str], list[DeviceData]] = {}
        self._by_status: dict[str | None, list[StatusChange]] = {}
        self._alarm: list[AlarmEvent] = []
        self._caused: dict[tuple[str, str | None], tuple[tuple[str, ...], float]] = {}
        self._state_event: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._active_runs = 0
        self._idle = trio.Event()
        self._idle.set()
        self.fired = 0

    # -- loading -----------------------------------------------------------------------------
    def load(self, specs: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[str]:
        """Take the Scene documents of a spec set; return the names that changed."""
        docs = {n: d for (k, n), d in specs.items() if k == "Scene"}
        changed = []
        for name in list(self.scenes):
            if name not in docs:
                self._drop(name)
                changed.append(name)
        for name, doc in sorted(docs.items()):
            old = self.scenes.get(name)
            if old is not None and old.hash == doc_hash(doc):
                continue
            site = (doc.get("metadata") or {}).get("site")
            try:
                scene = Scene.from_doc(doc, self.timezone(site))
            except (SceneDefinitionError, KeyError, ValueError, TypeError) as exc:
                log.error("scene %s: not loaded: %s", name, exc)
                continue
            if old is not None:
                self._drop(name)
            self.scenes[name] = scene
            self._rt.setdefault(name, _Runtime())
            changed.append(name)
            if self._nursery is not None:
                self._start_schedules(scene)
        self._index()
        return changed

    def _drop(self, name: str) -> None:
        scene = self.scenes.pop(name, None)
        rt = self._rt.get(name)
        if rt is not None and rt.schedule_scope is not None:
            rt.schedule_scope.cancel()
            rt.schedule_scope = None
        if scene is not None:
            for t in scene.triggers:
                if isinstance(t, Edge):
                    t.reset()

    def _index(self) -> None:
        self._by_point, self._by_status, self._alarm = {}, {}, []
        for scene in self.scenes.values():
            for t in scene.triggers:
                if isinstance(t, DeviceData):
                    self._by_point.setdefault((t.device, t.point), []).append(t)
                elif isinstance(t, StatusChange):
                    self._by_status.setdefault(t.device, []).append(t)
                elif isinstance(t, AlarmEvent):
                    self._alarm.append(t)

    # -- events ------------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        for fn in self.listeners:
            try:
                fn(event)
            except Exception:
                log.exception("scene listener failed")

    def seed(self, values: Mapping[tuple[str, str], Any], statuses: Mapping[str, str]) -> None:
        self.values.update(values)
        self.statuses.update(statuses)

    def feed(self, event: Mapping[str, Any]) -> None:
        """One live event: ``{"kind": "reading" | "status" | "alarm", ...}``."""
        kind = event.get("kind")
        if kind == "reading":
            device, point, value = event["device"], event["point"], event["value"]
            key = (device, point)
            prev = self.values.get(key, _MISSING)
            self.values[key] = value
            for trig in self._by_point.get(key, ()):
                self._on_data(trig, value, prev, event)
        elif kind == "status":
            device, status = event["device"], str(event["status"])
            previous = event.get("previous", self.statuses.get(device))
            self.statuses[device] = status
            for trig in (*self._by_status.get(device, ()), *self._by_status.get(None, ())):
                r = trig.step(trig.test(status, previous))
                info = {
                    "type": "status",
                    "device": device,
                    "status": status,
                    "previous": previous,
                    "ts": event.get("ts"),
                }
                self._edge(trig, r, info, device)
        elif kind == "alarm":
            for atrig in self._alarm:
                if atrig.matches(event):
                    alarm = event.get("alarm") or {}
                    info = {
                        "type": "alarm",
                        "event": event.get("event"),
                        "device": event.get("device"),
                        "alarm": alarm.get("type"),
                        "severity": alarm.get("severity"),
                        "ts": event.get("ts"),
                    }
                    self._fire(atrig, info, self._chain_for(str(event.get("device"))))
        if self._state_event is not None:
            self._state_event.set()
            self._state_event = None

    async def state_changed(self) -> None:
        if self._state_event is None:
            self._state_event = trio.Event()
        await self._state_event.wait()

    def _on_data(self, trig: DeviceData, value: Any, prev: Any, event: Mapping[str, Any]) -> None:
        info = {
            "type": "device_data",
            "device": trig.device,
            "point": trig.point,
            "value": value,
            "operator": trig.op,
            "threshold": trig.value,
            "ts": event.get("ts"),
        }
        if trig.op == "changed":
            if prev is not _MISSING and not _equal(prev, value):
                info["previous"] = prev
                self._fire(trig, info, self._chain_for(trig.device, trig.point))
            return
        r = trig.step(trig.test(value))
        if r == "fire":
            self._fire(trig, info, self._chain_for(trig.device, trig.point))
        else:
            self._edge(trig, r, info, trig.device)

    def _edge(self, trig: Edge, r: str | None, info: dict[str, Any], device: str) -> None:
        if r == "fire":
            self._fire(trig, info, self._chain_for(device))
        elif r == "arm" and self._nursery is not None:
            scope = trio.CancelScope()
            trig.timer = scope
            self._nursery.start_soon(self._hold, trig, scope, info, device)

    async def _hold(
        self, trig: Edge, scope: trio.CancelScope, info: dict[str, Any], device: str
    ) -> None:
        with scope:
            await trio.sleep(trig.hold)
            if trig.active and not trig.fired and trig.timer is scope:
                trig.fired = True
                trig.timer = None
                self._fire(trig, {**info, "for": trig.hold}, self._chain_for(device))

    # -- loops -------------------------------------------------------------------------------
    def note_write(self, device: str, chain: tuple[str, ...], point: str | None = None) -> None:
        """A run wrote ``device`` (``point``: a property; None: a command, any point)."""
        self._caused[(device, point)] = (chain, trio.current_time() + self.loop_window)

    def _chain_for(self, device: str, point: str | None = None) -> tuple[str, ...]:
        """The chain of scenes that caused this device's data (within ``loop_window``)."""
        if not self._caused:
            return ()
        now = trio.current_time()
        best: tuple[str, ...] = ()
        keys: list[tuple[str, str | None]] = [(device, None)]
        if point is not None:
            keys.insert(0, (device, point))
        for key in keys:
            hit = self._caused.get(key)
            if hit is None:
                continue
            chain, until = hit
            if now > until:
                del self._caused[key]
            elif len(chain) > len(best):
                best = chain
        return best

    # -- runs ----------------------------------------------------------------------------------
    def _fire(self, trig: Trigger, info: dict[str, Any], chain: tuple[str, ...]) -> None:
        scene = self.scenes.get(trig.scene)
        if scene is None or not scene.enabled:
            return
        self.fired += 1
        info = {**info, "index": trig.index}
        self.start(scene, info, chain)

    def start(
        self, scene: Scene, trigger: dict[str, Any], chain: tuple[str, ...] = ()
    ) -> tuple[str | None, trio.Event]:
        """Start (or queue, or drop) a run according to the scene's mode.

        Returns (run_id or None when dropped/stopped, an event set when the run is done).
        """
        done = trio.Event()
        rt = self._rt.setdefault(scene.name, _Runtime())
        if scene.name in chain or len(chain) >= self.max_chain:
            rt.loops += 1
            path = " → ".join((*chain, scene.name))
            if rt.loops == 1 or rt.loops % 100 == 0:
                log.warning(
                    "scene %s: loop detected (%s); not run (%d so far)", scene.name, path, rt.loops
                )
            run_id = self._record_refusal(scene, trigger, chain, "loop", f"trigger loop: {path}")
            done.set()
            return run_id, done
        if self._nursery is None:
            raise TwinError("the scene engine is not running")
        if rt.running:
            if scene.mode == "single":
                rt.dropped += 1
                self.emit(
                    {"event": "dropped", "scene": scene.name, "at": self.wall(), "mode": "single"}
                )
                done.set()
                return None, done
            if scene.mode == "restart":
                for scope in rt.running.values():
                    scope.cancel()
            elif scene.mode == "queued":
                if len(rt.queue) >= scene.max:
                    rt.dropped += 1
                    self.emit(
                        {
                            "event": "dropped",
                            "scene": scene.name,
                            "at": self.wall(),
                            "mode": "queued",
                        }
                    )
                    done.set()
                    return None, done
                run_id = self._run_id()
                rt.queue.append((trigger, chain, run_id, done))
                return run_id, done
            elif scene.mode == "parallel" and len(rt.running) >= scene.max:
                rt.dropped += 1
                self.emit(
                    {"event": "dropped", "scene": scene.name, "at": self.wall(), "mode": "parallel"}
                )
                done.set()
                return None, done
        run_id = self._run_id()
        self._launch(scene, rt, trigger, chain, run_id, done)
        return run_id, done

    def _run_id(self) -> str:
        return "run_" + secrets.token_hex(6)

    def _launch(
        self,
        scene: Scene,
        rt: _Runtime,
        trigger: dict[str, Any],
        chain: tuple[str, ...],
        run_id: str,
        done: trio.Event,
    ) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        rt.running[run_id] = scope
        rt.runs += 1
        self._active_runs += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        self._nursery.start_soon(self._run, scene, rt, scope, trigger, chain, run_id, done)

    def _new_trace(
        self, scene: Scene, run_id: str, trigger: dict[str, Any], chain: tuple[str, ...]
    ) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "scene": scene.name,
            "mode": scene.mode,
            "trigger": trigger,
            "chain": list(chain),
            "started_at": self.wall(),
            "finished_at": None,
            "status": "running",
            "conditions": [],
            "steps": [],
        }

    def _record_refusal(
        self,
        scene: Scene,
        trigger: dict[str, Any],
        chain: tuple[str, ...],
        status: str,
        error: str,
    ) -> str:
        run_id = self._run_id()
        trace = self._new_trace(scene, run_id, trigger, chain)
        trace.update(status=status, error=error, finished_at=trace["started_at"], duration=0.0)
        self._finish(trace)
        return run_id

    def _finish(self, trace: dict[str, Any]) -> None:
        self.traces.append(trace)
        self.emit({"event": "finished", "trace": trace})
        if self.trace_sink is not None:
            try:
                self.trace_sink(trace)
            except Exception:
                log.exception("scene %s: storing the trace failed", trace["scene"])

    async def _run(
        self,
        scene: Scene,
        rt: _Runtime,
        scope: trio.CancelScope,
        trigger: dict[str, Any],
        chain: tuple[str, ...],
        run_id: str,
        done: trio.Event,
    ) -> None:
        key = event_key(trigger) if self.gate is not None else None
        if key is not None and self.gate is not None:
            try:
                ours = await self.gate(scene.name, key)
            except Exception as exc:
                log.warning("scene %s: run %s not started: exactly-once gate: %s", scene.name, run_id, exc)
                ours = False
            if not ours:
                self.gated += 1
                self._gated_done(rt, run_id, done, scene)
                return
        trace = self._new_trace(scene, run_id, trigger, chain)
        ctx = RunContext(self, scene, run_id, trigger, (*chain, scene.name), trace)
        self.emit(
            {
                "event": "started",
                "scene": scene.name,
                "run_id": run_id,
                "trigger": trigger,
                "at": trace["started_at"],
            }
        )
        t0 = trio.current_time()
        status = "cancelled"
        try:
            with scope:
                if ctx.conditions(scene.conditions, "conditions"):
                    await run_sequence(ctx, scene.actions, "actions")
                    status = "success"
                else:
                    status = "skipped"
        except StopRun as stop:
            status = "failed" if stop.failed else "stopped"
            trace["reason"] = stop.reason
        except StepError as exc:
            status = "failed"
            trace["error"] = str(exc)
        except Exception as exc:
            log.exception("scene %s: run %s crashed", scene.name, run_id)
            status = "failed"
            trace["error"] = f"{type(exc).__name__}: {exc}"
            rt.crashed = True
            self._report_crash(scene, exc)
        else:
            if rt.crashed and status == "success":
                rt.crashed = False
                self._report_crash(scene, None)
        finally:
            trace["status"] = status
            trace["finished_at"] = self.wall()
            trace["duration"] = trio.current_time() - t0
            rt.running.pop(run_id, None)
            self._finish(trace)
            done.set()
            if rt.queue and scene.mode == "queued" and self._nursery is not None:
                nxt_trigger, nxt_chain, nxt_id, nxt_done = rt.queue.popleft()
                current = self.scenes.get(scene.name, scene)
                self._launch(current, rt, nxt_trigger, nxt_chain, nxt_id, nxt_done)
            self._active_runs -= 1
            if self._active_runs == 0:
                self._idle.set()

    def _gated_done(self, rt: _Runtime, run_id: str, done: trio.Event, scene: Scene) -> None:
        rt.running.pop(run_id, None)
        done.set()
        if rt.queue and scene.mode == "queued" and self._nursery is not None:
            nxt_trigger, nxt_chain, nxt_id, nxt_done = rt.queue.popleft()
            self._launch(self.scenes.get(scene.name, scene), rt, nxt_trigger, nxt_chain, nxt_id, nxt_done)
        self._active_runs -= 1
        if self._active_runs == 0:
            self._idle.set()

    def _report_crash(self, scene: Scene, exc: BaseException | None) -> None:
        if self.on_crash is None:
            return
        try:
            self.on_crash(scene, exc)
        except Exception:
            log.exception("scene %s: reporting a crash failed", scene.name)

    async def idle(self) -> None:
        """Wait until no run is active."""
        while self._active_runs:
            await self._idle.wait()

    async def execute(
        self, name: str, data: Mapping[str, Any] | None = None, *, wait: bool = False
    ) -> str | None:
        """Run a scene by hand (API, CLI, a ``manual`` trigger)."""
        scene = self.scenes.get(name)
        if scene is None:
            raise NotFoundError(f"no scene {name!r}")
        trigger = {"type": "manual", **(dict(data) if data else {})}
        run_id, done = self.start(scene, trigger)
        if wait:
            await done.wait()
        return run_id

    async def run_from_scene(self, ctx: RunContext, name: str, *, wait: bool) -> dict[str, Any]:
        scene = self.scenes.get(name)
        if scene is None:
            raise StepError(f"no scene {name!r}")
        if name in ctx.chain:
            raise StepError(f"loop: {' → '.join((*ctx.chain, name))}")
        run_id, done = self.start(
            scene, {"type": "scene", "by": ctx.scene, "run": ctx.run_id}, ctx.chain
        )
        if wait:
            await done.wait()
        return {"run_id": run_id}

    def stats(self, name: str) -> dict[str, Any]:
        rt = self._rt.get(name) or _Runtime()
        return {
            "runs": rt.runs,
            "running": len(rt.running),
            "queued": len(rt.queue),
            "dropped": rt.dropped,
            "loops": rt.loops,
        }

    # -- schedules ---------------------------------------------------------------------------
    def _start_schedules(self, scene: Scene) -> None:
        assert self._nursery is not None
        rt = self._rt.setdefault(scene.name, _Runtime())
        scheds = [t for t in scene.triggers if isinstance(t, Schedule)]
        if not scheds:
            return
        scope = trio.CancelScope()
        rt.schedule_scope = scope
        for t in scheds:
            self._nursery.start_soon(self._schedule, scene, t, scope)

    async def _schedule(self, scene: Scene, trig: Schedule, scope: trio.CancelScope) -> None:
        with scope:
            try:
                while True:
                    now = self.wall()
                    at = trig.next_after(now, scene.tz)
                    await trio.sleep(max(0.0, at - now))
                    local = dt.datetime.fromtimestamp(at, tzinfo(scene.tz))
                    self._fire(
                        trig,
                        {**trig.describe(), "at": at, "local": local.isoformat(timespec="seconds")},
                        (),
                    )
            except Exception as exc:  # this schedule stops; the other scenes keep running
                log.exception("scene %s: schedule %s failed; it stops", scene.name, trig.index)
                self._report_crash(scene, exc)

    async def run(
        self, *, task_status: trio.TaskStatus[SceneEngine] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for scene in self.scenes.values():
                    self._start_schedules(scene)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None


def event_key(trigger: Mapping[str, Any]) -> str | None:
    """The identity of the event behind an automatic trigger, the same on every engine that
    sees it (None: a manual or chained run, which is never deduplicated)."""
    kind = trigger.get("type")
    parts: tuple[Any, ...]
    if kind == "device_data":
        parts = (kind, trigger.get("index"), trigger.get("device"), trigger.get("point"), trigger.get("ts"), trigger.get("for"))
    elif kind == "status":
        parts = (kind, trigger.get("index"), trigger.get("device"), trigger.get("status"), trigger.get("ts"))
    elif kind == "alarm":
        parts = (kind, trigger.get("index"), trigger.get("device"), trigger.get("alarm"), trigger.get("event"), trigger.get("ts"))
    elif kind == "schedule" or "at" in trigger:
        parts = ("schedule", trigger.get("index"), trigger.get("at"))
    else:
        return None
    return json.dumps(parts, default=str, separators=(",", ":"))


def manual_triggers(scene: Scene) -> bool:
    return any(isinstance(t, Manual) for t in scene.triggers)
