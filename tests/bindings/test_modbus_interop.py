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
from twin.errors import BindingConnectError

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


async def test_full_size_requests_and_fc15_against_pymodbustcp(pmt_peer: int) -> None:
    """125 registers (the most one read may ask) and 100 bits in one request each; a coil
    written with FC 15."""
    b = binding(pmt_peer, {
        "first": {"register": 40001, "type": "uint16"}, "last": {"register": 40125, "type": "uint16"},
        "c0": {"register": 1}, "c99": {"register": 100}, "d1": {"register": 10002}, "d99": {"register": 10100},
        "relay": {"register": 8, "access": "readwrite", "write_fc": 15},
    }, max_gap=200)
    await b.connect()
    try:
        assert b.line is not None
        before = b.line.requests
        got = by_point(await b.read())
        assert b.line.requests - before == 3  # FC 3 0-124, FC 1 0-99, FC 2 1-99
        assert {k: r.quality for k, r in got.items()} == {k: Quality.GOOD for k in got}
        assert (got["first"].value, got["last"].value) == (1234, 0xBEEF)
        assert (got["c0"].value, got["c99"].value, got["d1"].value, got["d99"].value) == (True, True, True, True)
        assert got["relay"].value is False
        await b.write("relay", True)
        assert by_point(await b.read(["relay", "c99"])) ["relay"].value is True
    finally:
        await b.close()


def _block(fc: int, start: int, count: int) -> Any:
    from twin.bindings.modbus_codec import Block

    return Block(fc, start, count, [])


async def test_an_exception_reply_from_pymodbustcp_is_bad_and_the_rest_good(pmt_peer: int) -> None:
    """Reads refused (exception 2) are bad; a write refused fails with the exception's name."""
    from twin.bindings.modbus import ModbusError

    b = binding(pmt_peer, {"ok": {"register": 40001, "type": "uint16"},
                           "far_sp": {"register": 40601, "access": "readwrite"},
                           "far": {"register": 40501}, "far_coil": {"register": 501},
                           "f": {"register": 30001, "type": "float32"}})
    await b.connect()
    try:
        got = by_point(await b.read())
        again = by_point(await b.read())  # the line stays in step after exception replies
        with pytest.raises(ModbusError, match="exception 2 \\(illegal data address\\)"):
            await b.write("far_sp", 5)
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
    "enabled": {"register": 1, "access": "readwrite"},
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
                    "w6": client.write_single_register, "w16": client.write_multiple_registers,
                    "coils": client.read_coils, "w5": client.write_single_coil,
                    "w15": client.write_multiple_coils}[fn]
            result = call(address, arg)
            out.append(result if result not in (None, False) else ("exc", client.last_except))
    finally:
        client.close()
    return out


async def test_slave_mode_read_and_written_by_pymodbustcp(tmp_path: Path) -> None:
    """Registers (FC 3/4/6/16) and coils (FC 1/5/15), with the exceptions a SCADA expects."""
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
        "gain": {"type": "number", "access": "readwrite"},
        "enabled": {"type": "boolean", "access": "readwrite"}},
        telemetry={"temperature": {"type": "number"}, "label": {"type": "integer"}})
    dev = sim_device("t_a", model_="th", interval="100ms",
                     points={"temperature": {"wave": "constant", "value": -21.5},
                             "label": {"wave": "constant", "value": -7}})
    dev["spec"]["desired"] = {"sampling_rate": 5, "gain": 1.5, "enabled": False}
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
            ir, hr, label, coils = await trio.to_thread.run_sync(
                pmt_scada, port, [("ir", 0, 2), ("hr", 0, 5), ("hr", 9, 1), ("coils", 0, 8)])
            assert coils == [False] * 8
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
            # FC 16 over a writable and a read-only register (2); reads past the map (2)
            bad = await trio.to_thread.run_sync(pmt_scada, port, [("w16", 8, [1, 2, 3]), ("hr", 500, 2),
                                                                   ("coils", 500, 1)])
            assert bad == [("exc", 2)] * 3
            assert twin.desired["sampling_rate"] == 42
            # coils: FC 5 and FC 15
            (w5,) = await trio.to_thread.run_sync(pmt_scada, port, [("w5", 0, True)])
            assert w5 is True
            await eventually(lambda: twin.desired.get("enabled") is True)
            await trio.sleep(0.3)
            (coils,) = await trio.to_thread.run_sync(pmt_scada, port, [("coils", 0, 1)])
            assert coils == [True]
            (w15,) = await trio.to_thread.run_sync(pmt_scada, port, [("w15", 0, [False])])
            assert w15 is True
            await eventually(lambda: twin.desired.get("enabled") is False)
            bad = await trio.to_thread.run_sync(pmt_scada, port, [("w5", 1, True)])
            assert bad == [("exc", 2)]  # no point there
    finally:
        reg.close()


