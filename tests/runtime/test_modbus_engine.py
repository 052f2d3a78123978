"""A Modbus device in a real engine: the site's simulated PLC (ModbusSimulatorService, a
pymodbus server on the engine's asyncio thread) is polled by the modbus binding; readings
reach the twin with their quality, desired state and commands go through the ledger and are
read back, /metrics counts the protocol requests."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from runtime.helpers import apply, eventually, fast_config, model, running_engine, site
from twin.bindings import aio
from twin.control.ledger import CommandStatus
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.runtime.modbus_simulators import ModbusSimulatorService
from twin.runtime.state import Status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docs(port: int) -> list[dict[str, Any]]:
    boiler = model(
        "boiler",
        telemetry={"water_temp": {"type": "number"}, "burner_on": {"type": "boolean"}},
        properties={"setpoint": {"type": "number", "access": "readwrite", "min": 30, "max": 90}},
        commands={"set_setpoint": {"params": {"type": "object"},
                                   "sets": {"setpoint": {"param": "value"}}}},
        modbus={"order": "CDAB", "points": {
            "water_temp": {"register": 30001, "type": "float32"},
            "burner_on": {"register": "30003.2"},
            "setpoint": {"register": 40001, "type": "int16", "scale": 0.1, "access": "readwrite"},
        }},
    )
    device = {
        "apiVersion": "flux.iot/v1", "kind": "Device",
        "metadata": {"name": "boiler_01", "site": "plant-a"},
        "spec": {"type": "industrial", "model": "boiler",
                 "binding": {"modbus": {"host": "127.0.0.1", "port": port, "unit": 4,
                                        "poll": "100ms", "timeout": "500ms"}},
                 "desired": {"setpoint": 72.5}},
    }
    ghost = {  # a unit nobody answers for, behind the same gateway
        "apiVersion": "flux.iot/v1", "kind": "Device",
        "metadata": {"name": "ghost_01", "site": "plant-a"},
        "spec": {"type": "industrial", "model": "boiler",
                 "binding": {"modbus": {"host": "127.0.0.1", "port": port, "unit": 9,
                                        "poll": "100ms", "timeout": "200ms", "retries": 0}},
                 "heartbeat": {"interval": "1s", "timeout": "2s"}},
    }
    return [site(), boiler, device, ghost]


SIM = """\
modbus:
  boiler_01:
    interval: 100ms
    points:
      water_temp: {wave: constant, value: 64.25}
      burner_on: {wave: constant, value: true}
      setpoint: {wave: constant, value: 50}
"""


async def test_simulated_plc_polled_written_and_commanded(tmp_path: Path) -> None:
    port = free_port()
    site_dir = tmp_path / "site"
    (site_dir / "simulators").mkdir(parents=True)
    (site_dir / "simulators" / "modbus.yaml").write_text(SIM, encoding="utf-8")
    reg = open_registry(None, tmp_path / "state")
    apply(reg, *docs(port))
    control = ControlService(reconcile_interval=0.1)
    sims = ModbusSimulatorService(site_dir)
    try:
        async with running_engine(reg, fast_config(state_dir=tmp_path / "state"),
                                  [control, sims]) as engine:
            assert engine.service_info["modbus-simulators"]["devices"] == ["boiler_01"]
            twin = engine.twin("boiler_01")
            assert twin is not None
            await eventually(lambda: "water_temp" in twin.reported and "burner_on" in twin.reported)
            assert twin.reported["water_temp"].value == 64.25
            assert str(twin.reported["water_temp"].quality) == "good"
            assert twin.reported["burner_on"].value is True
            await eventually(lambda: twin.status == Status.ONLINE)
            # desired 72.5 written through the ledger (the PLC started at 50) and read back
            await eventually(lambda: twin.reported.get("setpoint") is not None
                             and abs(twin.reported["setpoint"].value - 72.5) < 1e-6)
            cmd = await control.ledger.submit("boiler_01", "set_setpoint", {"value": 61.3},
                                              source="api:op")
            cmd = await control.ledger.wait(cmd.id)
            assert cmd.status is CommandStatus.SUCCESS, cmd.error
            await eventually(lambda: abs(twin.reported["setpoint"].value - 61.3) < 1e-6)
            sim = sims.sims["boiler_01"]
            assert sim.server is not None and sim.server.image[4][3][0] == 613  # in the PLC
            # the dead unit goes offline; the live one on the same connection keeps reporting
            ghost = engine.twin("ghost_01")
            assert ghost is not None
            await eventually(lambda: ghost.status == Status.OFFLINE)
            assert not ghost.reported
            seen = twin.last_seen
            await eventually(lambda: twin.last_seen is not None and seen is not None
                             and twin.last_seen > seen)
            assert twin.status == Status.ONLINE
            metrics = engine.prom.render().decode()
            assert 'twin_protocol_requests_total{binding="modbus"}' in metrics
    finally:
        reg.close()
    assert not aio.DEFAULT.running  # the engine stopped the asyncio loop with it


async def test_a_simulator_whose_port_is_taken_serves_on_a_free_one(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Another program holds the simulated PLC's declared port: the simulator serves on a free
    port instead (one log line), and the device's binding learns it and polls it."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    site_dir = tmp_path / "site"
    (site_dir / "simulators").mkdir(parents=True)
    (site_dir / "simulators" / "modbus.yaml").write_text(SIM, encoding="utf-8")
    reg = open_registry(None, tmp_path / "state")
    apply(reg, *docs(port))
    sims = ModbusSimulatorService(site_dir)
    try:
        async with running_engine(reg, fast_config(state_dir=tmp_path / "state"),
                                  [ControlService(), sims]) as engine:
            assert engine.service_info["modbus-simulators"]["devices"] == ["boiler_01"]
            moved = engine.runtime.binding_context.endpoints["boiler_01"]["port"]
            assert moved != port
            twin = engine.twin("boiler_01")
            assert twin is not None
            await eventually(lambda: "water_temp" in twin.reported)
            assert twin.reported["water_temp"].value == 64.25
        taken = [r.getMessage() for r in caplog.records if "taken" in r.getMessage()]
        assert len(taken) == 1 and str(port) in taken[0] and str(moved) in taken[0], taken
    finally:
        holder.close()
        reg.close()
