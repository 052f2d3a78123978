"""An independent Modbus TCP peer for the interop tests, run in its own process: pyModbusTCP's
``ModbusServer`` (its own framing and PDU code, nothing shared with pymodbus), values encoded
here with ``struct``, not with twin's codec.

    python tests/bindings/pymodbustcp_peer.py --port 15021

Prints ``ready`` when serving. Every table holds 200 entries (address 200 and above:
exception 2, illegal data address); pyModbusTCP answers any unit id.

Holding registers: 0 = 1234; 1-4 int16 -1234 as ABCD, BADC, CDAB, DCBA; 10-17 uint32
3000000001 as ABCD, BADC, CDAB, DCBA (2 registers each); 20 = 0x8008 (bits 3 and 15 set);
30-39 zero (write targets), 124 = 0xBEEF. Input registers: 0-7 float32 -123.456 as ABCD, BADC, CDAB, DCBA.
Coils 0-3: on, off, on, off, 99 on; discrete inputs 0-3: off, on, on, off, 99 on.
"""

from __future__ import annotations

import argparse
import struct
import time

INT16 = -1234
UINT32 = 3000000001
FLOAT32 = -123.456
BITS = 0x8008


def words(b: bytes) -> list[int]:
    return [b[i] << 8 | b[i + 1] for i in range(0, len(b), 2)]


def four_orders(raw: bytes) -> list[int]:
    """``raw`` (4 bytes, big-endian ABCD) as ABCD, BADC, CDAB, DCBA registers."""
    a, b, c, d = raw
    return [*words(bytes([a, b, c, d])), *words(bytes([b, a, d, c])),
            *words(bytes([c, d, a, b])), *words(bytes([d, c, b, a]))]


def int16_orders(v: int) -> list[int]:
    hi, lo = struct.pack(">h", v)
    return words(bytes([hi, lo, lo, hi, hi, lo, lo, hi]))  # a single word: byte swap only


def main() -> None:
    from pyModbusTCP.server import DataBank, ModbusServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    bank = DataBank(coils_size=200, d_inputs_size=200, h_regs_size=200, i_regs_size=200)
    bank.set_holding_registers(0, [1234, *int16_orders(INT16)])
    bank.set_holding_registers(10, four_orders(struct.pack(">I", UINT32)))
    bank.set_holding_registers(20, [BITS])
    bank.set_holding_registers(124, [0xBEEF])
    bank.set_input_registers(0, four_orders(struct.pack(">f", FLOAT32)))
    bank.set_coils(0, [True, False, True, False])
    bank.set_discrete_inputs(0, [False, True, True, False])
    bank.set_coils(99, [True])
    bank.set_discrete_inputs(99, [True])
    server = ModbusServer("127.0.0.1", args.port, no_block=True, data_bank=bank)
    server.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