# -- a byte-level adversary: a quirky PLC or gateway -------------------------------------------
GOOD, WRONG = 42, 999
"""The register's value; what a reply that must not be taken says instead."""


def reply(req: bytes, value: int, *, tid: int | None = None, unit: int | None = None,
          fc: int | None = None, length_delta: int = 0) -> bytes:
    """The Modbus TCP reply to ``req`` (FC 3, one register) — or a quirky variant of it."""
    pdu = bytes([fc if fc is not None else req[7], 2]) + value.to_bytes(2, "big")
    head = (tid if tid is not None else int.from_bytes(req[0:2], "big")).to_bytes(2, "big") + b"\0\0"
    return head + (len(pdu) + 1 + length_delta).to_bytes(2, "big") + bytes(
        [unit if unit is not None else req[6]]) + pdu


def tid_of(req: bytes) -> int:
    return int.from_bytes(req[0:2], "big")


async def _answer(quirk: str, stream: trio.SocketStream, req: bytes, n: int, held: list[bytes]) -> None:
    """How the adversary answers the ``n``-th request it got (0-based, over all connections).
    Every quirk plays on the first request only (``silent``: from the second on); the rest get
    good replies."""
    if quirk == "split":  # every reply in 1-byte segments, 20 ms apart
        for b in reply(req, GOOD):
            await stream.send_all(bytes([b]))
            await trio.sleep(0.02)
        return
    if quirk == "silent":  # accepts, answers once, then never again
        if n == 0:
            await stream.send_all(reply(req, GOOD))
        return
    if n > 0:
        if quirk == "coalesced" and n == 1:  # the retry: the first reply (late) and its own, in one segment
            await stream.send_all(reply(held[0], WRONG) + reply(req, GOOD))
        else:
            await stream.send_all(reply(req, GOOD))
        return
    held.append(req)
    frame = {
        "coalesced": b"",  # nothing yet: the caller times out and retries
        "wrong_tid": reply(req, WRONG, tid=tid_of(req) + 1),
        "wrong_unit": reply(req, WRONG, unit=req[6] + 1),
        # the request's transaction id, so taken: a device reached by IP may answer with
        # the "not significant" unit id (0xFF, or 0) instead of echoing the one asked
        "unit_0": reply(req, GOOD, unit=0),
        "unit_255": reply(req, GOOD, unit=255),
        "wrong_fc": reply(req, WRONG, fc=4),
        "mbap_long": reply(req, WRONG, length_delta=2),
        "mbap_short": reply(req, WRONG, length_delta=-1),
        "closed_mid_reply": reply(req, WRONG)[:8],
        "trailing_junk": reply(req, GOOD) + b"\x00\x00",
    }[quirk]
    if frame:
        await stream.send_all(frame)
    if quirk == "closed_mid_reply":
        await trio.sleep(0.05)
        await stream.aclose()


async def _adversary(listeners: list[trio.SocketListener], quirk: str, connections: list[int]) -> None:
    count = [0]
    held: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(1)
        buf = b""
        try:
            async for data in stream:
                buf += data
                while len(buf) >= 6 and len(buf) >= 6 + int.from_bytes(buf[4:6], "big"):
                    size = 6 + int.from_bytes(buf[4:6], "big")
                    req, buf = buf[:size], buf[size:]
                    n, count[0] = count[0], count[0] + 1
                    await _answer(quirk, stream, req, n, held)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_listeners(handle, listeners)


async def _outcome(b: ModbusBinding, seen: list[Reading]) -> str:
    """What one read of a one-point device came to: good, bad, stale, timeout (no reading),
    lost (its connection) or backoff (not reconnected yet); its readings go to ``seen``."""
    try:
        got = await b.read()
    except BindingConnectError as exc:
        return "lost" if "connection" in str(exc) else "backoff"
    seen.extend(got)
    if not got:
        return "timeout"
    (r,) = got
    return {Quality.GOOD: "good", Quality.BAD: "bad", Quality.STALE: "stale"}[r.quality]


