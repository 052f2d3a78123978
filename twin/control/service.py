"""The control service inside the engine: ledger, reconciler and scenes, wired to the runtime.

``Engine(registry, config, services=[ControlService()])``; the running service is published as
``engine.service_info["control"]`` (the API's control routes find it there).

* :class:`EngineTransport` delivers ledger commands through each device task's binding
  (``write`` for ``set``, ``send_command`` otherwise). HTTP push devices fetch theirs by
  long-polling (``mode() == "poll"``).
* :class:`Reconciler`: a writable desired value that differs from the reported one becomes a
  ``set`` command in the ledger; failures and non-convergence retry with backoff; after
  ``max_attempts`` the property is *drifted* (with the reason) until it converges or its
  desired value changes.
* :class:`EngineEffects`: what scene actions do (ledger commands, runtime desired values,
  alarms in the registry, webhooks with httpx — only to the destinations ``webhooks``, a
  :class:`~twin.control.webhooks.WebhookPolicy`, allows; default: ``TWIN_WEBHOOK_ALLOW``).
* A successful command whose model declares ``sets`` (twin/spec/commands.py) records those
  properties as runtime desired-state overrides (:meth:`ControlService._command_done`), so the
  reconciler keeps what the command did instead of reverting it to ``spec.desired``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import trio

from twin.control.actions import StepError
from twin.control.ledger import (
    SENT,
    SET,
    Catalog,
    CommandStatus,
    DeviceCommand,
    Ledger,
    RetryPolicy,
    record_json,
)
from twin.control.scenes import SceneEngine
from twin.control.webhooks import WebhookPolicy, WebhookRefused
from twin.errors import BindingConnectError, TwinError
from twin.policy import doc_site
from twin.registry.base import Alarm, Registry, SceneTrace
from twin.spec.commands import command_sets
from twin.spec.properties import value_problem

if TYPE_CHECKING:
    from twin.runtime.engine import Engine

NotifyHook = Callable[
    [Sequence[Mapping[str, Any]], str, str, Mapping[str, Any]], Awaitable[list[dict[str, Any]]]
]
"""``(channels, subject, text, payload) -> one outcome per channel`` (see twin.reports)."""

log = logging.getLogger(__name__)


def command_history(registry: Registry, device: str, limit: int = 20) -> list[dict[str, Any]]:
    """A device's commands, newest first, as JSON (for ``twin describe device``)."""
    return [record_json(r) for r in registry.commands(device=device, limit=limit)]


@lru_cache(maxsize=64)
def _accepts_command_id(cls: Any) -> bool:
    try:
        params = inspect.signature(cls.send_command).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "command_id" in params and "progress" in params


def _takes_command_id(binding: Any) -> bool:
    """MQTT-style bindings correlate by our command id and report progress."""
    cls: Any = type(binding)
    return _accepts_command_id(cls)


class EngineTransport:
    def __init__(self, engine: Engine, catalog: Catalog) -> None:
        self.engine = engine
        self.catalog = catalog
        self.ledger: Ledger | None = None  # set by the service (progress reports)

    def mode(self, device: str) -> str:
        if self.catalog.protocol(device) == "http" and (
            self.catalog.binding_options(device).get("mode", "push") == "push"
        ):
            return "poll"
        return "push"

    def _binding(self, device: str) -> Any:
        task = self.engine.controller.tasks.get(device)
        if task is None or task.binding is None or not task.connected:
            raise BindingConnectError(f"device {device!r} is not connected")
        return task.binding

    async def send(self, command: DeviceCommand) -> Any:
        binding = self._binding(command.device)
        if command.type == SET:
            await binding.write(command.params["property"], command.params["value"])
            return {"written": True}
        if _takes_command_id(binding) and self.ledger is not None:
            ledger = self.ledger
            result = await binding.send_command(
                command.type,
                command.params,
                command_id=command.id,
                progress=lambda status, doc: ledger.progress(command.id, status),
            )
        else:
            result = await binding.send_command(command.type, command.params)
        if isinstance(result, Mapping) and (result.get("queued") or result.get("status") == "sent"):
            return SENT
        return result

    async def cancel(self, command: DeviceCommand) -> bool:
        binding = self._binding(command.device)
        await binding.send_command("cancel", {"id": command.id})
        return False


