"""Slave (server) mode: a site's twin properties as a Modbus TCP register map for a SCADA.

```yaml
kind: Site
metadata: {name: plant-a}
spec:
  modbus_server:
    listen: 0.0.0.0:1502
    role: operator               # the SCADA's service principal (default viewer: read only)
    units:
      - unit: 1
        device: boiler_plc_01
        points:
          water_temp: {register: 30001, type: float32}
          setpoint_temp: {register: 40001, type: int16, scale: 0.1, access: readwrite}
```
Reads serve the twin: a writable point shows its desired value (the target the engine is
driving the device to), any other point its last reported value; the image is refreshed every
``refresh`` (default 500 ms). A write (FC 5/6/15/16) is judged before it is applied, on the
asyncio thread, with exception replies a SCADA understands: a register no writable point
covers → 2 (illegal data address); the principal — ``policy.Actor(role, sites=(site,))`` —
may not operate devices of this site (:mod:`twin.policy`) → 1 (illegal function); a value
outside the model's type/range → 3 (illegal data value). An accepted write becomes a
desired-state change (``engine.overrides.set``, recorded as ``set_by: modbus:SITE``), which
the reconciler delivers to the device through the command ledger like any other.

The map is read when the engine starts (a changed map needs a restart of the engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from twin import policy
from twin.bindings import aio
from twin.bindings.modbus_codec import EncodeError, decode
from twin.bindings.modbus_server import RegisterServer
from twin.spec.modbus import Point, parse_point
from twin.spec.properties import value_problem
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)


@dataclass
class ServedUnit:
    unit: int
    device: str
    points: dict[str, Point]
    decls: dict[str, dict[str, Any]]  # point -> the model's declaration


@dataclass
class SiteServer:
    site: str
    host: str
    port: int
    actor: policy.Actor
    units: dict[int, ServedUnit]
    refresh: float = 0.5
    server: RegisterServer | None = None
    writes: int = 0
    refused: dict[int, int] = field(default_factory=dict)  # exception code -> count

    def judge(self, unit: int, table: int, address: int, values: list[Any]) -> tuple[int | None, list[tuple[str, Any]]]:
        """``(exception code or None, [(property, value)])`` of a write request."""
        served = self.units.get(unit)
        assert self.server is not None
        if served is None:
            return 2, []
        end = address + len(values)
        touched = [p for p in served.points.values()
                   if p.fc == table and p.address < end and address < p.end]
        if not touched or any(not p.writable for p in touched):
            return 2, []
        if not policy.allows(self.actor, policy.OPERATE,
                             old=policy.Target("Device", frozenset({self.site}))):
            return 1, []
        image = list(self.server.image[unit][table])
        image[address:end] = values
        changes = []
        for p in touched:
            raw = image[p.address : p.end]
            if p.fc == 1:
                value: Any = bool(raw[0])
            else:
                try:
                    value = decode(p, [int(r) for r in raw])
                except ValueError:
                    return 3, []
            decl = served.decls.get(p.name) or {}
            if decl.get("type") == "integer" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, float) and p.scale != 1:
                value = round(value, 10)
            if value_problem(value, decl) is not None:
                return 3, []
            changes.append((p.name, value))
        return None, changes

    def refresh_image(self, engine: Any) -> None:
        assert self.server is not None
        for u in self.units.values():
            twin = engine.twin(u.device)
            if twin is None:
                continue
            for name, p in u.points.items():
                if p.writable and name in twin.desired:
                    value = twin.desired[name]
                else:
                    rv = twin.reported.get(name)
                    value = None if rv is None else rv.value
                if value is None:
                    continue
                try:
                    self.server.put(u.unit, p, value)
                except (EncodeError, ValueError, TypeError) as exc:
                    log.debug("modbus server %s: %s.%s: %s", self.site, u.device, name, exc)

    async def run(self, engine: Any, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        push, receive = aio.channel(1024)

        def on_write(unit: int, table: int, address: int, values: list[Any]) -> int | None:
            code, changes = self.judge(unit, table, address, values)
            if code is not None:
                self.refused[code] = self.refused.get(code, 0) + 1
                log.warning("modbus server %s: write unit %d table %d @%d refused (exception %d)",
                            self.site, unit, table, address, code)
                return code
            push((self.units[unit].device, changes))
            return None

        size = max([16, *(p.end + 1 for u in self.units.values() for p in u.points.values())])
        self.server = RegisterServer(self.host, self.port, list(self.units), size=size,
                                     on_write=on_write, name=f"modbus server {self.site}")
        self.refresh_image(engine)
        try:
            port = await self.server.start()
            task_status.started(port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refresher, engine)
                async for device, changes in receive:
                    for prop, value in changes:
                        await engine.overrides.set(device, prop, value, f"modbus:{self.site}")
                        self.writes += 1
                        log.info("modbus server %s: %s.%s = %r (desired, by the SCADA)",
                                 self.site, device, prop, value)
                    self.refresh_image(engine)
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self.server.stop()

    async def _refresher(self, engine: Any) -> None:
        while True:
            await trio.sleep(self.refresh)
            self.refresh_image(engine)


def site_servers(specs: dict[tuple[str, str], dict[str, Any]]) -> list[SiteServer]:
    """The servers the applied specs declare (schema- and validate-checked already)."""
    out = []
    for (kind, name), doc in sorted(specs.items()):
        cfg = (doc.get("spec") or {}).get("modbus_server") if kind == "Site" else None
        if not isinstance(cfg, dict):
            continue
        host, _, port = str(cfg["listen"]).rpartition(":")
        units = {}
        for u in cfg.get("units") or []:
            device = str(u["device"])
            ddoc = specs.get(("Device", device)) or {}
            model = (specs.get(("DeviceModel", str((ddoc.get("spec") or {}).get("model")))) or {}).get("spec") or {}
            decls = {**(model.get("telemetry") or {}), **(model.get("properties") or {})}
            points = {n: parse_point(n, s, u) for n, s in (u.get("points") or {}).items()}
            units[int(u["unit"])] = ServedUnit(int(u["unit"]), device, points, decls)
        out.append(SiteServer(
            name, host or "127.0.0.1", int(port), policy.Actor(str(cfg.get("role", "viewer")), (name,)),
            units, refresh=parse_duration(cfg.get("refresh", "500ms")) or 0.5,
        ))
    return out


@dataclass(repr=False, eq=False)
class ModbusServerService:
    """Engine service: one Modbus TCP server per Site with ``spec.modbus_server``."""

    name: str = "modbus-server"
    servers: list[SiteServer] = field(default_factory=list)

    async def __call__(self, engine: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.servers = site_servers(engine.specs)
        async with trio.open_nursery() as nursery:
            ports = {}
            for s in self.servers:
                ports[s.site] = await nursery.start(s.run, engine)
            task_status.started({"ports": ports})
            await trio.sleep_forever()