# quirk -> (what the first read ends as, retries)
QUIRKS = {
    "split": ("good", 0),
    "coalesced": ("good", 1),
    "wrong_tid": ("timeout", 0),
    "wrong_unit": ("bad", 0),
    "unit_0": ("good", 0),
    "unit_255": ("good", 0),
    "wrong_fc": ("bad", 0),
    "mbap_long": ("timeout", 0),
    "mbap_short": ("bad", 0),
    "closed_mid_reply": ("lost", 0),
    "trailing_junk": ("good", 0),  # then the next request finds no header: a reconnect
    "silent": ("good", 0),
}


@pytest.mark.parametrize("quirk", list(QUIRKS))
async def test_a_quirky_peer_costs_one_request_never_a_wrong_value(quirk: str, pmt_peer: int) -> None:
    """The adversary plays ``quirk`` on the first request (see _answer). The read ends as a
    good value, a timeout, a bad reading or a lost connection — never a wrong value, never
    another exception — and the device reads good values afterwards (reconnecting if its
    connection was closed). Meanwhile a device on another line (the pyModbusTCP peer) polls
    every 50 ms, undisturbed."""
    first, retries = QUIRKS[quirk]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    connections: list[int] = []
    timeout = "1s" if quirk == "split" else "200ms"
    bad = ModbusBinding("quirky", {"host": "127.0.0.1", "port": port, "unit": 1, "timeout": timeout,
                                   "retries": retries, "points": {"a": {"register": 40001}}})
    other = binding(pmt_peer, {"plain": {"register": 40001, "type": "uint16"}})
    other_reads: list[Reading] = []
    seen: list[Reading] = []
    outcomes: list[str] = []

    async def poll_other() -> None:
        while True:
            other_reads.extend(await other.read())
            await trio.sleep(0.05)

    async def read_bad() -> str:
        return await _outcome(bad, seen)

    async with trio.open_nursery() as n:
        n.start_soon(_adversary, listeners, quirk, connections)
        try:
            await other.connect()
            n.start_soon(poll_other)
            await bad.connect()
            line = bad.line
            assert line is not None
            outcomes.append(await read_bad())
            with trio.fail_after(10):
                while len(outcomes) < 4 if quirk == "silent" else "good" not in outcomes[1:]:
                    outcomes.append(await read_bad())
                    await trio.sleep(0.05)
            await trio.sleep(0.1)
        finally:
            n.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await bad.close()
                await other.close()
    assert outcomes[0] == first, outcomes
    assert all(r.value == GOOD for r in seen if r.quality is not Quality.BAD), seen
    assert all(r.value is None for r in seen if r.quality is Quality.BAD), seen
    if quirk == "silent":
        assert outcomes[1:] == ["stale"] * 3, outcomes
    if quirk in ("wrong_tid", "coalesced"):
        assert line.transport.late >= 1
    assert len(other_reads) >= 3
    assert {(r.value, r.quality) for r in other_reads} == {(1234, Quality.GOOD)}



def crc16(data: bytes) -> bytes:
    """Modbus RTU CRC (poly 0xA001, init 0xFFFF), low byte first."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


async def _slow_then_wrong(listeners: list[trio.SocketListener], rtu: bool) -> None:
    """FC 3 of one register: address 0 is answered after 300 ms (the caller gave up after
    200) — in Modbus TCP under the *next* transaction id — with WRONG; any other address at
    once with GOOD."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async for data in stream:
                buf += data
                size = 8 if rtu else 12
                while len(buf) >= size:
                    req, buf = buf[:size], buf[size:]
                    address = int.from_bytes(req[2:4] if rtu else req[8:10], "big")
                    value = WRONG if address == 0 else GOOD
                    if rtu:
                        frame = req[:2] + bytes([2]) + value.to_bytes(2, "big")
                        frame += crc16(frame)
                    else:
                        frame = reply(req, value, tid=tid_of(req) + 1 if address == 0 else None)
                    if address == 0:
                        await trio.sleep(0.3)
                    await stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("framing", ["socket", "rtu"])