@dataclass
class _Prop:
    value: Any
    attempts: int = 0
    next_at: float = 0.0
    command: str | None = None
    settle_until: float = 0.0
    drifted: str | None = None
    last_error: str | None = None


@dataclass
class Reconciler:
    """Desired-state reconciliation through the ledger."""

    engine: Any  # twin.runtime.engine.Engine (or a test double with twins/controller)
    ledger: Ledger
    interval: float = 2.0
    settle: float = 10.0
    max_attempts: int = 5
    backoff: RetryPolicy = field(default_factory=lambda: RetryPolicy(2.0, 2.0, 300.0))
    command_timeout: float = 30.0
    state: dict[tuple[str, str], _Prop] = field(default_factory=dict)
    _wake: trio.Event = field(default_factory=trio.Event)

    def poke(self) -> None:
        self._wake.set()

    def drift(self, device: str) -> dict[str, str]:
        return {p: s.drifted for (d, p), s in self.state.items() if d == device and s.drifted}

    def _writable(self, name: str) -> frozenset[str] | None:
        task = self.engine.controller.tasks.get(name)
        return None if task is None else task.config.writable

    async def step(self) -> None:
        now = self.ledger.clock()
        seen: set[tuple[str, str]] = set()
        owns = getattr(getattr(self.engine, "ownership", None), "owns", None)
        for twin in self.engine.twins.all():
            if owns is not None and not owns("Device", twin.name):
                continue  # another engine of the cluster reconciles it
            writable = self._writable(twin.name)
            for prop, want in twin.delta().items():
                if writable is not None and prop not in writable:
                    continue
                key = (twin.name, prop)
                seen.add(key)
                st = self.state.get(key)
                if st is None or st.value != want or type(st.value) is not type(want):
                    st = self.state[key] = _Prop(want)
                await self._advance(twin, prop, st, now)
        for key in [k for k in self.state if k not in seen]:
            st = self.state.pop(key)
            if st.drifted:
                log.info("device %s: %s converged", key[0], key[1])

    async def _advance(self, twin: Any, prop: str, st: _Prop, now: float) -> None:
        if st.command is not None:
            cmd = self.ledger.commands.get(st.command)
            if cmd is not None and not cmd.terminal:
                return
            st.command = None
            if cmd is not None and cmd.status is CommandStatus.SUCCESS:
                st.settle_until = now + self.settle
                return
            st.last_error = (cmd.error if cmd is not None else None) or "command lost"
            self._failed(twin, prop, st, now)
            return
        if st.settle_until:
            if now < st.settle_until:
                return
            st.settle_until = 0.0
            have = twin.reported.get(prop)
            st.last_error = (
                f"reported {have.value!r} still differs from desired {st.value!r}"
                if have is not None
                else "the device has not reported it"
            )
            self._failed(twin, prop, st, now)
            return
        if now < st.next_at:
            return
        try:
            cmd = await self.ledger.submit(
                twin.name,
                SET,
                {"property": prop, "value": st.value},
                command_timeout=self.command_timeout,
                source="reconciler",
                durable=False,
            )
        except Exception as exc:
            st.last_error = str(exc)
            st.attempts = self.max_attempts
            self._failed(twin, prop, st, now)
            return
        st.command = cmd.id

    def _failed(self, twin: Any, prop: str, st: _Prop, now: float) -> None:
        st.attempts += 1
        st.next_at = now + self.backoff.delay(st.attempts)
        if st.attempts >= self.max_attempts and st.drifted is None:
            st.drifted = f"{prop}: not converged after {st.attempts} attempts: {st.last_error}"
            log.warning("device %s (site %s): drifted: %s", twin.name, twin.site, st.drifted)
            bus = getattr(self.engine, "bus", None)
            if bus is not None:
                bus.publish(
                    {
                        "kind": "event",
                        "device": twin.name,
                        "site": twin.site,
                        "groups": twin.groups,
                        "ts": time.time(),
                        "type": "drifted",
                        "data": {"property": prop, "desired": st.value, "reason": st.drifted},
                    }
                )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("reconciler: step failed")
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()


