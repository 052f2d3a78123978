"""One task per device: binding I/O and the heartbeat watchdog.

Each device is handled sequentially by its own task; devices run in parallel. Binding failures
are retried with exponential backoff and jitter; nothing a device does can take another device
or the engine down (errors are caught at the supervisor, cancellation is never swallowed).

Desired values are not written here: the control layer's reconciler
(:class:`twin.control.service.ControlService`) turns every writable delta into a command in
the persisted ledger, which delivers it through the binding. That is the only write path.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from twin.bindings import plugins as plugin_edge
from twin.bindings.base import (
    Binding,
    BindingContext,
    DeviceEvent,
    EventType,
    Message,
    Quality,
    Reading,
)
from twin.bindings.factory import create_binding
from twin.bindings.plugins import transform_of
from twin.bindings.values import TS_MAX, TS_MIN, ValueRefused, check_ts, is_safe
from twin.errors import BindingError
from twin.plugins import registry as plugin_registry
from twin.runtime.bus import Bus
from twin.runtime.device_config import DeviceConfig, Heartbeat
from twin.runtime.monitor import Monitor
from twin.runtime.state import DeviceTwin, ReportedValue, Status, TwinStore
from twin.runtime.supervisor import RestartPolicy, Supervision, supervise

log = logging.getLogger(__name__)

TRANSFORM_BATCH = 1000
"""Most readings one transform call gets (what is queued for the device when it runs)."""


@dataclass
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    reset_after: float = 60.0  # a session that lasted this long resets the attempt count

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * self.factor**attempt)
        return base * rng.uniform(0.5, 1.0)


class Watchdog:
    """Every device's heartbeat deadline in one heap, watched by one task.

    One sleeping task per device cost a timer, a cancellation and a task switch per device
    and timeout period; with 10k devices timing out together (a network outage) that backlog
    made the engine notice them seconds late. Here a reading only moves
    ``DeviceTask.deadline`` forward (no heap operation); the entry is re-pushed when it comes
    up early. Heap keys never exceed a task's real deadline (deadlines only move forward), so a
    timeout is noticed at its deadline.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, DeviceTask]] = []
        self._seq = 0
        self._wake = trio.Event()
        self.fired = 0

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, task: DeviceTask) -> None:
        if task._armed or math.isinf(task.deadline):
            return
        task._armed = True
        self._seq += 1
        heapq.heappush(self._heap, (task.deadline, self._seq, task))
        if self._heap[0][2] is task:
            self._wake.set()

    def expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, task = heapq.heappop(heap)
            task._armed = False
            if task.scope.cancel_called or task.done.is_set():
                continue
            if task.deadline <= now:
                task.deadline = math.inf
                self.fired += 1
                try:
                    task.rt.monitor.timeout(task.twin, task.config.heartbeat.timeout)
                except Exception:
                    log.exception("device %s: heartbeat timeout handling failed", task.name)
            else:
                self.arm(task)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            self.expire(trio.current_time())
            if self._heap:
                with trio.move_on_at(self._heap[0][0]):
                    await self._wake.wait()
            else:
                await self._wake.wait()


@dataclass
class DeviceRuntime:
    """What every device task shares (handed over by the engine)."""

    twins: TwinStore
    bus: Bus
    monitor: Monitor
    binding_context: BindingContext = field(default_factory=BindingContext)
    backoff: Backoff = field(default_factory=Backoff)
    default_heartbeat: Heartbeat | None = None
    channel_size: int = 256
    clock: Callable[[], float] = time.time
    prom: Any = None  # twin.runtime.metrics.EngineMetrics or None
    binding_factory: Callable[[DeviceConfig, BindingContext], Binding] | None = None
    supervision: Supervision = field(default_factory=Supervision)  # the engine's (alarms, metrics)
    restart: RestartPolicy = field(
        default_factory=RestartPolicy
    )  # task crashes: backoff, quarantine
    initial_status: dict[str, Status] = field(default_factory=dict)  # restored after a restart
    watchdog: Watchdog = field(default_factory=Watchdog)  # run by the DeviceController
    overrides: Any = None  # twin.runtime.overrides.Overrides: runtime desired values

    @staticmethod
    def plugins_in_thread(name: str) -> bool:
        """Whether plugin ``name`` is called off the event loop (a Starlark worker round trip)."""
        return plugin_registry.host().uses_thread(name)

    def device_removed(self, name: str, *, clear_alarms: bool = True) -> None:
        twin = self.twins.get(name)
        if twin is not None and clear_alarms:
            self.monitor.removed(twin)
        self.twins.remove(name)
        self.binding_context.models.pop(name, None)


