"""Interoperability with a Modbus implementation that shares no code with pymodbus:
pyModbusTCP (PyPI ``pymodbustcp``). Its ``ModbusServer`` runs in another process
(tests/bindings/pymodbustcp_peer.py, values encoded there with ``struct``) and is polled by
the ``modbus`` binding; its ``ModbusClient`` (a SCADA) reads and writes the engine's slave
mode (twin/runtime/modbus_server.py)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from twin.bindings import aio
from twin.bindings.base import Quality, Reading
from twin.bindings.modbus import POOL, ModbusBinding

PEER = Path(__file__).with_name("pymodbustcp_peer.py")
ROOT = Path(__file__).resolve().parents[2]

INT16, UINT32, FLOAT32, BITS = -1234, 3000000001, -123.456, 0x8008  # as in the peer
ORDERS = ("ABCD", "BADC", "CDAB", "DCBA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pmt_peer() -> Iterator[int]:
    """A pyModbusTCP server in another process: its port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(PEER), "--port", str(port)], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"pyModbusTCP peer did not start: {line!r}")
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def _no_lines_left() -> Iterator[None]:
    yield
    assert not POOL.lines, "a line was left open"
    aio.shutdown()


def binding(port: int, points: dict[str, Any], unit: int = 1, **extra: Any) -> ModbusBinding:
    opts = {"host": "127.0.0.1", "port": port, "unit": unit, "timeout": "500ms", "retries": 0,
            "points": points, **extra}
    return ModbusBinding(f"plc{unit}", opts)


def by_point(readings: list[Reading]) -> dict[str, Reading]:
    return {r.point: r for r in readings}


POINTS: dict[str, Any] = {
    "plain": {"register": 40001, "type": "uint16"},
    **{f"i16_{o}": {"register": 40002 + i, "type": "int16", "order": o} for i, o in enumerate(ORDERS)},
    **{f"u32_{o}": {"register": 40011 + 2 * i, "type": "uint32", "order": o} for i, o in enumerate(ORDERS)},
    **{f"f32_{o}": {"register": 30001 + 2 * i, "type": "float32", "order": o} for i, o in enumerate(ORDERS)},
    "bit3": {"register": "40021.3"}, "bit2": {"register": "40021.2"}, "bit15": {"register": "40021.15"},
    **{f"coil{i}": {"register": 1 + i} for i in range(4)},
    **{f"di{i}": {"register": 10001 + i} for i in range(4)},
}


async def test_binding_reads_every_table_type_and_order_from_pymodbustcp(pmt_peer: int) -> None:
    b = binding(pmt_peer, POINTS, unit=7)  # pyModbusTCP answers any unit id
    await b.connect()
    try:
        got = by_point(await b.read())
    finally:
        await b.close()
    assert {k: r.quality for k, r in got.items()} == {k: Quality.GOOD for k in POINTS}
    assert got["plain"].value == 1234
    for o in ORDERS:
        assert got[f"i16_{o}"].value == INT16, o
        assert got[f"u32_{o}"].value == UINT32, o
        assert got[f"f32_{o}"].value == struct.unpack(">f", struct.pack(">f", FLOAT32))[0], o
    assert (got["bit3"].value, got["bit2"].value, got["bit15"].value) == (True, False, True)
    assert [got[f"coil{i}"].value for i in range(4)] == [True, False, True, False]
    assert [got[f"di{i}"].value for i in range(4)] == [False, True, True, False]


async def test_binding_writes_fc6_fc16_fc5_and_a_bit_field_to_pymodbustcp(pmt_peer: int) -> None:
    points = {
        "sp16": {"register": 40031, "type": "int16", "access": "readwrite"},  # FC 6
        "spf": {"register": 40033, "type": "float32", "order": "CDAB", "access": "readwrite"},  # FC 16
        "sp32": {"register": 40035, "type": "uint32", "order": "BADC", "access": "readwrite",
                 "write_fc": 16},
        "relay": {"register": 6, "access": "readwrite"},  # coil 5, FC 5
        "flag": {"register": "40021.2", "access": "readwrite"},  # read-modify-write, FC 6
        "word": {"register": 40021, "type": "uint16"},
    }
    b = binding(pmt_peer, points)
    await b.connect()
    try:
        await b.write("sp16", -321)
        await b.write("spf", 42.5)
        await b.write("sp32", 4000000003)
        await b.write("relay", True)
        await b.write("flag", True)
        got = by_point(await b.read())
        assert got["sp16"].value == -321 and got["spf"].value == 42.5
        assert got["sp32"].value == 4000000003 and got["relay"].value is True
        assert got["flag"].value is True
        assert got["word"].value == BITS | 0x4  # bits 3 and 15 kept
        # the registers as pyModbusTCP stored them (decoded here with struct)
        assert b.line is not None
        raw = await b._read_block(_block(3, 30, 6))
        assert struct.unpack(">h", struct.pack(">H", raw[0]))[0] == -321
        assert struct.unpack(">f", struct.pack(">HH", raw[3], raw[2]))[0] == 42.5
        assert struct.unpack(">I", bytes([raw[4] & 0xFF, raw[4] >> 8, raw[5] & 0xFF, raw[5] >> 8]))[0] == 4000000003
        await b.write("relay", False)
        await b.write("flag", False)
        got = by_point(await b.read(["relay", "word"]))
        assert got["relay"].value is False and got["word"].value == BITS
    finally:
        await b.close()


def _block(fc: int, start: int, count: int) -> Any:
    from twin.bindings.modbus_codec import Block

    return Block(fc, start, count, [])


