"""The engine service of reports and notifications (``engine.service_info["reports"]``).

- **Schedules**: every ``Report`` with ``schedule.cron`` runs at its fire times in the
  schedule's time zone (DST rules of :mod:`twin.control.cron`); the period is resolved at the
  fire time (``yesterday`` of a 06:00 run is the day before). A fire time missed while the
  engine was down — one after the newest recorded schedule run, before now — runs **once** at
  start (``trigger: missed-schedule``), however many were missed.
- **Runs on demand** (the API): :meth:`start_run` records the run and returns at once; the
  run goes on in this service's nursery.
- **Notifications**: alarm events from the bus into :class:`twin.reports.notify.Notifier`;
  the scene action ``notify`` is routed here through the control service's notify hook.

The engine runs this service under its supervisor (``twin.runtime.supervisor.supervise``): a
crash is logged, counted, alarmed and restarted with backoff; each run and each delivery also
catches its own failure, so one bad report never stops the schedule of another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from twin.control.cron import next_fire
from twin.control.webhooks import WebhookPolicy
from twin.registry.reports import ReportRun
from twin.reports.channels import ChannelContext, Message, RetryPolicy, deliver
from twin.reports.notify import Notifier
from twin.reports.render import period_of
from twin.reports.runner import ReportRunner, new_run_id
from twin.spec.secrets import Secrets

if TYPE_CHECKING:
    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)


def _schedule(doc: Mapping[str, Any], default_tz: str) -> tuple[str, str] | None:
    sched = (doc.get("spec") or {}).get("schedule")
    if not isinstance(sched, Mapping) or sched.get("enabled") is False or not sched.get("cron"):
        return None
    return str(sched["cron"]), str(sched.get("timezone") or default_tz)


class ReportService:
    name = "reports"

    def __init__(self, *, webhooks: WebhookPolicy | None = None, tick: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        self.webhooks = webhooks
        self.tick = tick
        self.clock = clock
        self.engine: Engine | None = None
        self.runner: ReportRunner | None = None
        self.notifier: Notifier | None = None
        self.next_fire: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    # -- what the API uses --------------------------------------------------------------------
    def reports(self) -> dict[str, Mapping[str, Any]]:
        specs = self.engine.specs if self.engine is not None else {}
        return {n: d for (k, n), d in specs.items() if k == "Report"}

    async def start_run(self, name: str, *, period: Any = None, trigger: str,
                        formats: Sequence[str] | None = None,
                        scheduled_for: float | None = None) -> ReportRun:
        """Resolve the period (ReportError when bad), record the run, start it."""
        assert self.engine is not None and self.runner is not None and self._nursery is not None
        specs = self.engine.specs
        doc = specs[("Report", name)]
        now = scheduled_for if scheduled_for is not None else self.clock()
        per = period_of(doc, specs, period, now)
        run_id = new_run_id()
        run = ReportRun(id=run_id, report=name, site=(doc.get("metadata") or {}).get("site"),
                        trigger=trigger, status="running", started_at=time.time(),
                        scheduled_for=scheduled_for, period=per.as_json())
        await trio.to_thread.run_sync(self.engine.registry.save_report_run, run)
        runner = self.runner
        runner.store = getattr(self.engine.service_info.get("timeseries"), "store", None)

        async def go() -> None:
            await runner.run(doc, specs, per, trigger=trigger, scheduled_for=scheduled_for,
                             formats=formats, run_id=run_id)

        self._nursery.start_soon(go)
        return run

    # -- the scene action `notify` ---------------------------------------------------------
    async def notify(self, channels: Sequence[Mapping[str, Any]], subject: str, text: str,
                     payload: Mapping[str, Any]) -> list[dict[str, Any]]:
        assert self.runner is not None and self.runner.context is not None
        msg = Message(subject, text, {"event": "scene.notify", **payload},
                      name=f"notify-{int(time.time() * 1000)}")
        return [await deliver(c, msg, self.runner.context, RetryPolicy(3, 1.0))
                for c in channels]

    # -- schedules -----------------------------------------------------------------------------
    def _tz(self, doc: Mapping[str, Any]) -> str:
        from twin.reports.render import report_timezone

        assert self.engine is not None
        return report_timezone(doc, self.engine.specs)

    async def _catch_up(self) -> None:
        """A fire time missed while the engine was down runs once."""
        assert self.engine is not None
        now = self.clock()
        for name, doc in sorted(self.reports().items()):
            sched = _schedule(doc, self._tz(doc))
            if sched is None:
                continue
            last = await trio.to_thread.run_sync(self.engine.registry.last_scheduled_run, name)
            if last is None:
                continue
            missed: float | None = None
            t = last
            while True:
                t = next_fire(sched[0], t, sched[1])
                if t > now:
                    break
                missed = t
            if missed is not None:
                log.info("report %s: the run due at %s was missed; running it now", name, missed)
                await self.start_run(name, trigger="missed-schedule", scheduled_for=missed)

    async def _schedules(self) -> None:
        while True:
            now = self.clock()
            for name, doc in self.reports().items():
                sched = _schedule(doc, self._tz(doc))
                if sched is None:
                    self.next_fire.pop(name, None)
                    continue
                due = self.next_fire.get(name)
                if due is None:
                    self.next_fire[name] = next_fire(sched[0], now, sched[1])
                elif due <= now:
                    self.next_fire[name] = next_fire(sched[0], now, sched[1])
                    try:
                        await self.start_run(name, trigger="schedule", scheduled_for=due)
                    except Exception:
                        log.exception("report %s: the scheduled run could not start", name)
            for name in set(self.next_fire) - set(self.reports()):
                self.next_fire.pop(name, None)
            await trio.sleep(self.tick)

    # -- notifications ------------------------------------------------------------------------
    async def _alarms(self) -> None:
        from twin.runtime.bus import Filter

        assert self.engine is not None and self.notifier is not None
        while True:
            sub = self.engine.bus.open(Filter.of(kinds=["alarm"]), buffer=1000,
                                       name="notifications")
            try:
                async for event in sub.receive:
                    try:
                        self.notifier.feed(event)
                    except Exception:
                        log.exception("notifications: alarm event of %s failed",
                                      event.get("device"))
            finally:
                self.engine.bus.close(sub)
            log.warning("notifications: fell behind the bus; resubscribing")

    async def _ticks(self) -> None:
        assert self.notifier is not None
        while True:
            await trio.sleep(self.tick)
            self.notifier.reload()
            self.notifier.tick()

    async def __call__(self, engine: Engine, *,
                       task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.engine = engine
        state_dir = engine.config.state_dir
        ts = engine.service_info.get("timeseries")
        store = getattr(ts, "store", None)

        async def publish(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            mqtt = getattr(engine, "mqtt", None)
            if mqtt is None:
                from twin.reports.errors import DeliveryError

                raise DeliveryError("no MQTT broker in this engine", permanent=True)
            await mqtt.publish(topic, payload, qos, retain)

        ctx = ChannelContext(state_dir, Secrets(state_dir=state_dir),
                             self.webhooks or WebhookPolicy.from_env(),
                             mqtt=publish)
        self.runner = ReportRunner(engine.registry, state_dir, store, ctx)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery

            def spawn(fn: Callable[[], Awaitable[None]]) -> None:
                nursery.start_soon(fn)

            self.notifier = Notifier(ctx, lambda: engine.specs, spawn)
            self.notifier.reload()
            control = engine.service_info.get("control")
            if control is not None:  # the scene action `notify` (a hook, not an import)
                control.notify_hook = self.notify
            engine.service_info[self.name] = self
            await self._catch_up()
            nursery.start_soon(self._schedules)
            nursery.start_soon(self._alarms)
            nursery.start_soon(self._ticks)
            task_status.started(self)


def reports_of(engine: Any) -> ReportService | None:
    svc = engine.service_info.get("reports")
    return svc if isinstance(svc, ReportService) else None


__all__ = ["ReportService", "reports_of"]
