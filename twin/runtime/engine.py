"""The engine: the composition root of the runtime, one Trio nursery tree.

```
engine
├─ registry writer   batched status / alarm / metric / audit writes (worker threads)
├─ controller        one task per device (binding I/O, heartbeat watchdog, desired writes)
├─ overrides         runtime desired values (scenes, commands, operators) over spec.desired
├─ reload watcher    polls registry.head() and reconciles a new revision within a second
├─ metrics flusher   per-device metrics to device_metrics every ``metrics_interval``
├─ asyncio bridge    one asyncio loop thread for asyncua, aiocoap and pymodbus' serial client
                     and servers (twin.bindings.aio; Modbus TCP polling is Trio-native),
                     started lazily, stopped when the engine stops
└─ services          handed in by the caller (the API server from twin.api), each
                     ``async def service(engine, *, task_status)``
```
Start order (``Engine.run``): registry writer and controller, restored statuses, then the
head revision is *read* (``engine.specs`` and ``engine.revision`` are set, so services see the
documents they will serve), then every service is started and reports readiness, and only
then are the device tasks started (``reload``). Consumers therefore subscribe to the bus
before the first producer runs: no reading produced after startup is lost (the time-series
pump, the scenes and the MQTT hub the mqtt binding needs are all up before any device).
Later revisions are reconciled by the reload watcher. ``Engine.run`` reports the engine itself
once everything is up. Cancel the surrounding scope to stop; cleanup is shielded.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio

from twin.bindings import aio
from twin.bindings.base import BindingContext
from twin.bindings.http import IngestHub
from twin.errors import TwinError
from twin.plugins import registry as plugin_registry
from twin.plugins.host import PluginCollector
from twin.registry.base import Key, Registry, Revision
from twin.runtime.bus import Bus
from twin.runtime.cluster import EVERYTHING, Ownership
from twin.runtime.controllers import DeviceController
from twin.runtime.device import Backoff, DeviceRuntime
from twin.runtime.device_config import Changes, Heartbeat
from twin.runtime.metrics import EngineMetrics
from twin.runtime.monitor import Monitor
from twin.runtime.overrides import Overrides
from twin.runtime.regio import RegistryIO, RegistryWriter
from twin.runtime.state import DeviceTwin, Status, TwinStore
from twin.runtime.supervisor import ENGINE_DEVICE, RestartPolicy, Supervision, supervise
from twin.video.service import VideoService

log = logging.getLogger(__name__)


class Service(Protocol):
    def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = ...
    ) -> Awaitable[None]: ...


@dataclass
class EngineConfig:
    state_dir: Path = Path(".twin")
    reload_interval: float = 0.25
    metrics_interval: float = 60.0
    channel_size: int = 256
    backoff: Backoff = field(default_factory=Backoff)
    default_heartbeat: Heartbeat | None = None
    clock: Callable[[], float] = time.time
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    """Restart backoff and quarantine of supervised services, engine loops and devices."""
    edge: str | None = None
    """Edge mode (``twin edge``): run only the devices this EdgeNode owns. Otherwise (the
    cloud) devices an EdgeNode owns are left to their edge (``twin/spec/edge_check.py``)."""


class Engine:
    def __init__(
        self,
        registry: Registry,
        config: EngineConfig | None = None,
        services: Sequence[Service] = (),
    ) -> None:
        self.config = config or EngineConfig()
        self.registry = registry
        self.rio = RegistryIO(registry)
        self.writer = RegistryWriter(self.rio)
        self.twins = TwinStore()
        self.bus = Bus()
        self.hub = IngestHub()
        self.prom = EngineMetrics(self.twins)
        self.supervision = Supervision(self.prom)
        self.monitor = Monitor(
            self.twins,
            self.bus,
            self.writer,
            clock=self.config.clock,
            on_transition=self._on_transition,
        )
        self.overrides = Overrides(
            registry,
            self.rio,
            lambda: self.specs,
            self._overrides_changed,
            self.config.clock,
        )
        # cameras: one ffmpeg each, under this engine's supervisor, retried for ever (a camera
        # that comes back is picked up within 30 s; never quarantined)
        self.video = VideoService(
            self.config.state_dir,
            partial(supervise, supervision=self.supervision, policy=RestartPolicy(
                initial=0.5, maximum=30.0, reset_after=30.0, quarantine_after=1_000_000)),
        )
        self.desired_listeners: list[Callable[[str], None]] = []  # e.g. the reconciler's poke
        self.runtime = DeviceRuntime(
            twins=self.twins,
            bus=self.bus,
            monitor=self.monitor,
            binding_context=BindingContext(
                ingest=self.hub,
                clock=self.config.clock,
                reported=self._reported_value,
                last_ts=self._reported_ts,
                last_stored=self._last_stored,
                last_command=self._last_command,
                video=self.video,
            ),
            backoff=self.config.backoff,
            default_heartbeat=self.config.default_heartbeat,
            channel_size=self.config.channel_size,
            clock=self.config.clock,
            prom=self.prom,
            overrides=self.overrides,
            supervision=self.supervision,
            restart=self.config.restart,
        )
        self.supervision.raise_alarm = self.monitor.raise_alarm
        self.supervision.clear_alarm = self.monitor.clear_alarm
        self.controller = DeviceController(self.runtime)
        # plugins (codecs, transforms, scene steps): the process's host, loaded per revision;
        # a failing plugin raises an alarm on _engine (type plugin_failure:NAME)
        self.plugins = plugin_registry.host()
        self.plugins.on_alarm = lambda name, msg: self._on_loop(partial(
            self.monitor.raise_alarm, ENGINE_DEVICE, f"plugin_failure:{name}", "major", msg))
        self.plugins.on_clear = lambda name: self._on_loop(partial(
            self.monitor.clear_alarm, ENGINE_DEVICE, f"plugin_failure:{name}"))
        self._token: trio.lowlevel.TrioToken | None = None
        self.prom.registry.register(PluginCollector(self.plugins))
        self.services = list(services)
        self.service_info: dict[str, Any] = {}
        self.revision: Revision | None = None
        self.specs: dict[Key, dict[str, Any]] = {}
        self.last_changes = Changes()
        self.started_at: float | None = None
        self._reconciled: int | None = None  # revision number the device tasks run
        # what this engine runs: everything, or its share of a cluster (twin/runtime/cluster.py)
        self.ownership: Ownership = EVERYTHING
        self._owned_version = 0  # the ownership version the device tasks run
        self._settled = trio.Event()
        self._poke = trio.Event()
        self._revision_changed = trio.Event()
        self._lock = trio.Lock()

    # -- accessors used by services ------------------------------------------------------------
    @property
    def revision_number(self) -> int:
        return self.revision.number if self.revision else 0

    def device_doc(self, name: str) -> dict[str, Any] | None:
        return self.specs.get(("Device", name))

    def twin(self, name: str) -> DeviceTwin | None:
        return self.twins.get(name)

    def poke(self) -> None:
        """Reload now (after an apply through the API)."""
        self._poke.set()

    async def wait_revision(self, number: int) -> None:
        """Wait until the engine runs revision ``number`` or newer."""
        while self.revision_number < number:
            await self._revision_changed.wait()

    def ownership_changed(self) -> None:
        """The cluster moved devices or scenes to or from this engine: reconcile now."""
        if self._settled.is_set():
            self._settled = trio.Event()
        self.poke()

    async def settled(self) -> None:
        """Wait until the device tasks match the current ownership (a released device's task
        has stopped before its owner row is freed for another engine)."""
        while self._owned_version != self.ownership.version:
            if self._settled.is_set():
                self._settled = trio.Event()
            await self._settled.wait()

    def _reported_value(self, device: str, point: str) -> Any:
        twin = self.twins.get(device)
        rv = twin.reported.get(point) if twin is not None else None
        return None if rv is None else rv.value

    def _reported_ts(self, device: str, point: str) -> float | None:
        twin = self.twins.get(device)
        rv = twin.reported.get(point) if twin is not None else None
        return None if rv is None else rv.ts

    async def _last_command(self, device: str, types: Sequence[str]) -> str | None:
        """The type of the newest successful command of ``types`` to ``device`` in the command
        ledger (what a camera resumes after a restart: recording, streaming), or None."""
        rows = await self.rio.call(self.registry.commands, device=device, statuses=["success"],
                                   limit=1000)
        return next((r.type for r in rows if r.type in types), None)

    async def _last_stored(self, device: str, points: list[str], since: float) -> dict[str, float]:
        """Per point, the timestamp of its newest value in the time-series store since
        ``since`` (none without a store): where a binding's history backfill starts after an
        engine restart."""
        from twin.runtime.timeseries_service import timeseries_of

        svc = timeseries_of(self)
        store = getattr(svc, "store", None)
        if store is None or not points:
            return {}
        now = self.config.clock()

        def query() -> dict[str, float]:
            import calendar

            from twin.timeseries.base import Selector

            sel = Selector.of(devices=[device], metrics=points)
            end = now + 1.0
            table = store.aggregate("raw", sel, since, end, end - since)
            out: dict[str, float] = {}
            metrics = table.column("metric").to_pylist()
            for metric, ts in zip(metrics, table.column("last_ts").to_pylist(), strict=True):
                if ts is None:
                    continue
                t = ts.timestamp() if ts.tzinfo else calendar.timegm(ts.utctimetuple())
                out[metric] = max(out.get(metric, t), t)
            return out

        try:
            return await trio.to_thread.run_sync(query)
        except Exception as exc:  # a store problem must not keep a device from connecting
            log.warning("engine: last stored values of %s: %s", device, exc)
            return {}

    def _overrides_changed(self, device: str) -> None:
        task = self.controller.tasks.get(device)
        if task is not None:
            task.refresh_desired()
        for fn in self.desired_listeners:
            fn(device)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine's Trio thread (plugin hooks fire from worker threads too)."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # another thread: hand it over
            if self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(fn)
            return
        fn()

    def _on_transition(self, twin: DeviceTwin, old: Status, new: Status) -> None:
        self.prom.child(self.prom.status_transitions, str(new)).inc()

    # -- reload -------------------------------------------------------------------------------
    async def _read_head(self) -> None:
        """Load the head revision's documents without starting devices (start-up, before the
        services): services configure themselves from ``engine.specs`` before any reading."""
        async with self._lock:
            head = await self.rio.call(self.registry.head)
            if head is None:
                return
            self.specs = await self.rio.call(self.registry.specs, head.number)
            self.revision = head

    async def reload(self) -> Changes | None:
        """Reconcile the registry's head if it moved. Returns what changed (None: nothing new)."""
        async with self._lock:
            head = await self.rio.call(self.registry.head)
            owned = self.ownership.version
            if head is None or (head.number == self._reconciled and owned == self._owned_version):
                return None
            if self.revision is not None and head.number == self.revision.number:
                specs = self.specs  # read at start-up by _read_head
            else:
                specs = await self.rio.call(self.registry.specs, head.number)
            self.overrides.prune(specs)  # a changed spec value wins over a runtime override
            runnable = self._runnable(specs)  # not the devices an edge node runs
            mine, moved = runnable, frozenset[str]()
            if self.ownership.active:
                own = self.ownership.owns
                mine = {k: v for k, v in runnable.items() if k[0] != "Device" or own(*k)}
                moved = frozenset(k[1] for k in runnable if k[0] == "Device" and k not in mine)
            # new/changed plugin modules are loaded first and swapped in atomically; one that
            # does not load is refused (logged, load_errors) and the old one keeps running
            if self.plugins.changed(specs):  # (through rio: tracked like a registry call)
                await self.rio.call(self.plugins.sync, specs)
            changes = await self.controller.reconcile(mine, handover=moved)
            self._reconciled = head.number
            self._owned_version = owned
            self._settled.set()
            self.specs, self.revision, self.last_changes = specs, head, changes
            self.prom.revision.set(head.number)
            self.prom.device_tasks.set(len(self.controller.tasks))
            self.prom.reloads.inc()
            log.info("engine: running revision %d (%s)", head.number, changes.summary())
            self._revision_changed.set()
            self._revision_changed = trio.Event()
            return changes

    def _runnable(self, specs: dict[Key, dict[str, Any]]) -> dict[Key, dict[str, Any]]:
        """The documents whose devices this engine runs (see ``EngineConfig.edge``)."""
        if self.config.edge is None and not any(k == "EdgeNode" for k, _ in specs):
            return specs
        from twin.spec.edge_check import edge_owned

        owner = edge_owned(specs)
        mine = self.config.edge
        return {
            key: doc
            for key, doc in specs.items()
            if key[0] != "Device" or owner.get(key[1]) == mine
        }

    async def _watch(self) -> None:
        while True:
            with trio.move_on_after(self.config.reload_interval):
                await self._poke.wait()
            self._poke = trio.Event()
            try:
                await self.reload()
            except Exception:
                log.exception("engine: reload failed; the running devices are unchanged")

    async def _flush_metrics(self) -> None:
        while True:
            await trio.sleep(self.config.metrics_interval)
            self.flush_metrics()

    def flush_metrics(self) -> None:
        samples = self.monitor.metric_samples(self.twins.all())
        if samples:
            self.writer.put(lambda r: r.record_metrics(samples))
        self.prom.alarms_active.set(len(self.monitor.active))
        self.prom.registry_writes.set(len(self.writer))

    # -- run ----------------------------------------------------------------------------------
    def _restore_sync(self) -> tuple[dict[str, Status], list[Any], list[Any]]:
        """Statuses, uncleared alarms and runtime overrides to resume from (runs in a worker
        thread).

        A device the engine never reported on still carries the registry's initial
        ``offline``: it has no status history, and is treated as unknown.
        """
        reg = self.registry
        statuses: dict[str, Status] = {}
        valid = {str(v) for v in Status}
        reported = reg.last_status_changes()  # one query, not one per device
        for row in reg.device_rows():
            name, status = str(row["name"]), str(row.get("status") or "")
            if status not in valid:
                continue
            if status == Status.OFFLINE and name not in reported:
                continue
            statuses[name] = Status(status)
        alarms = reg.alarms(states=["active", "acknowledged"], limit=1_000_000)
        return statuses, alarms, reg.overrides()

    async def _restore(self) -> None:
        statuses, alarms, overrides = await self.rio.call(self._restore_sync)
        self.runtime.initial_status = statuses
        self.monitor.restore([], alarms)
        self.overrides.restore(overrides)

    async def run(self, *, task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_at = self.config.clock()
        self._token = trio.lowlevel.current_trio_token()
        self.plugins.acquire()
        try:
            # the asyncio loop (asyncua, aiocoap, pymodbus serial/servers) starts lazily and stops with us
            async with aio.lifetime(), trio.open_nursery() as nursery:
                # the core: a failure here ends the engine (with one clear line)
                await nursery.start(_core, "registry writer", self.writer.run)
                await nursery.start(_core, "device controller", self.controller.run)
                await nursery.start(_core, "overrides", self.overrides.run)
                await self._restore()
                await self._read_head()
                # services first (they subscribe to the bus), devices after: see the docstring;
                # each under its supervisor (a failure restarts it, never its siblings)
                for service in self.services:
                    name = str(
                        getattr(service, "name", None)
                        or getattr(service, "__name__", type(service).__name__)
                    )
                    self.service_info[name] = await nursery.start(
                        partial(
                            supervise,
                            partial(service, self),
                            kind="service",
                            name=name,
                            supervision=self.supervision,
                            policy=self.config.restart,
                            with_status=True,
                            on_started=partial(self.service_info.__setitem__, name),
                        )
                    )
                await self.reload()
                for loop_name, loop in (("reload", self._watch), ("metrics", self._flush_metrics)):
                    nursery.start_soon(
                        partial(
                            supervise,
                            loop,
                            kind="engine",
                            name=loop_name,
                            supervision=self.supervision,
                            policy=self.config.restart,
                            restart_on_return=True,
                        )
                    )
                log.info(
                    "engine: up (revision %d, %d devices)", self.revision_number, len(self.twins)
                )
                task_status.started(self)
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                self.flush_metrics()
                await self.writer.drain()
                self.plugins.release()  # the last engine of the process ends the Starlark workers


class EngineCoreError(TwinError):
    """The engine's core (registry writer, device controller) failed: the engine stops."""


async def _core(
    name: str,
    run: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a core part of the engine; its failure ends the engine with one clear line (the
    CLI prints ``error: engine core failure in registry writer: ...``)."""
    try:
        await run(task_status=task_status)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        log.critical("engine: core failure in %s: %s", name, leaf, exc_info=exc)
        raise EngineCoreError(
            f"engine core failure in {name}: {type(leaf).__name__}: {leaf}",
            hint="the engine stopped; the log has the traceback (registry reachable? disk full?)",
        ) from exc
