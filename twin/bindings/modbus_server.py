"""A Modbus TCP server (pymodbus, on the engine's asyncio thread) serving a register *image*:
plain lists per unit and table that Trio code fills, with a hook that judges every write.

Used by the Modbus simulator of the demo (twin/sim/modbus_device.py) and by slave mode, which
exposes twin properties to a SCADA (twin/runtime/modbus_server.py).

* ``image[unit][table]``: table 1 coils, 2 discrete inputs (bools), 3 holding registers,
  4 input registers (ints 0-65535). Trio code writes slices of these lists (one slice
  assignment is atomic under the GIL); reads copy them into pymodbus' registers.
* ``on_write(unit, table, address, values) -> exception code | None`` runs on the asyncio
  thread for every write request (FC 5/6/15/16) **before** it is applied: return 1 (illegal
  function), 2 (illegal data address) or 3 (illegal data value) to refuse it; it must be quick
  and must not raise (use :func:`twin.bindings.aio.channel` to hand the write to Trio).
* Requests for units that are not served get no answer (as on a real line); malformed frames
  are dropped by pymodbus' framer and counted as ``malformed`` in twin_protocol_* metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from twin.bindings import aio
from twin.bindings.modbus_codec import encode
from twin.bindings.protostats import stats
from twin.spec.modbus import Point

log = logging.getLogger(__name__)

STATS = stats("modbus-server")

WRITE_TABLE = {5: 1, 15: 1, 6: 3, 16: 3}
READ_TABLE = {1: 1, 2: 2, 3: 3, 4: 4}

OnWrite = Callable[[int, int, int, list[Any]], int | None]


class RegisterServer:
    def __init__(
        self,
        host: str,
        port: int,
        units: Iterable[int],
        *,
        size: int = 256,
        on_write: OnWrite | None = None,
        name: str = "modbus server",
    ) -> None:
        self.host, self.port, self.name = host, port, name
        self.size = size
        self.units = sorted(set(units))
        self.image: dict[int, dict[int, list[Any]]] = {
            u: {1: [False] * size, 2: [False] * size, 3: [0] * size, 4: [0] * size}
            for u in self.units
        }
        self.on_write = on_write
        self._server: Any = None

    def put(self, unit: int, point: Point, value: Any) -> None:
        """Write ``value`` of ``point`` into ``unit``'s image (from Trio). Raises EncodeError."""
        table = self.image[unit][point.fc]
        if point.fc in (1, 2):
            table[point.address] = bool(value)
        elif point.bit is not None:
            mask = 1 << point.bit
            table[point.address] = (table[point.address] & ~mask) | (mask if value else 0)
        else:
            table[point.address : point.address + point.count] = encode(point, value)

    def _action(self, unit: int) -> Callable[..., Any]:
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            current_registers: list[int],
            set_values: list[Any] | None,
        ) -> Any:
            from pymodbus.constants import ExcCodes

            STATS.requests += 1
            img = self.image[unit]
            if set_values is not None:
                table = WRITE_TABLE.get(function_code)
                if table is None:
                    STATS.errors += 1
                    return ExcCodes.ILLEGAL_FUNCTION
                values = list(set_values)
                if self.on_write is not None:
                    try:
                        code = self.on_write(unit, table, address, values)
                    except Exception:
                        log.exception("%s: write hook failed (unit %d)", self.name, unit)
                        code = 4
                    if code:
                        STATS.errors += 1
                        return ExcCodes(code)
                img[table][address : address + len(values)] = values
                return None
            table = READ_TABLE.get(function_code) or WRITE_TABLE.get(function_code)
            if table is None:
                return None
            data = img[table]
            if table in (3, 4):
                n = min(len(current_registers), len(data))
                current_registers[:n] = data[:n]
            else:  # bits: 16 per register, LSB first
                for r in range(min(len(current_registers), (len(data) + 15) // 16)):
                    word = 0
                    for j, bit in enumerate(data[r * 16 : r * 16 + 16]):
                        if bit:
                            word |= 1 << j
                    current_registers[r] = word
            return None

        return action

    def _build(self) -> Any:  # asyncio thread
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        n = self.size
        devices = [
            SimDevice(
                unit,
                simdata=(
                    [SimData(0, count=n, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=n, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=n, values=0, datatype=DataType.REGISTERS)],
                    [SimData(0, count=n, values=0, datatype=DataType.REGISTERS)],
                ),
                action=self._action(unit),
            )
            for unit in self.units
        ]
        units = set(self.units)

        def silence_others(sending: bool, data: bytes) -> bytes:
            # pymodbus answers "device failure" for an unknown unit; a real line stays silent
            if sending and len(data) > 6 and data[6] not in units:
                return b""
            return data

        return ModbusTcpServer(devices, address=(self.host, self.port), trace_packet=silence_others)

    async def start(self) -> int:
        """Listen; returns the bound port (``port: 0`` picks a free one)."""

        async def start_() -> int:
            self._server = self._build()
            await self._server.serve_forever(background=True)
            return int(self._server.transport.sockets[0].getsockname()[1])

        self.port = await aio.run(start_)
        log.info("%s: listening on %s:%d (units %s)", self.name, self.host, self.port,
                 ", ".join(map(str, self.units)))
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await aio.run(server.shutdown)
