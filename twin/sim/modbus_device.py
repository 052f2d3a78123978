"""Simulated Modbus devices: a Modbus TCP server (twin/bindings/modbus_server.py) per
host:port, serving one unit per device, whose registers follow the ``sim`` binding's waves.

The register layout is the device's own point map (its ``spec.binding.modbus`` over its
model's ``spec.modbus``), so the engine's modbus binding reads the simulator exactly as it
would read the PLC. Read-only points follow their wave; writable points start at their
wave's value and then keep what a client (the engine, reconciling desired state) wrote.
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from twin.bindings.modbus_codec import EncodeError
from twin.bindings.modbus_server import RegisterServer
from twin.sim.generators import PointGenerator, make_generator
from twin.spec.modbus import Point, merged_options, parse_point
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)


@dataclass
class SimUnit:
    device: str
    unit: int
    points: dict[str, Point]
    waves: dict[str, PointGenerator]
    interval: float = 1.0


def sim_unit(device: str, binding: Mapping[str, Any], model: Mapping[str, Any] | None,
             sim: Mapping[str, Any]) -> SimUnit:
    """A unit from a Device's modbus binding, its model spec and the simulator's options
    (``interval``, ``seed``, ``points: {name: wave options}``)."""
    mmap = (model or {}).get("modbus")
    opts = merged_options(mmap if isinstance(mmap, Mapping) else None, binding)
    points = {n: parse_point(n, s, opts) for n, s in (opts.get("points") or {}).items()}
    rng = random.Random(sim.get("seed", zlib.crc32(device.encode())))
    waves = {}
    for name, wave in (sim.get("points") or {}).items():
        if name in points:
            waves[name] = make_generator(dict(wave or {}), rng)
    return SimUnit(device, int(binding.get("unit", 1)), points, waves,
                   parse_duration(sim.get("interval", "1s")) or 1.0)


@dataclass
class ModbusSim:
    """One simulated gateway (host:port) with its units."""

    host: str
    port: int
    units: list[SimUnit]
    server: RegisterServer | None = None
    updates: int = 0
    _started: float = field(default_factory=time.time)

    def _tick(self, t: float, first: bool) -> None:
        assert self.server is not None
        for u in self.units:
            for name, wave in u.waves.items():
                p = u.points[name]
                if p.writable and not first:
                    continue  # keeps what the client wrote
                value = wave.value(t)
                if p.type in ("int16", "uint16", "int32", "uint32", "int64", "uint64") and p.scale == 1:
                    value = round(value)
                try:
                    self.server.put(u.unit, p, value)
                except (EncodeError, ValueError, TypeError) as exc:
                    log.warning("modbus sim %s: %s: %s", u.device, name, exc)
        self.updates += 1

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        size = max([16, *(p.end + 1 for u in self.units for p in u.points.values())])
        self.server = RegisterServer(self.host, self.port, [u.unit for u in self.units], size=size,
                                     name=f"modbus sim {self.host}:{self.port}")
        try:
            self._tick(time.time() - self._started, True)
            port = await self.server.start()
            task_status.started(port)
            interval = min(u.interval for u in self.units)
            while True:
                await trio.sleep(interval)
                self._tick(time.time() - self._started, False)
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self.server.stop()
