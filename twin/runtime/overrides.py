"""The engine's runtime desired-state overrides (the rule itself: twin/registry/overrides.py).

A scene's ``set_desired``, a command that sets a property, and an operator's PATCH of the
twin's desired state all end here: :meth:`Overrides.set` records ``(device, property) →
value, who, when`` in memory at once (the device's twin desires it from now on and the
reconciler converges the device) and in the registry's ``desired_overrides`` table (so it
survives a restart). None of them is a revision: the spec set, ``twin plan`` and ``twin
history`` only ever show what the YAML files say.

A device's effective desired state is its ``spec.desired`` with the current overrides on top
(:meth:`effective`); the device task applies it on every config change and every override
change. An apply that changes an overridden spec value drops the override (the registry does
that in the apply transaction; :meth:`prune` mirrors it in memory on reload).

Writes are persisted in order per key: each change updates memory first, then a persist step
writes the key's *current* in-memory state under one lock, so the last write to the registry is
always the latest state, whichever path (awaited or fire-and-forget) made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from twin.errors import NotFoundError
from twin.registry.base import Key, Registry, canonical_json
from twin.registry.overrides import DesiredOverride, is_current, spec_json
from twin.runtime.regio import RegistryIO

log = logging.getLogger(__name__)


class Overrides:
    def __init__(
        self,
        registry: Registry,
        rio: RegistryIO,
        specs: Callable[[], Mapping[Key, Mapping[str, Any]]],
        on_change: Callable[[str], None],
        clock: Callable[[], float],
    ) -> None:
        self.registry = registry
        self.rio = rio
        self._specs = specs
        self._on_change = on_change  # the device whose overrides changed (refresh its twin)
        self._clock = clock
        self.by_device: dict[str, dict[str, DesiredOverride]] = {}
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    # -- reading ------------------------------------------------------------------------------
    def of(self, device: str) -> dict[str, DesiredOverride]:
        return dict(self.by_device.get(device) or {})

    def effective(self, device: str, doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, DesiredOverride]]:
        """``(desired, overrides in force)`` of a device: its spec.desired, overrides on top.
        An override whose spec value has changed since it was written is not in force."""
        desired = dict((doc.get("spec") or {}).get("desired") or {})
        live = {p: o for p, o in (self.by_device.get(device) or {}).items()
                if spec_json(doc, p) == o.spec_json}
        desired.update({p: o.value for p, o in live.items()})
        return desired, live

    # -- start-up and reload ------------------------------------------------------------------
    def restore(self, rows: Iterable[DesiredOverride]) -> None:
        self.by_device = {}
        for o in rows:
            self.by_device.setdefault(o.device, {})[o.prop] = o

    def prune(self, specs: Mapping[Key, Mapping[str, Any]]) -> list[DesiredOverride]:
        """Drop (memory and registry) the overrides ``specs`` supersede; returns them."""
        gone = [o for ovs in self.by_device.values() for o in ovs.values()
                if not is_current(o, specs)]
        for o in gone:
            log.info("device %s: spec value of %s changed; runtime override %r (by %s) dropped",
                     o.device, o.prop, o.value, o.set_by)
            self._put(o.device, o.prop, None, notify=False)
            self._persist_soon(o.device, o.prop)
        return gone

    # -- writing ------------------------------------------------------------------------------
    def _make(self, device: str, prop: str, value: Any, set_by: str) -> DesiredOverride | None:
        doc = self._specs().get(("Device", device))
        if doc is None:
            raise NotFoundError(f"no device {device!r}")
        sj = spec_json(doc, prop)
        if sj is not None and sj == canonical_json(value):
            return None  # back to the spec value: no override
        return DesiredOverride(device, prop, value, set_by, self._clock(), sj)

    def _put(self, device: str, prop: str, o: DesiredOverride | None, *, notify: bool = True) -> None:
        ovs = self.by_device.setdefault(device, {})
        if o is None:
            ovs.pop(prop, None)
            if not ovs:
                del self.by_device[device]
        else:
            ovs[prop] = o
        if notify:
            self._on_change(device)

    async def _persist(self, device: str, prop: str) -> None:
        async with self._lock:
            o = (self.by_device.get(device) or {}).get(prop)
            if o is None:
                await self.rio.call(self.registry.clear_override, device, prop)
            else:
                await self.rio.call(self.registry.set_override, o)

    async def _persist_logged(self, device: str, prop: str) -> None:
        try:
            await self._persist(device, prop)
        except Exception:
            log.exception("device %s: runtime override of %s not recorded", device, prop)

    def _persist_soon(self, device: str, prop: str) -> None:
        if self._nursery is None:
            log.error("device %s: overrides service not running; %s not recorded", device, prop)
            return
        self._nursery.start_soon(self._persist_logged, device, prop)

    async def set(self, device: str, prop: str, value: Any, set_by: str) -> DesiredOverride | None:
        """Override ``prop`` of ``device`` (in effect at once, durable when this returns).
        A value equal to the spec value clears the override instead (returns None)."""
        o = self._make(device, prop, value, set_by)
        self._put(device, prop, o)
        await self._persist(device, prop)
        return o

    def set_soon(self, device: str, prop: str, value: Any, set_by: str) -> DesiredOverride | None:
        """:meth:`set` from synchronous code (a ledger listener): in effect at once, recorded
        in the background."""
        o = self._make(device, prop, value, set_by)
        self._put(device, prop, o)
        self._persist_soon(device, prop)
        return o

    async def clear(self, device: str, prop: str) -> bool:
        """Drop the override (the spec value applies again). False if there was none."""
        had = prop in (self.by_device.get(device) or {})
        self._put(device, prop, None)
        await self._persist(device, prop)
        return had

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hosts the background persist tasks of :meth:`set_soon` and :meth:`prune`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()
