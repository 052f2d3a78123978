"""A Modbus peer for the tests, run in its own process: a pymodbus server whose input
registers are computed from the clock on every read, in all four byte orders, encoded here
with ``struct`` independently of twin's codec.

    python tests/bindings/modbus_peer.py --port 15020 [--framing rtu] [--units 1,3]
    python tests/bindings/modbus_peer.py --serial /dev/pts/7 --units 1

Units not listed do not answer at all (a dead unit). Prints ``ready`` when serving.

Input registers (FC 4) of each unit, value ``t = time.time()``:
  0-1 float32 ABCD of t % 100000, 2-3 BADC, 4-5 CDAB, 6-7 DCBA
  8-11 float64 ABCD of t, 12-15 float64 DCBA, 16-17 uint32 ABCD of int(t),
  18 int16 = -unit, 20-23 string "FLUX-U<unit>"
Holding registers (FC 3/6/16) 0-199, coils 0-63: plain storage (hr[0] = unit).
Discrete inputs 0-63: all on.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time


def words(b: bytes) -> list[int]:
    return [b[i] << 8 | b[i + 1] for i in range(0, len(b), 2)]


def f32_orders(v: float) -> list[int]:
    a, b, c, d = struct.pack(">f", v)
    return [
        *words(bytes([a, b, c, d])),  # ABCD
        *words(bytes([b, a, d, c])),  # BADC
        *words(bytes([c, d, a, b])),  # CDAB
        *words(bytes([d, c, b, a])),  # DCBA
    ]


def clock_registers(unit: int, t: float) -> dict[int, int]:
    regs = f32_orders(t % 100000)
    regs += words(struct.pack(">d", t))
    regs += words(struct.pack(">d", t)[::-1])
    regs += words(struct.pack(">I", int(t)))
    regs += [struct.unpack(">H", struct.pack(">h", -unit))[0], 0]
    regs += words(f"FLUX-U{unit}".encode().ljust(8, b"\0"))
    return dict(enumerate(regs))


async def main() -> None:
    from pymodbus import FramerType
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--serial")
    ap.add_argument("--framing", default="socket")
    ap.add_argument("--units", default="1")
    args = ap.parse_args()
    units = [int(u) for u in args.units.split(",")]

    def make_action(unit: int):
        async def action(function_code, start_address, address, count, current_registers, set_values):
            if function_code == 4 and set_values is None:
                for i, v in clock_registers(unit, time.time()).items():
                    current_registers[i - start_address] = v
            return None
        return action

    devices = []
    for unit in units:
        hr = [unit] + [0] * 199
        devices.append(SimDevice(
            unit,
            simdata=(
                [SimData(0, count=64, values=False, datatype=DataType.BITS)],
                [SimData(0, count=64, values=True, datatype=DataType.BITS)],
                [SimData(0, values=hr, datatype=DataType.REGISTERS)],
                [SimData(0, count=200, values=0, datatype=DataType.REGISTERS)],
            ),
            action=make_action(unit),
        ))
    # any other unit id is dead: pymodbus would answer "device failure" for it; a dead unit
    # sends nothing, so its replies are suppressed on the way out
    unit_at = 0 if args.serial or args.framing == "rtu" else 6

    def silence_dead(sending: bool, data: bytes) -> bytes:
        if sending and len(data) > unit_at and data[unit_at] not in units:
            return b""
        return data

    if args.serial:
        server = ModbusSerialServer(devices, framer=FramerType.RTU, port=args.serial, baudrate=19200,
                                    trace_packet=silence_dead)
    else:
        framer = FramerType.RTU if args.framing == "rtu" else FramerType.SOCKET
        server = ModbusTcpServer(devices, framer=framer, address=("127.0.0.1", args.port),
                                 trace_packet=silence_dead)
    task = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0.2)
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.CRITICAL, stream=sys.stderr)  # dead units log tracebacks
    asyncio.run(main())
