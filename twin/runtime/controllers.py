"""Controllers: start, restart, update or stop per-device tasks as the desired state changes.

What changed is decided by the pure functions of twin/runtime/device_config.py
(``device_configs``, ``diff_devices``); the tasks are twin/runtime/device.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import trio

from twin.runtime.device import DeviceRuntime, DeviceTask
from twin.runtime.device_config import Changes, DeviceConfig, device_configs, diff_devices

log = logging.getLogger(__name__)


class DeviceController:
    """Owns one task per device under its own nursery."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime
        self.tasks: dict[str, DeviceTask] = {}
        self._nursery: trio.Nursery | None = None
        self.reconciles = 0

    @property
    def configs(self) -> dict[str, DeviceConfig]:
        return {n: t.config for n, t in self.tasks.items()}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.runtime.watchdog.run)
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def reconcile(
        self,
        specs: Mapping[tuple[str, str], Mapping[str, Any]],
        *,
        handover: frozenset[str] = frozenset(),
    ) -> Changes:
        """Run one task per Device of ``specs``. ``handover``: devices stopped because another
        engine of the cluster runs them now (their alarms stay: the new owner carries them)."""
        assert self._nursery is not None, "controller not running"
        desired = device_configs(specs, default=self.runtime.default_heartbeat)
        changes = diff_devices(self.configs, desired)
        # a device its supervisor quarantined gets a fresh start with every new revision
        stuck = tuple(n for n in changes.update if self.tasks[n].quarantined) + tuple(
            n
            for n, t in self.tasks.items()
            if t.quarantined
            and n in desired
            and n not in changes.restart
            and n not in changes.update
        )
        if stuck:
            changes = replace(
                changes,
                restart=tuple(sorted((*changes.restart, *stuck))),
                update=tuple(n for n in changes.update if n not in stuck),
            )
        self.reconciles += 1
        # cancel every stopping task first, then wait for them (one round, not one per task)
        stopping = [self.tasks.pop(name) for name in (*changes.stop, *changes.restart)]
        await _stop_tasks(stopping)
        for name in changes.stop:
            self.runtime.device_removed(name, clear_alarms=name not in handover)
        for name in changes.update:
            self.tasks[name].update(desired[name])
        # Start every new task at once: ``prepare()`` does what a task would do before
        # ``task_status.started()``, so no per-task ``nursery.start`` round trip (which made
        # 10k devices take minutes once the started ones kept the scheduler busy).
        for name in (*changes.restart, *changes.start):
            task = DeviceTask(desired[name], self.runtime)
            task.prepare()
            self._nursery.start_soon(task.run, name=f"device {name}")
            self.tasks[name] = task
        if changes:
            log.info("controller: %s", changes.summary())
        return changes

    async def stop_all(self) -> None:
        tasks, self.tasks = list(self.tasks.values()), {}
        await _stop_tasks(tasks)


async def _stop_tasks(tasks: list[DeviceTask]) -> None:
    for task in tasks:
        task.scope.cancel()
    for task in tasks:
        await task.done.wait()
