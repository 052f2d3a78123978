"""The ``sim`` binding: a simulated device that drives the demo without hardware.

```yaml
binding:
  sim:
    interval: 2s                 # one reading per point per interval (default 5s)
    seed: 42                     # optional: reproducible values
    points:
      temperature: {wave: sine, min: 18, max: 32, period: 10m, decimals: 1}
      humidity:    {wave: random_walk, min: 30, max: 70, step: 0.5}
      running:     {wave: step, values: [true, false], period: 1h}
      current:                   # reacts to the device's state (twin/sim/effects.py)
        {wave: random_walk, min: 0.1, max: 0.3, response: 5s,
         effects: [{when: power, is: true, add: speed, times: 0.04}]}
    faults:                      # optional
      offline_every: 10m         # go silent for `offline_for` once per `offline_every`
      offline_for: 30s
      fault_every: 1h            # report a fault for `fault_for` once per `fault_every`
      fault_for: 1m
      connect_failures: 2        # the first N connects fail (exercises backoff)
```
The simulated device acts like a real one:

* Writes (``desired`` reconciliation) set a property, reported from then on, so reported
  converges to desired.
* A command does what its DeviceModel says it sets (``commands.set_state.sets: {power:
  {param: state}}``, twin/spec/commands.py): ``set_state {state: true}`` turns ``power`` on.
  Commands are acknowledged with ``{"ok": true}``; one named ``fail`` raises
  :class:`~twin.errors.CommandError`.
* Points react to the device's state and to other devices' reported values through their
  ``effects`` and ``response`` (twin/sim/effects.py): the fan's current rises when it is on, the
  room it cools gets colder, a PLC's rpm follows its setpoint.

A write or a command is reported at once (not at the next interval).
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Mapping
from typing import Any

import trio

from twin.bindings.base import (
    BindingContext,
    DeviceEvent,
    EventType,
    Message,
    Quality,
    Reading,
)
from twin.bindings.registry import BindingFactory, register_binding
from twin.errors import BindingConnectError, CommandError
from twin.sim.effects import Effect, Response, make_effects, make_response
from twin.sim.generators import PointGenerator, make_generator
from twin.spec.bindings import binding_schema
from twin.spec.commands import command_sets
from twin.spec.units import parse_duration

SIM_SCHEMA: dict[str, Any] = binding_schema("sim")
"""JSON Schema of ``spec.binding.sim``: specs/binding-sim.schema.json, the one source."""


def _in_window(t: float, every: float, length: float) -> bool:
    """True during the last ``length`` seconds of each ``every`` period."""
    if every <= 0 or length <= 0:
        return False
    return (t % every) >= every - length


class SimBinding:
    protocol = "sim"

    def __init__(
        self, device: str, options: Mapping[str, Any], context: BindingContext | None = None
    ) -> None:
        self.device = device
        self.interval = parse_duration(options.get("interval", "5s")) or 1.0
        seed = options.get("seed")
        self._rng = random.Random(seed if seed is not None else zlib.crc32(device.encode()))
        points = options.get("points") or {}
        self.points: dict[str, PointGenerator] = {
            name: make_generator(opts or {}, self._rng) for name, opts in points.items()
        }
        self.effects: dict[str, list[Effect]] = {
            name: make_effects((opts or {}).get("effects")) for name, opts in points.items()
        }
        self.responses: dict[str, Response | None] = {
            name: make_response((opts or {}).get("response")) for name, opts in points.items()
        }
        self.last: dict[str, Any] = {}  # each generated point's last value
        self.model: Mapping[str, Any] = (context.models.get(device) if context else None) or {}
        self._reported = context.reported if context else None
        self._wake = trio.Event()
        faults = options.get("faults") or {}
        self.offline_every = parse_duration(faults.get("offline_every", 0))
        self.offline_for = parse_duration(faults.get("offline_for", 0))
        self.fault_every = parse_duration(faults.get("fault_every", 0))
        self.fault_for = parse_duration(faults.get("fault_for", 0))
        self._connect_failures = int(faults.get("connect_failures", 0))
        self._clock = (context.clock if context else None) or time.time
        self._t0: float | None = None
        self.overrides: dict[str, Any] = {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.connected = False
        self.paused = False  # benchmarks/tests: stop sending (the device goes silent)

    def _t(self) -> float:
        assert self._t0 is not None
        return trio.current_time() - self._t0

    async def connect(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._connect_failures > 0:
            self._connect_failures -= 1
            raise BindingConnectError(f"sim device {self.device!r}: simulated connect failure")
        if self._t0 is None:
            self._t0 = trio.current_time()
        self.connected = True

    def _lookup(self, ref: str) -> Any:
        """An effect's reference: ``prop`` of this device or ``device.point`` of another."""
        device, _, point = ref.rpartition(".")
        if not device or device == self.device:
            if point in self.overrides:
                return self.overrides[point]
            if point in self.last:
                return self.last[point]
            device = self.device
        return self._reported(device, point) if self._reported is not None else None

    def _value(self, point: str) -> Any:
        if point in self.overrides:
            return self.overrides[point]
        gen = self.points[point]
        t = self._t()
        value = gen.value(t)
        center = (gen.min + gen.max) / 2
        for effect in self.effects.get(point) or ():
            value = effect.apply(value, center, self._lookup)
        response = self.responses.get(point)
        if response is not None:
            value = response.step(value, t)
        if gen.decimals is not None and isinstance(value, float):
            value = round(value, gen.decimals)
        self.last[point] = value
        return value

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        await trio.lowlevel.checkpoint()
        ts = self._clock()
        names = (
            points
            if points is not None
            else list(self.points) + [p for p in self.overrides if p not in self.points]
        )
        return [Reading(self.device, p, self._value(p), ts, Quality.GOOD) for p in names]

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        faulted = False
        while True:
            t = self._t()
            if not self.paused and not _in_window(t, self.offline_every, self.offline_for):
                in_fault = _in_window(t, self.fault_every, self.fault_for)
                if in_fault and not faulted:
                    await send.send(
                        DeviceEvent(
                            self.device,
                            EventType.FAULT,
                            self._clock(),
                            {"message": "simulated fault"},
                        )
                    )
                elif faulted and not in_fault:
                    await send.send(DeviceEvent(self.device, EventType.OK, self._clock()))
                faulted = in_fault
                readings = await self.read()
                if readings:
                    for r in readings:
                        await send.send(r)
                else:
                    await send.send(DeviceEvent(self.device, EventType.HEARTBEAT, self._clock()))
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()

    async def write(self, point: str, value: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.overrides[point] = value
        self._wake.set()

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any:
        await trio.lowlevel.checkpoint()
        if name == "fail":
            raise CommandError(f"sim device {self.device!r}: command {name!r} failed")
        self.commands.append((name, dict(params)))
        sets = command_sets(self.model, name, params)
        if sets:
            self.overrides.update(sets)
            self._wake.set()
        return {"ok": True}

    async def close(self) -> None:
        self.connected = False
        await trio.lowlevel.checkpoint()


# option -> factory of a simulated device that is more than data points, registered by the
# module that builds it, which imports this one (so this one does not import it back):
# ``video`` -> a simulated camera (twin/bindings/video.py)
SIM_VARIANTS: dict[str, BindingFactory] = {}


def register_sim_variant(option: str, factory: BindingFactory) -> None:
    SIM_VARIANTS[option] = factory


def _factory(
    device: str, options: Mapping[str, Any], doc: Mapping[str, Any], context: BindingContext
) -> Any:
    for option, variant in SIM_VARIANTS.items():
        if options.get(option) is not None:
            return variant(device, options, doc, context)
    return SimBinding(device, options, context)


register_binding("sim", _factory)