async def test_bytes_that_came_before_a_request_are_not_its_reply(framing: str) -> None:
    """A reply that comes after its request was given up on, and before the next request is
    sent, can be no answer to that next request: in RTU over TCP (no transaction id) a late
    reply of the same unit and function code and length, in Modbus TCP a frame that carries
    the next transaction id. The next request must get its own reply."""
    from twin.bindings.modbus import LinePool, ModbusTimeout, _request
    from twin.bindings.modbus_codec import Block

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    pool = LinePool()
    async with trio.open_nursery() as n:
        n.start_soon(_slow_then_wrong, listeners, framing == "rtu")
        line = pool.acquire({"host": "127.0.0.1", "port": port, "framing": framing})
        try:
            with pytest.raises(ModbusTimeout):
                await line.call("plc1", _request(Block(3, 0, 1, []), 1), 0.2, 0)
            await trio.sleep(0.3)  # the late reply is in the socket's buffer now
            reply_ = await line.call("plc1", _request(Block(3, 10, 1, []), 1), 1.0, 0)
            assert list(reply_.registers) == [GOOD]
            assert line.transport.late == 1
        finally:
            await pool.release(line)
            n.cancel_scope.cancel()


def rtu_reply(req: bytes, value: int, *, unit: int | None = None, fc: int | None = None) -> bytes:
    """The RTU reply to ``req`` (FC 3, one register), CRC included."""
    frame = bytes([unit if unit is not None else req[0], fc if fc is not None else req[1], 2])
    frame += value.to_bytes(2, "big")
    return frame + crc16(frame)


async def _rtu_adversary(listeners: list[trio.SocketListener], quirk: str, connections: list[int]) -> None:
    """RTU over TCP: ``quirk`` on the first request (``split``: on every one; ``silent``: from
    the second on), good replies to the rest."""
    count = [0]

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(1)
        buf = b""
        try:
            async for data in stream:
                buf += data
                while len(buf) >= 8:
                    req, buf = buf[:8], buf[8:]
                    n, count[0] = count[0], count[0] + 1
                    good = rtu_reply(req, GOOD)
                    if quirk == "split":
                        for b in good:
                            await stream.send_all(bytes([b]))
                            await trio.sleep(0.02)
                        continue
                    if quirk == "silent":
                        if n == 0:
                            await stream.send_all(good)
                        continue
                    if n > 0:
                        await stream.send_all(good)
                        continue
                    wrong = rtu_reply(req, WRONG)
                    frame = {
                        "bad_crc": wrong[:-1] + bytes([wrong[-1] ^ 0xFF]),
                        "noise_first": b"\x00\xff\x13" + good,
                        "late_other_unit_first": rtu_reply(req, WRONG, unit=req[0] + 1) + good,
                        "wrong_unit": rtu_reply(req, WRONG, unit=req[0] + 1),
                        "wrong_fc": rtu_reply(req, WRONG, fc=4),
                        "exception": (lambda f: f + crc16(f))(bytes([req[0], 0x83, 2])),
                        "closed_mid_reply": wrong[:3],
                    }[quirk]
                    await stream.send_all(frame)
                    if quirk == "closed_mid_reply":
                        await trio.sleep(0.05)
                        await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_listeners(handle, listeners)


RTU_QUIRKS = {
    "split": "good",
    "bad_crc": "bad",
    "noise_first": "good",
    "late_other_unit_first": "good",
    "wrong_unit": "timeout",
    "wrong_fc": "timeout",
    "exception": "bad",
    "closed_mid_reply": "lost",
    "silent": "good",
}


