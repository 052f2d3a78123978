"""Status monitoring: transitions, persisted history, alarms, per-device metrics.

Statuses (seed §1.2): ``online`` (the device talks), ``offline`` (silent past its heartbeat
timeout), ``fault`` (the device reported one, or its binding failed a health check),
``maintenance`` (set by an operator through the spec; suppresses alarms).

Every transition is persisted with ``registry.set_device_status`` (history row + current status)
and published on the bus. Alarms: ``offline`` (major) and ``fault`` (critical) are raised on
entering those states and cleared automatically on recovery; never duplicated while active
(tracked here and enforced again by ``registry.raise_alarm``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from twin.registry.base import Alarm, MetricSample, Registry
from twin.runtime.bus import Bus
from twin.runtime.regio import RegistryWriter
from twin.runtime.state import DeviceTwin, Status, TwinStore

log = logging.getLogger(__name__)

ALARM_SEVERITY = {Status.OFFLINE: ("offline", "major"), Status.FAULT: ("fault", "critical")}
SYSTEM = "system"


def alarm_json(alarm: Alarm) -> dict[str, Any]:
    return {
        "id": alarm.id,
        "device": alarm.device,
        "type": alarm.type,
        "severity": alarm.severity,
        "message": alarm.message,
        "state": alarm.state,
        "raised_at": alarm.raised_at,
        "acked_at": alarm.acked_at,
        "acked_by": alarm.acked_by,
        "cleared_at": alarm.cleared_at,
        "cleared_by": alarm.cleared_by,
    }


class Monitor:
    def __init__(
        self,
        twins: TwinStore,
        bus: Bus,
        writer: RegistryWriter,
        *,
        clock: Callable[[], float] = time.time,
        on_transition: Callable[[DeviceTwin, Status, Status], None] | None = None,
    ) -> None:
        self.twins = twins
        self.bus = bus
        self.writer = writer
        self.clock = clock
        self.on_transition = on_transition
        self.active: set[tuple[str, str]] = set()  # (device, alarm type) not cleared yet
        self.transitions = 0

    # -- restore -------------------------------------------------------------------------
    def restore(self, rows: list[dict[str, Any]], alarms: list[Alarm]) -> None:
        """Resume from the registry after a restart: statuses and uncleared alarms."""
        for row in rows:
            twin = self.twins.get(str(row.get("name")))
            status = row.get("status")
            if twin is not None and status in Status.__members__.values():
                twin.status = Status(str(status))
        for alarm in alarms:
            if alarm.state != "cleared":
                self.active.add((alarm.device, alarm.type))

    # -- transitions -----------------------------------------------------------------------
    def _set(self, twin: DeviceTwin, status: Status, reason: str, **meta: Any) -> None:
        old = twin.status
        if old == status:
            return
        now = self.clock()
        mono = trio.current_time()
        m = twin.metrics
        if old == Status.ONLINE and m.online_since is not None:
            m.online_seconds += mono - max(m.online_since, m.window_start)
            m.online_since = None
        if status == Status.ONLINE:
            m.online_since = mono
        twin.status = status
        twin.status_since = now
        self.transitions += 1
        metadata = {"from": str(old), "reason": reason, **meta}
        device = twin.name
        self.writer.put(lambda r: r.set_device_status(device, str(status), now, metadata))
        log.info("device %s (site %s): %s -> %s (%s)", device, twin.site, old, status, reason)
        self.bus.publish(
            {
                "kind": "status",
                "device": device,
                "site": twin.site,
                "groups": twin.groups,
                "ts": now,
                "status": str(status),
                "previous": str(old),
                "reason": reason,
            }
        )
        if self.on_transition is not None:
            self.on_transition(twin, old, status)
        if status == Status.ONLINE:
            self._clear(twin, "offline")
            self._clear(twin, "fault")
        elif status == Status.OFFLINE:
            self._raise(twin, Status.OFFLINE, f"no heartbeat from {device} ({reason})")
        elif status == Status.FAULT:
            self._clear(twin, "offline")
            self._raise(twin, Status.FAULT, twin.fault or reason)

    def _raise(self, twin: DeviceTwin, status: Status, message: str) -> None:
        if twin.maintenance:
            return
        type_, severity = ALARM_SEVERITY[status]
        self.raise_alarm(twin.name, type_, severity, message)

    def _clear(self, twin: DeviceTwin, type_: str) -> None:
        self.clear_alarm(twin.name, type_)

    def raise_alarm(self, device: str, type_: str, severity: str, message: str) -> None:
        """Raise an alarm that is no status transition (supervision failures, on a device or
        the pseudo device ``_engine``); never duplicated while active."""
        key = (device, type_)
        if key in self.active:
            return
        self.active.add(key)
        now = self.clock()
        twin = self.twins.get(device)
        site, groups = (twin.site, twin.groups) if twin is not None else ("", ())

        def op(r: Registry) -> tuple[Alarm, bool]:
            return r.raise_alarm(device, type_, severity, message, now)

        def done(result: tuple[Alarm, bool]) -> None:
            alarm, created = result
            if created:
                self.bus.publish(
                    {
                        "kind": "alarm",
                        "device": device,
                        "site": site,
                        "groups": groups,
                        "ts": now,
                        "event": "raised",
                        "alarm": alarm_json(alarm),
                    }
                )

        self.writer.put(op, done)

    def clear_alarm(self, device: str, type_: str) -> None:
        """Clear an alarm raised with :meth:`raise_alarm` (no-op when it is not active)."""
        key = (device, type_)
        if key not in self.active:
            return
        self.active.discard(key)
        now = self.clock()
        twin = self.twins.get(device)
        site, groups = (twin.site, twin.groups) if twin is not None else ("", ())

        def op(r: Registry) -> list[Alarm]:
            return r.clear_alarms(device, type_, SYSTEM, now)

        def done(cleared: list[Alarm]) -> None:
            for alarm in cleared:
                self.bus.publish(
                    {
                        "kind": "alarm",
                        "device": device,
                        "site": site,
                        "groups": groups,
                        "ts": now,
                        "event": "cleared",
                        "alarm": alarm_json(alarm),
                    }
                )

        self.writer.put(op, done)

    def forget_alarm(self, device: str, type_: str) -> None:
        """An operator cleared an alarm through the API: a new incident raises a new one."""
        self.active.discard((device, type_))

    # -- inputs from device tasks -----------------------------------------------------------
    def seen(self, twin: DeviceTwin) -> None:
        """The device sent something (hot path: cheap when nothing changes)."""
        if twin.status is Status.ONLINE:
            return
        if twin.maintenance:
            self._set(twin, Status.MAINTENANCE, "maintenance")
        elif twin.fault is not None:
            if twin.fault_source in ("binding", "supervisor"):
                twin.fault = twin.fault_source = None
                self._set(twin, Status.ONLINE, "recovered")
            else:
                self._set(twin, Status.FAULT, "device fault")
        else:
            self._set(twin, Status.ONLINE, "data received")

    def timeout(self, twin: DeviceTwin, timeout: float) -> None:
        if twin.maintenance:
            return
        self._set(twin, Status.OFFLINE, f"heartbeat timeout {timeout:g}s", timeout=timeout)

    def fault(self, twin: DeviceTwin, message: str, source: str = "device") -> None:
        twin.fault = message
        twin.fault_source = source
        if twin.maintenance:
            return
        self._set(twin, Status.FAULT, message, source=source)

    def fault_cleared(self, twin: DeviceTwin) -> None:
        twin.fault = twin.fault_source = None
        if twin.status == Status.FAULT:
            self._set(twin, Status.ONLINE, "fault cleared")

    def set_maintenance(self, twin: DeviceTwin, on: bool, *, alive: bool) -> None:
        if twin.maintenance == on:
            return
        twin.maintenance = on
        if on:
            self._set(twin, Status.MAINTENANCE, "maintenance on")
        elif twin.fault is not None and alive:
            self._set(twin, Status.FAULT, "maintenance off")
        elif alive:
            self._set(twin, Status.ONLINE, "maintenance off")
        else:
            self._set(twin, Status.OFFLINE, "maintenance off")

    def removed(self, twin: DeviceTwin) -> None:
        for type_ in ("offline", "fault"):
            self._clear(twin, type_)

    # -- metrics ------------------------------------------------------------------------------
    def metric_samples(self, twins: list[DeviceTwin]) -> list[MetricSample]:
        """Per-window samples for every device; starts a new window."""
        now = self.clock()
        mono = trio.current_time()
        out: list[MetricSample] = []
        for twin in twins:
            m = twin.metrics
            window = mono - m.window_start
            online = m.online_seconds
            if m.online_since is not None:
                online += mono - max(m.online_since, m.window_start)
            totals = (m.messages_in, m.messages_out, m.bytes_in, m.errors)
            diff = [a - b for a, b in zip(totals, m.base, strict=True)]
            values = {
                "messages_in": diff[0],
                "messages_out": diff[1],
                "bytes_in": diff[2],
                "errors": diff[3],
                "uptime_ratio": min(1.0, online / window) if window > 0 else 0.0,
            }
            if m.last_latency is not None:
                values["latency_ms"] = m.last_latency * 1000
            out.extend(MetricSample(twin.name, k, float(v), now) for k, v in values.items())
            m.base = totals
            m.window_start = mono
            m.online_seconds = 0.0
            if m.online_since is not None:
                m.online_since = mono
        return out