def _ts_ok(ts: Any) -> bool:
    if type(ts) is float:
        return TS_MIN <= ts <= TS_MAX
    try:
        check_ts(ts)
    except ValueRefused:
        return False
    return True


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class SubscriptionEnded(BindingError):
    temporary = True


class DeviceTaskError(RuntimeError):
    """The device task itself failed (not its binding's peer): handled by its supervisor."""


class DeviceTask:
    def __init__(self, config: DeviceConfig, runtime: DeviceRuntime) -> None:
        self.config = config
        self.rt = runtime
        self.name = config.name
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.deadline = math.inf
        self._armed = False  # has an entry in the runtime's Watchdog heap
        self._prepared = False
        self.binding: Binding | None = None
        self.connected = False
        self.quarantined = False  # by its supervisor, after repeated failures
        self.attempts = 0
        self._rng = random.Random(zlib.crc32(config.name.encode()))
        self._readings_counter: Any = None
        self._uncounted = 0
        self.bad_values = 0  # values dropped here (an edge failed to refuse them)
        self.twin = self._init_twin()

    # -- lifecycle ---------------------------------------------------------------------------
    def _init_twin(self) -> DeviceTwin:
        fresh = self.name not in self.rt.twins
        twin = self.rt.twins.ensure(self.name)
        if fresh and self.name in self.rt.initial_status:
            twin.status = self.rt.initial_status[self.name]
            twin.maintenance = twin.status == Status.MAINTENANCE
        self._apply_config(twin, self.config)
        twin.binding = self.config.protocol
        twin.metrics.window_start = trio.current_time()
        if twin.status == Status.ONLINE and twin.metrics.online_since is None:
            twin.metrics.online_since = twin.metrics.window_start
        return twin

    def _apply_config(self, twin: DeviceTwin, cfg: DeviceConfig) -> None:
        twin.site = cfg.site
        twin.groups = cfg.groups
        self._set_desired(twin, cfg)

    def _set_desired(self, twin: DeviceTwin, cfg: DeviceConfig) -> None:
        """The twin's desired state: spec.desired with the runtime overrides in force on top
        (twin/registry/overrides.py)."""
        if self.rt.overrides is None:
            twin.desired, twin.overrides = dict(cfg.desired), {}
        else:
            twin.desired, twin.overrides = self.rt.overrides.effective(self.name, cfg.doc)

    def refresh_desired(self) -> None:
        """Re-read the overrides (one was set or cleared)."""
        self._set_desired(self.twin, self.config)

    def update(self, cfg: DeviceConfig) -> None:
        """Apply a change that needs no restart (desired values, maintenance, metadata)."""
        self.config = cfg
        self._apply_config(self.twin, cfg)
        self.rt.monitor.set_maintenance(self.twin, cfg.maintenance, alive=self.alive)

    @property
    def alive(self) -> bool:
        return trio.current_time() < self.deadline

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()

    def prepare(self) -> None:
        """The synchronous part of starting (arm the heartbeat deadline, maintenance, metric
        children). Idempotent; the controller calls it before ``start_soon(task.run)`` so that
        starting 10k tasks costs no scheduler round trip per task."""
        if self._prepared:
            return
        self._prepared = True
        self.deadline = trio.current_time() + self.config.heartbeat.timeout
        self.rt.watchdog.arm(self)
        if self.config.maintenance:
            self.rt.monitor.set_maintenance(self.twin, True, alive=True)
        if self.rt.prom is not None:
            self._readings_counter = self.rt.prom.readings_child(self.config.protocol or "none")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The device's whole life. Binding failures (``BindingError``) are retried inside
        ``_supervise`` with the binding backoff; anything else (a bug in a binding, in
        ``handle`` or in building the binding) is caught here by the device's supervisor:
        logged, counted, alarmed, restarted with backoff, quarantined when it keeps failing
        (see twin.runtime.supervisor). It never reaches the controller's nursery."""
        try:
            with self.scope:
                self.prepare()
                task_status.started()
                await supervise(
                    self._supervise,
                    kind="device",
                    name=self.name,
                    site=self.config.site,
                    supervision=self.rt.supervision,
                    policy=self.rt.restart,
                    on_quarantine=self._quarantined,
                    on_recovered=self._recovered,
                    rng=self._rng,
                )
        finally:
            self.done.set()

    def _quarantined(self, failures: int, error: BaseException) -> None:
        self.quarantined = True
        self.connected = False
        self.deadline = math.inf  # stays fault (not offline) until it talks again
        message = f"quarantined after {failures} failures: {type(error).__name__}: {error}"
        self.rt.monitor.fault(self.twin, message[:300], source="supervisor")

    def _recovered(self) -> None:
        if self.quarantined or self.twin.fault_source == "supervisor":
            self.quarantined = False
            if self.twin.fault_source == "supervisor":
                self.rt.monitor.fault_cleared(self.twin)

    # -- heartbeat ----------------------------------------------------------------------------
    def _seen(self) -> None:
        was_dead = math.isinf(self.deadline)
        self.deadline = trio.current_time() + self.config.heartbeat.timeout
        if was_dead:
            self.rt.watchdog.arm(self)
        self.twin.last_seen = self.rt.clock()
        self.rt.monitor.seen(self.twin)

    # -- binding supervision -------------------------------------------------------------------
    def _make_binding(self) -> Binding:
        context = self.rt.binding_context
        context.models[self.name] = self.config.model
        if self.rt.binding_factory is not None:
            return self.rt.binding_factory(self.config, context)
        return create_binding(self.config.doc, context)

    async def _supervise(self) -> None:
        try:
            self.binding = self._make_binding()
        except BindingError as config_error:
            log.error("device %s (site %s): %s", self.name, self.config.site, config_error)
            self.twin.metrics.errors += 1
            self.rt.monitor.fault(self.twin, str(config_error), source="config")
            await trio.sleep_forever()
        binding = self.binding
        assert binding is not None
        while True:
            started = trio.current_time()
            try:
                await self._session(binding)
            except Exception as group:
                exc = _unwrap(group)
                if not isinstance(exc, BindingError):
                    raise  # a bug, not the peer: the device's supervisor handles it (run())
                self.twin.metrics.errors += 1
                if self.rt.prom is not None:
                    self.rt.prom.binding_errors_child(self.config.protocol or "none").inc()
                log.warning(
                    "device %s (site %s): binding %s failed (attempt %d): %s",
                    self.name,
                    self.config.site,
                    self.config.protocol,
                    self.attempts + 1,
                    exc,
                )
                if (
                    isinstance(exc, BindingError)
                    and not exc.temporary
                    and not isinstance(exc, SubscriptionEnded)
                ):
                    self.rt.monitor.fault(self.twin, str(exc), source="binding")
            finally:
                self.connected = False
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    try:
                        await binding.close()
                    except Exception as close_error:
                        log.warning("device %s: closing binding failed: %s", self.name, close_error)
            if trio.current_time() - started >= self.rt.backoff.reset_after:
                self.attempts = 0
            delay = self.rt.backoff.delay(self.attempts, self._rng)
            self.attempts += 1
            await trio.sleep(delay)

    async def _session(self, binding: Binding) -> None:
        await binding.connect()
        self.connected = True
        send, receive = trio.open_memory_channel[Message](self.rt.channel_size)

        async def pump() -> None:
            async with send:
                await binding.subscribe(send)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            async with receive:
                async for first in receive:
                    # everything queued, in one turn: a receive per message is a checkpoint,
                    # so one message per scheduling round while a binding (e.g. the MQTT
                    # hub, 256 messages per round) fills the bounded channel: it overflowed
                    # (and dropped) at a fraction of the rate the task can handle
                    batch = [first]
                    while len(batch) < TRANSFORM_BATCH:
                        try:
                            batch.append(receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    transform = transform_of(self.config.doc, self.config.model)
                    if transform is not None:  # one plugin call per batch of what is queued
                        batch = await self._transform(transform, batch)
                    try:
                        for message in batch:
                            try:
                                self.handle(message)
                            except Exception as exc:  # a bug: restart the device (supervisor)
                                raise DeviceTaskError(
                                    f"device {self.name}: handling {type(message).__name__} "
                                    f"failed: {type(exc).__name__}: {exc}"
                                ) from exc
                    finally:
                        self._count()
            raise SubscriptionEnded(f"device {self.name}: subscription ended")

    async def _transform(self, name: str, batch: list[Message]) -> list[Message]:
        """The device's transform plugin over the readings of a batch that are not in the
        write-ahead log yet (logged ones were transformed at their edge, before the log).
        Wasm runs inline (bounded by its fuel and time limits); Starlark in a worker thread,
        so the event loop never waits on a script. A failed call marks the readings bad."""
        readings = [m for m in batch if isinstance(m, Reading) and not m.logged]
        if not readings:
            return batch
        if self.rt.plugins_in_thread(name):
            out = await trio.to_thread.run_sync(plugin_edge.transform, name, readings)
        else:
            out = plugin_edge.transform(name, readings)
        rest = [m for m in batch if not (isinstance(m, Reading) and not m.logged)]
        return [*out, *rest]

    def _bad_value(self, message: Reading) -> None:
        """A binding let through a value the edges must refuse (twin.bindings.values): count it,
        drop it, say so once in a while. Never passed on to the twin, bus or store."""
        self.twin.metrics.errors += 1
        self.bad_values += 1
        if self.rt.prom is not None:
            self.rt.prom.dropped("device")
        if self.bad_values == 1 or self.bad_values % 1000 == 0:
            log.error(
                "device %s (site %s): binding %s passed a value that must be refused at the "
                "edge (point %r); dropped (%d so far)",
                self.name,
                self.config.site,
                self.config.protocol,
                message.point,
                self.bad_values,
            )

    def _count(self) -> None:
        """The readings :meth:`handle` took since the last call → the /metrics counter."""
        if self._uncounted:
            if self._readings_counter is not None:
                self._readings_counter.inc(self._uncounted)
            self._uncounted = 0

    # -- the hot path ------------------------------------------------------------------------
    def handle(self, message: Message, size: int = 0) -> None:
        twin = self.twin
        m = twin.metrics
        m.messages_in += 1
        m.bytes_in += size
        now = self.rt.clock()
        if isinstance(message, Reading):
            if message.device != self.name:
                return
            if not (is_safe(message.value) and _ts_ok(message.ts)):
                self._bad_value(message)
                return
            twin.reported[message.point] = ReportedValue(message.value, message.ts, message.quality)
            self._uncounted += 1  # on /metrics per batch (_count): Counter.inc is ~0.5 us
            if message.quality is not Quality.STALE:  # stale: the binding speaks, not the device
                m.last_latency = max(0.0, now - message.ts)
                self._seen()
            event = {
                "kind": "reading",
                "device": self.name,
                "site": twin.site,
                "groups": twin.groups,
                "ts": message.ts,
                "point": message.point,
                "value": message.value,
                "quality": str(message.quality),
            }
            if message.logged:  # in the write-ahead log: the time-series service has it
                event["logged"] = True
            self.rt.bus.publish(event)
            return
        if isinstance(message, DeviceEvent):
            if message.type is EventType.FAULT:
                self._seen()
                self.rt.monitor.fault(twin, str(message.data.get("message", "device fault")))
            elif message.type is EventType.OK:
                self._seen()
                self.rt.monitor.fault_cleared(twin)
            else:
                self._seen()
            if message.type is not EventType.HEARTBEAT:
                self.rt.bus.publish(
                    {
                        "kind": "event",
                        "device": self.name,
                        "site": twin.site,
                        "groups": twin.groups,
                        "ts": message.ts,
                        "type": str(message.type),
                        "data": dict(message.data),
                    }
                )
