"""Slave mode: a SCADA (pymodbus' own client) reads twin properties as registers and writes
setpoints, which become desired-state changes delivered to the device; the policy decides
(an operator principal may write in its site, a viewer may not); bad writes get the Modbus
exception a SCADA understands."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import trio

from runtime.helpers import apply, eventually, fast_config, model, running_engine, sim_device, site
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.runtime.modbus_server import ModbusServerService


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


POINTS = {
    "temperature": {"register": 30001, "type": "float32"},
    "sampling_rate": {"register": 40001, "type": "uint16", "access": "readwrite"},
    "label": {"register": 40010, "type": "uint16"},
}


def served_site(name: str, port: int, role: str, device: str) -> dict[str, Any]:
    doc = site(name)
    doc["spec"]["modbus_server"] = {"listen": f"127.0.0.1:{port}", "role": role, "refresh": "100ms",
                                    "units": [{"unit": 1, "device": device, "points": POINTS}]}
    return doc


def scada(port: int, calls: list[tuple[str, int, Any]]) -> list[Any]:
    """A SCADA session with pymodbus' synchronous client (in a worker thread)."""
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert client.connect()
    out = []
    try:
        for fn, address, arg in calls:
            if fn == "ir":
                out.append(client.read_input_registers(address, count=arg, device_id=1))
            elif fn == "hr":
                out.append(client.read_holding_registers(address, count=arg, device_id=1))
            else:
                out.append(client.write_register(address, arg, device_id=1))
    finally:
        client.close()
    return out


async def test_scada_reads_and_writes_setpoints(tmp_path: Path) -> None:
    pa, pb = free_port(), free_port()
    th = model("th", properties={"sampling_rate": {"type": "integer", "access": "readwrite",
                                                   "min": 1, "max": 3600}},
               telemetry={"temperature": {"type": "number"}, "label": {"type": "integer"}})
    a = sim_device("t_a", model_="th", interval="100ms",
                   points={"temperature": {"wave": "constant", "value": 21.5},
                           "label": {"wave": "constant", "value": 7}})
    b = sim_device("t_b", site_="plant-b", model_="th", interval="100ms",
                   points={"temperature": {"wave": "constant", "value": 30.0}})
    a["spec"]["desired"] = {"sampling_rate": 5}
    reg = open_registry(None, tmp_path / "state")
    apply(reg, served_site("plant-a", pa, "operator", "t_a"),
          served_site("plant-b", pb, "viewer", "t_b"), th, a, b)
    service = ModbusServerService()
    try:
        async with running_engine(reg, fast_config(state_dir=tmp_path / "state"),
                                  [ControlService(reconcile_interval=0.1), service]) as engine:
            assert engine.service_info["modbus-server"]["ports"] == {"plant-a": pa, "plant-b": pb}
            twin = engine.twin("t_a")
            assert twin is not None
            await eventually(lambda: "temperature" in twin.reported)
            await trio.sleep(0.3)  # an image refresh
            import struct

            r, hr = await trio.to_thread.run_sync(scada, pa, [("ir", 0, 2), ("hr", 0, 1)])
            assert struct.unpack(">f", struct.pack(">HH", *r.registers))[0] == 21.5
            assert hr.registers == [5]  # the desired value
            # the SCADA writes a setpoint: a desired-state change, delivered to the device
            (w,) = await trio.to_thread.run_sync(scada, pa, [("w", 0, 42)])
            assert not w.isError()
            await eventually(lambda: twin.desired.get("sampling_rate") == 42)
            assert engine.overrides.of("t_a")["sampling_rate"].set_by == "modbus:plant-a"
            await eventually(lambda: twin.reported.get("sampling_rate") is not None
                             and twin.reported["sampling_rate"].value == 42)
            (hr,) = await trio.to_thread.run_sync(scada, pa, [("hr", 0, 1)])
            assert hr.registers == [42]
            # refused: a read-only register (2), a value outside the model's range (3)
            bad = await trio.to_thread.run_sync(scada, pa, [("w", 9, 1), ("w", 0, 5000)])
            assert [x.exception_code for x in bad] == [2, 3]
            assert twin.desired["sampling_rate"] == 42
            # the plant-b SCADA is a viewer: reads yes, writes no (1: illegal function)
            r, w = await trio.to_thread.run_sync(scada, pb, [("ir", 0, 2), ("w", 0, 9)])
            assert not r.isError() and w.isError() and w.exception_code == 1
            tb = engine.twin("t_b")
            assert tb is not None and "sampling_rate" not in tb.desired
    finally:
        reg.close()