@pytest.mark.parametrize("quirk", list(RTU_QUIRKS))
async def test_a_quirky_rtu_over_tcp_gateway_costs_one_request_never_a_wrong_value(quirk: str) -> None:
    """As test_a_quirky_peer_costs_one_request_never_a_wrong_value, for RTU over TCP (no
    transaction id, a CRC): the read ends good, timed out, bad or lost, never with a wrong
    value, and the device reads good values afterwards."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    connections: list[int] = []
    b = ModbusBinding("quirky", {"host": "127.0.0.1", "port": port, "unit": 1, "framing": "rtu",
                                 "timeout": "1s" if quirk == "split" else "200ms", "retries": 0,
                                 "points": {"a": {"register": 40001}}})
    seen: list[Reading] = []
    outcomes: list[str] = []

    async def read() -> str:
        return await _outcome(b, seen)

    async with trio.open_nursery() as n:
        n.start_soon(_rtu_adversary, listeners, quirk, connections)
        try:
            await b.connect()
            outcomes.append(await read())
            with trio.fail_after(10):
                while len(outcomes) < 4 if quirk == "silent" else "good" not in outcomes[1:]:
                    outcomes.append(await read())
                    await trio.sleep(0.05)
        finally:
            n.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await b.close()
    assert outcomes[0] == RTU_QUIRKS[quirk], outcomes
    assert all(r.value == GOOD for r in seen if r.quality is not Quality.BAD), seen
    assert all(r.value is None for r in seen if r.quality is Quality.BAD), seen
    if quirk == "silent":
        assert outcomes[1:] == ["stale"] * 3, outcomes


async def _closes_when_idle(listeners: list[trio.SocketListener], connections: list[int]) -> None:
    """A gateway that closes a connection idle for 100 ms (many do, after some seconds)."""

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(1)
        buf = b""
        try:
            while True:
                with trio.move_on_after(0.1):
                    data = await stream.receive_some()
                    if not data:
                        return
                    buf += data
                    while len(buf) >= 12:
                        req, buf = buf[:12], buf[12:]
                        await stream.send_all(reply(req, GOOD))
                    continue
                await stream.aclose()
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_listeners(handle, listeners)


async def test_a_gateway_that_closes_idle_connections_costs_no_poll() -> None:
    """Polled every 300 ms, a gateway that closes connections idle for 100 ms: every poll finds
    the connection closed by the peer. It is reopened before the request goes out, so each
    poll reads a good value (it used to fail with "connection lost" every time)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    connections: list[int] = []
    b = ModbusBinding("idle", {"host": "127.0.0.1", "port": port, "unit": 1, "timeout": "500ms",
                               "retries": 0, "points": {"a": {"register": 40001}}})
    got: list[Reading] = []
    async with trio.open_nursery() as n:
        n.start_soon(_closes_when_idle, listeners, connections)
        try:
            await b.connect()
            for _ in range(4):
                await trio.sleep(0.3)
                got.extend(await b.read())
        finally:
            n.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await b.close()
    assert [(r.value, r.quality) for r in got] == [(GOOD, Quality.GOOD)] * 4
    assert len(connections) == 5


async def _gateway(listeners: list[trio.SocketListener], dead: dict[int, int]) -> None:
    """A Modbus TCP gateway: units in ``dead`` get that exception (10: gateway path
    unavailable, 11: gateway target device failed to respond), the others GOOD in every
    register asked for."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async for data in stream:
                buf += data
                while len(buf) >= 12:
                    req, buf = buf[:12], buf[12:]
                    code = dead.get(req[6])
                    if code:
                        pdu = bytes([req[7] | 0x80, code])
                    else:
                        count = int.from_bytes(req[10:12], "big")
                        pdu = bytes([req[7], 2 * count]) + GOOD.to_bytes(2, "big") * count
                    await stream.send_all(req[:4] + (len(pdu) + 1).to_bytes(2, "big") + req[6:7] + pdu)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("code", [10, 11])
async def test_a_gateway_saying_its_unit_did_not_answer_is_a_silent_unit(code: int) -> None:
    """Gateways (Modbus TCP to RTU) answer exception 11 (target failed to respond) or 10 (no
    path) for a dead serial unit, after their own timeout. That is the unit's silence, not a
    bad value: its cycle stops at the first such reply (the gateway's timeout is paid once),
    its points go stale, its silent cycles count (the session ends after MAX_FAILURES and
    the twin goes offline, as for a unit that does not answer at all); the unit beside it
    on the same gateway reads good values."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    points = {"a": {"register": 40001}, "b": {"register": 40101}}  # two requests a cycle
    opts = {"host": "127.0.0.1", "port": port, "timeout": "500ms", "retries": 1, "points": points}
    dead = ModbusBinding("dead", {**opts, "unit": 9})
    live = ModbusBinding("live", {**opts, "unit": 1})
    async with trio.open_nursery() as n:
        n.start_soon(_gateway, listeners, {9: code})
        try:
            await live.connect()
            await dead.connect()
            assert dead.line is live.line is not None
            before = dead.line.requests
            got = await dead.read()
            assert dead.line.requests - before == 1
            assert got == [] and dead.silent_cycles == 1  # no value yet to repeat as stale
            assert {(r.value, r.quality) for r in await live.read()} == {(GOOD, Quality.GOOD)}
            dead.last = {"a": 7}
            got = await dead.read()
            assert [(r.point, r.value, r.quality) for r in got] == [("a", 7, Quality.STALE)]
            assert dead.silent_cycles == 2
        finally:
            n.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await dead.close()
                await live.close()