class EngineEffects:
    def __init__(self, service: ControlService) -> None:
        self.svc = service

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
        ledger = self.svc.ledger
        cmd = await ledger.submit(
            device, command, params, command_timeout=command_timeout, source=source, durable=False
        )
        if wait:
            cmd = await ledger.wait(cmd.id)
            if cmd.status is not CommandStatus.SUCCESS:
                raise StepError(f"command {cmd.id} {cmd.status}: {cmd.error or ''}".strip())
        return {"command": cmd.id, "status": str(cmd.status)}

    async def set_desired(
        self, device: str, prop: str, value: Any, *, source: str
    ) -> dict[str, Any]:
        """A runtime override (twin/registry/overrides.py), not a revision: the spec in git
        stays the default, ``twin plan`` stays clean, and re-applying the YAML keeps it."""
        self.svc.ledger.catalog.validate(device, SET, {"property": prop, "value": value}, None)
        if self.svc.engine.twin(device) is None:
            raise StepError(f"device {device!r} is not running")
        try:
            o = await self.svc.engine.overrides.set(device, prop, value, source)
        except TwinError as exc:
            raise StepError(f"desired {prop} of {device} not recorded: {exc}") from exc
        return {"desired": {prop: value}, "override": o is not None}

    async def alarm(
        self, action: str, device: str, alarm: str, severity: str, message: str
    ) -> dict[str, Any]:
        engine = self.svc.engine
        now = engine.config.clock()
        twin = engine.twin(device)
        site = twin.site if twin is not None else ""
        groups = twin.groups if twin is not None else ()
        from twin.runtime.monitor import alarm_json

        def publish(event: str, a: Alarm) -> None:
            engine.bus.publish(
                {
                    "kind": "alarm",
                    "device": device,
                    "site": site,
                    "groups": groups,
                    "ts": now,
                    "event": event,
                    "alarm": alarm_json(a),
                }
            )

        if action == "raise":
            a, created = await engine.rio.call(
                engine.registry.raise_alarm, device, alarm, severity, message, now
            )
            if created:
                publish("raised", a)
            return {"alarm": a.id, "created": created}
        cleared = await engine.rio.call(engine.registry.clear_alarms, device, alarm, "scene", now)
        for a in cleared:
            publish("cleared", a)
        return {"cleared": [a.id for a in cleared]}

    async def notify(
        self, channels: Sequence[Mapping[str, Any]], subject: str, text: str,
        payload: Mapping[str, Any],
    ) -> dict[str, Any]:
        hook = self.svc.notify_hook
        if hook is None:
            raise StepError("notify: no notification service runs in this engine")
        outcomes = await hook(channels, subject, text, payload)
        failed = [o for o in outcomes if o.get("status") != "delivered"]
        if failed:
            raise StepError("notify: " + "; ".join(f"{o['target']}: {o['error']}" for o in failed))
        return {"notified": [o["target"] for o in outcomes]}

    async def webhook(
        self, method: str, url: str, body: Any, headers: Mapping[str, str], seconds: float
    ) -> dict[str, Any]:
        import httpx

        try:
            status = await self.svc.webhooks.send(method, url, body, headers, seconds)
        except WebhookRefused as exc:
            raise StepError(f"webhook {method} {url}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise StepError(f"webhook {method} {url}: {exc or type(exc).__name__}") from exc
        if status >= 400:
            raise StepError(f"webhook {method} {url} -> {status}")
        return {"status": status}


@dataclass(repr=False, eq=False)
class ControlService:
    """The engine service: ``Engine(..., services=[ControlService()])``."""

    def __repr__(self) -> str:
        return f"ControlService(name={self.name!r})"

    name: str = "control"
    reconcile_interval: float = 2.0
    reload_interval: float = 0.25
    scene_buffer: int = 10_000
    # where scene webhooks may go (twin.control.webhooks); default: TWIN_WEBHOOK_ALLOW
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy.from_env)
    # the scene action `notify`: the notification service registers its sender here at start
    # (twin.reports.service); None: no notification channels in this engine
    notify_hook: NotifyHook | None = None

    engine: Any = None
    catalog: Catalog = field(default_factory=Catalog)
    ledger: Ledger = field(init=False)
    scenes: SceneEngine = field(init=False)
    reconciler: Reconciler = field(init=False)
    _revision: int = -1
    _owned: int = -1  # the cluster ownership version the scenes and the ledger follow
    _devices: frozenset[str] = frozenset()
    adopt_interval: float = 0.5

    def _trace_sink(self, trace: dict[str, Any]) -> None:
        record = SceneTrace(
            trace["run_id"],
            trace["scene"],
            trace["started_at"],
            trace.get("finished_at"),
            trace["status"],
            trace,
        )
        self.engine.writer.put(lambda r: r.save_scene_trace(record))

    def _device_site(self, device: str) -> str | None:
        doc = self.catalog.device(device)
        return doc_site(doc) if doc is not None else None

    def _command_done(self, cmd: DeviceCommand) -> None:
        """Ledger listener: a successful command's declared effect becomes runtime desired state."""
        if cmd.status is not CommandStatus.SUCCESS or cmd.type == SET:
            return
        model = self.catalog.model(cmd.device)
        decls = (model or {}).get("properties") or {}
        for prop, value in command_sets(model, cmd.type, cmd.params).items():
            why = value_problem(value, decls[prop]) if prop in decls else "no such property"
            if why:
                log.warning("command %s device %s: sets %s: %s", cmd.id, cmd.device, prop, why)
                continue
            try:
                self.engine.overrides.set_soon(
                    cmd.device, prop, value, f"{cmd.source or 'unknown'} (command {cmd.type} {cmd.id})"
                )
            except TwinError as exc:
                log.warning("command %s device %s: %s not recorded: %s", cmd.id, cmd.device, prop, exc)

    def _reload(self) -> None:
        engine = self.engine
        ownership = engine.ownership
        if engine.revision_number == self._revision and ownership.version == self._owned:
            return
        self._revision = engine.revision_number
        self._owned = ownership.version
        self.catalog.update(engine.specs)
        specs = engine.specs
        if ownership.active:  # a cluster: this engine runs its share of the scenes
            specs = {k: v for k, v in specs.items() if k[0] != "Scene" or ownership.owns(*k)}
            mine = frozenset(n for k, n in engine.specs if k == "Device" and ownership.owns(k, n))
            lost, self._devices = self._devices - mine, mine
            if lost:
                self.ledger.release(lost)
        changed = self.scenes.load(specs)
        if changed:
            log.info("scenes: %d loaded (%s changed)", len(self.scenes.scenes), ", ".join(changed))
        self.reconciler.poke()

    async def _watch(self) -> None:
        while True:
            self._reload()
            await trio.sleep(self.reload_interval)

    async def _adopt(self) -> None:
        """Cluster: take the open commands of owned devices that another engine stored
        (submitted there, or left by an engine that died)."""
        while True:
            await trio.sleep(self.adopt_interval)
            try:
                await self.ledger.adopt()
            except Exception as exc:
                log.warning("ledger: adopting commands failed: %s", exc)

    async def _scene_gate(self, scene: str, key: str) -> bool:
        return bool(await self.engine.ownership.scene_gate(scene, key))

    def _subscribe(self) -> Any:
        from twin.runtime.bus import Filter

        flt = Filter.of(kinds=["reading", "status", "alarm"])
        return self.engine.bus.open(flt, buffer=self.scene_buffer, name="scenes")

    def _scene_crashed(self, scene: Any, exc: BaseException | None) -> None:
        """A scene run crashed (a bug, not a failed step): count, log, alarm on ``_engine``
        (``scene_failure:<name>``); cleared by its next successful run."""
        sup = getattr(self.engine, "supervision", None)
        if sup is None:
            return
        if exc is None:
            sup.recovered("scene", scene.name)
        else:
            site = str(getattr(scene, "site", "") or "")
            sup.failed("scene", scene.name, exc, site=site, failures=1, delay=0.0)

    def _feed(self, event: Any) -> None:
        """One bus event into the scene engine; a failure loses this event only."""
        try:
            self.scenes.feed(event)
        except Exception as exc:
            sup = getattr(self.engine, "supervision", None)
            if sup is not None:
                sup.failed(
                    "scenes", "feed", exc, site=str(event.get("site") or ""), failures=1, delay=0.0
                )
            else:
                log.exception(
                    "scenes: event %s of %s failed", event.get("kind"), event.get("device")
                )

    async def _pump(self, sub: Any) -> None:
        while True:
            try:
                async for event in sub.receive:
                    self._feed(event)
                    # what is queued already, in the same turn: a receive per event is a Trio
                    # checkpoint, a scheduling round per reading under MQTT load
                    while True:
                        try:
                            event = sub.receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break  # closed: the async for's next receive ends the loop
                        self._feed(event)
            finally:
                self.engine.bus.close(sub)
            log.warning("scenes: fell behind the bus and were dropped; resubscribing")
            sub = self._subscribe()

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.engine = engine
        self.catalog = Catalog(engine.specs)
        transport = EngineTransport(engine, self.catalog)
        self.ledger = Ledger(engine.registry, transport, self.catalog, clock=engine.config.clock)
        transport.ledger = self.ledger
        ownership = engine.ownership
        if ownership.active:
            self.ledger.owns = lambda device: engine.ownership.owns("Device", device)
            self.ledger.claim = ownership.claim_command
            self.ledger.unclaim = ownership.unclaim_command
        self.ledger.listeners.append(self._command_done)
        self.reconciler = Reconciler(engine, self.ledger, interval=self.reconcile_interval)
        engine.desired_listeners.append(lambda device: self.reconciler.poke())
        self.scenes = SceneEngine(
            EngineEffects(self),
            timezone=lambda site: self.catalog.timezone(site=site),
            wall=engine.config.clock,
            trace_sink=self._trace_sink,
            on_crash=self._scene_crashed,
            device_site=self._device_site,
            gate=self._scene_gate if ownership.active else None,
        )
        # subscribe before taking the snapshot: device tasks start without waiting for them,
        # so a status change between the snapshot and a later subscription would be lost
        sub = self._subscribe()
        values = {(t.name, p): v.value for t in engine.twins.all() for p, v in t.reported.items()}
        statuses = {t.name: str(t.status) for t in engine.twins.all()}
        self.scenes.seed(values, statuses)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.ledger.run)
            await nursery.start(self.scenes.run)
            self._reload()
            nursery.start_soon(self._pump, sub)
            nursery.start_soon(self._watch)
            if ownership.active:
                nursery.start_soon(self._adopt)
            await nursery.start(self.reconciler.run)
            engine.service_info[self.name] = self
            task_status.started(self)


def control_of(engine: Any) -> ControlService:
    svc = engine.service_info.get("control")
    if not isinstance(svc, ControlService):
        from twin.errors import TwinError

        raise TwinError(
            "the control service is not running in this engine",
            hint="start the engine with services=[ControlService(), ...]",
        )
    return svc