async def test_an_exception_reply_from_pymodbustcp_is_bad_and_the_rest_good(pmt_peer: int) -> None:
    b = binding(pmt_peer, {"ok": {"register": 40001, "type": "uint16"},
                           "far": {"register": 40501}, "far_coil": {"register": 501},
                           "f": {"register": 30001, "type": "float32"}})
    await b.connect()
    try:
        got = by_point(await b.read())
        again = by_point(await b.read())  # the line stays in step after exception replies
    finally:
        await b.close()
    for g in (got, again):
        assert (g["ok"].value, g["ok"].quality) == (1234, Quality.GOOD)
        assert g["f"].quality is Quality.GOOD
        assert (g["far"].value, g["far"].quality) == (None, Quality.BAD)
        assert (g["far_coil"].value, g["far_coil"].quality) == (None, Quality.BAD)


# -- slave mode, read and written by pyModbusTCP's client ---------------------------------------
SERVED = {
    "temperature": {"register": 30001, "type": "float32", "order": "CDAB"},
    "sampling_rate": {"register": 40001, "type": "uint16", "access": "readwrite"},
    "gain": {"register": 40003, "type": "float32", "access": "readwrite"},
    "label": {"register": 40010, "type": "int16"},
}


def pmt_scada(port: int, calls: list[tuple[str, int, Any]]) -> list[Any]:
    """A SCADA session with pyModbusTCP's client (blocking; run in a worker thread). A refused
    request gives None; its exception code is in the result as ("exc", code)."""
    from pyModbusTCP.client import ModbusClient

    client = ModbusClient("127.0.0.1", port, unit_id=1, timeout=2.0, auto_open=False)
    assert client.open(), client.last_error_as_txt
    out: list[Any] = []
    try:
        for fn, address, arg in calls:
            call = {"ir": client.read_input_registers, "hr": client.read_holding_registers,
                    "w6": client.write_single_register, "w16": client.write_multiple_registers}[fn]
            result = call(address, arg)
            out.append(result if result not in (None, False) else ("exc", client.last_except))
    finally:
        client.close()
    return out


async def test_slave_mode_read_and_written_by_pymodbustcp(tmp_path: Path) -> None:
    from runtime.helpers import (
        apply,
        eventually,
        fast_config,
        model,
        running_engine,
        sim_device,
        site,
    )

    from twin.control.service import ControlService
    from twin.registry import open_registry
    from twin.runtime.modbus_server import ModbusServerService

    port = free_port()
    th = model("th", properties={
        "sampling_rate": {"type": "integer", "access": "readwrite", "min": 1, "max": 3600},
        "gain": {"type": "number", "access": "readwrite"}},
        telemetry={"temperature": {"type": "number"}, "label": {"type": "integer"}})
    dev = sim_device("t_a", model_="th", interval="100ms",
                     points={"temperature": {"wave": "constant", "value": -21.5},
                             "label": {"wave": "constant", "value": -7}})
    dev["spec"]["desired"] = {"sampling_rate": 5, "gain": 1.5}
    doc = site("plant-a")
    doc["spec"]["modbus_server"] = {"listen": f"127.0.0.1:{port}", "role": "operator", "refresh": "100ms",
                                    "units": [{"unit": 1, "device": "t_a", "points": SERVED}]}
    reg = open_registry(None, tmp_path / "state")
    apply(reg, doc, th, dev)
    try:
        async with running_engine(reg, fast_config(state_dir=tmp_path / "state"),
                                  [ControlService(reconcile_interval=0.1), ModbusServerService()]) as engine:
            twin = engine.twin("t_a")
            assert twin is not None
            await eventually(lambda: "temperature" in twin.reported and "label" in twin.reported)
            await trio.sleep(0.3)  # an image refresh
            ir, hr, label = await trio.to_thread.run_sync(
                pmt_scada, port, [("ir", 0, 2), ("hr", 0, 5), ("hr", 9, 1)])
            assert struct.unpack(">f", struct.pack(">HH", ir[1], ir[0]))[0] == -21.5  # CDAB
            assert hr[0] == 5 and struct.unpack(">f", struct.pack(">HH", hr[2], hr[3]))[0] == 1.5
            assert struct.unpack(">h", struct.pack(">H", label[0]))[0] == -7
            # setpoints: FC 6 and FC 16 become desired-state changes delivered to the device
            gain = list(struct.unpack(">HH", struct.pack(">f", 2.25)))
            w6, w16 = await trio.to_thread.run_sync(pmt_scada, port, [("w6", 0, 42), ("w16", 2, gain)])
            assert w6 is True and w16 is True
            await eventually(lambda: twin.desired.get("sampling_rate") == 42 and twin.desired.get("gain") == 2.25)
            assert engine.overrides.of("t_a")["sampling_rate"].set_by == "modbus:plant-a"
            await trio.sleep(0.3)
            (hr,) = await trio.to_thread.run_sync(pmt_scada, port, [("hr", 0, 4)])
            assert hr[0] == 42 and struct.unpack(">f", struct.pack(">HH", hr[2], hr[3]))[0] == 2.25
            # refused, with the exception a SCADA understands: read-only (2), out of range (3)
            bad = await trio.to_thread.run_sync(pmt_scada, port, [("w6", 9, 1), ("w6", 0, 5000)])
            assert bad == [("exc", 2), ("exc", 3)]
            assert twin.desired["sampling_rate"] == 42
    finally:
        reg.close()
