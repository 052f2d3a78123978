"""Simulated Modbus devices of a site, run next to the engine (``twin up SITE``).

``SITE/simulators/*.yaml`` may declare, next to ``mqtt:``, a ``modbus:`` map of device name ->
simulator options (the ``sim`` binding's waves per point)::

    modbus:
      boiler_plc_01:
        interval: 1s
        points:
          temperature: {wave: sine, min: 60, max: 85, period: 5m, decimals: 1}

Each must be a Device of the site with a ``modbus`` TCP binding; the simulator serves its
unit on the binding's host:port (devices sharing a host:port share one simulated gateway;
when that port is taken, on a free port that the devices' bindings are told, with one log line),
with the register layout of the device's point map (twin/sim/modbus_device.py). The engine's
modbus binding then polls it like a PLC: the demo shows a Modbus device live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from twin.runtime.simulators import load_section, port_for
from twin.runtime.supervisor import supervise

log = logging.getLogger(__name__)


@dataclass(repr=False, eq=False)
class ModbusSimulatorService:
    site: Path
    name: str = "modbus-simulators"
    sims: dict[str, Any] = field(default_factory=dict)

    async def __call__(
        self, engine: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from twin.sim.modbus_device import ModbusSim, sim_unit

        declared = await trio.to_thread.run_sync(load_section, self.site, "modbus")
        gateways: dict[tuple[str, int], list[Any]] = {}
        for device, opts in sorted(declared.items()):
            doc = engine.device_doc(device) or {}
            spec = doc.get("spec") or {}
            binding = (spec.get("binding") or {}).get("modbus")
            if not isinstance(binding, dict) or "host" not in binding:
                log.warning("modbus simulators: %s is not a Device with a modbus TCP binding; skipped", device)
                continue
            model = (engine.specs.get(("DeviceModel", str(spec.get("model", "")))) or {}).get("spec")
            try:
                unit = sim_unit(device, binding, model, opts)
            except ValueError as exc:
                log.warning("modbus simulators: %s: %s; skipped", device, exc)
                continue
            key = (str(binding["host"]), int(binding.get("port", 502)))
            gateways.setdefault(key, []).append(unit)
        async with trio.open_nursery() as nursery:
            for (host, asked), units in sorted(gateways.items()):
                # a taken port (another program, another demo engine) is not assumed free:
                # the gateway serves on a free one and its devices' bindings are told
                port = await trio.to_thread.run_sync(port_for, host, asked)
                if port != asked:
                    for u in units:
                        engine.runtime.binding_context.endpoints[u.device] = {"port": port}
                    log.warning("modbus simulator %s:%d (%s): the port is taken; serving on "
                                "port %d instead (its devices poll that)", host, asked,
                                ", ".join(u.device for u in units), port)
                sim = ModbusSim(host, port, units)
                label = f"modbus-sim-{host}:{port}"
                for u in units:
                    self.sims[u.device] = sim
                # listening before the engine starts the devices that poll it; a simulator that
                # cannot listen (the port is taken) is one log line, never the engine's end: its
                # devices show offline like any unreachable PLC
                try:
                    await nursery.start(partial(supervise, sim.run, kind="simulator", name=label,
                                                supervision=engine.supervision,
                                                restart_on_return=True, with_status=True))
                except Exception as exc:  # OSError: address in use, or the server's own error
                    leaf: BaseException = exc
                    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                        leaf = leaf.exceptions[0]
                    log.error(
                        "modbus simulator %s:%d (%s) not started: %s; its devices stay offline "
                        "(hint: free the port or change the binding's port in the site)",
                        host, port, ", ".join(u.device for u in units), leaf,
                    )
                    for u in units:
                        self.sims.pop(u.device, None)
            task_status.started({"devices": sorted(self.sims)})
