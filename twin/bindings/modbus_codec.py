"""Modbus values ↔ registers (all four byte orders, scale/offset, bit fields, strings), and
the read plan: adjacent points coalesced into as few requests as possible.

Pure functions (no I/O); the binding (twin/bindings/modbus.py) and the simulator
(twin/sim/modbus.py) share them, so what the simulator writes is what the binding reads.

Byte orders name the bytes of a value from most to least significant (A B C D for 32 bits)
as they appear in the registers on the wire: ``ABCD`` big-endian (Modbus default), ``CDAB``
word-swapped (most PLCs' "little-endian" floats), ``BADC`` byte-swapped, ``DCBA`` fully
little-endian. 64-bit values extend the same rule (word order reversed / bytes swapped).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twin.spec.modbus import BIT_FC, MAX_BITS, MAX_REGISTERS, Point

FORMATS = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
    "int64": "q", "uint64": "Q", "float64": "d",
}
INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1),
}


class EncodeError(ValueError):
    """A value that does not fit the point (type, range)."""


def _word_swap(order: str) -> bool:
    return order in ("CDAB", "DCBA")


def _byte_swap(order: str) -> bool:
    return order in ("BADC", "DCBA")


def regs_to_bytes(regs: Sequence[int], order: str, *, words: bool = True) -> bytes:
    """The value's bytes, most significant first, from its registers as on the wire."""
    seq = list(regs)
    if words and _word_swap(order):
        seq.reverse()
    raw = b"".join((r & 0xFFFF).to_bytes(2, "big") for r in seq)
    if _byte_swap(order):
        raw = bytes(b for i in range(0, len(raw), 2) for b in (raw[i + 1], raw[i]))
    return raw


def bytes_to_regs(raw: bytes, order: str, *, words: bool = True) -> list[int]:
    if len(raw) % 2:
        raw += b"\x00"
    if _byte_swap(order):
        raw = bytes(b for i in range(0, len(raw), 2) for b in (raw[i + 1], raw[i]))
    regs = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if words and _word_swap(order):
        regs.reverse()
    return regs


def decode(point: Point, regs: Sequence[int]) -> Any:
    """The engineering value of ``point`` from its registers (or ``[bit]`` for coils and
    discrete inputs). Raises ValueError on a wrong register count."""
    if point.type == "bool":
        if point.bit is not None:
            return bool((regs[0] >> point.bit) & 1)
        return bool(regs[0])
    if len(regs) != point.count:
        raise ValueError(f"{point.name}: {len(regs)} registers for a {point.count}-register {point.type}")
    if point.type == "string":
        text = regs_to_bytes(regs, point.order, words=False).rstrip(b"\x00")
        return text.decode(point.encoding, errors="replace")
    raw = struct.unpack(">" + FORMATS[point.type], regs_to_bytes(regs, point.order))[0]
    if point.scale == 1.0 and point.offset == 0.0:
        return raw
    return raw * point.scale + point.offset


def encode(point: Point, value: Any) -> list[int]:
    """Registers (or ``[0|1]`` for a coil) that make ``point`` read ``value``. A bit field
    returns the bit only (the caller merges it into the register). Raises EncodeError."""
    if point.type == "bool":
        if not isinstance(value, bool | int) or (isinstance(value, int) and value not in (0, 1)):
            raise EncodeError(f"{point.name}: {value!r} is not a boolean")
        return [1 if value else 0]
    if point.type == "string":
        if not isinstance(value, str):
            raise EncodeError(f"{point.name}: {value!r} is not a string")
        raw = value.encode(point.encoding, errors="strict")
        if len(raw) > point.count * 2:
            raise EncodeError(f"{point.name}: {len(raw)} bytes do not fit {point.count} registers")
        return bytes_to_regs(raw.ljust(point.count * 2, b"\x00"), point.order, words=False)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodeError(f"{point.name}: {value!r} is not a number")
    exact = isinstance(value, int) and point.scale == 1.0 and point.offset == 0.0
    raw_value: float = value if exact else (value - point.offset) / point.scale
    if not math.isfinite(raw_value):
        raise EncodeError(f"{point.name}: {value!r} is not finite")
    fmt = FORMATS[point.type]
    if point.type in INT_RANGES:
        lo, hi = INT_RANGES[point.type]
        as_int = value if exact else round(raw_value)
        if not lo <= as_int <= hi:
            raise EncodeError(f"{point.name}: {value!r} is out of range for {point.type}")
        packed = struct.pack(">" + fmt, as_int)
    else:
        try:
            packed = struct.pack(">" + fmt, raw_value)
        except (OverflowError, struct.error) as exc:
            raise EncodeError(f"{point.name}: {value!r} does not fit {point.type}") from exc
    return bytes_to_regs(packed, point.order)


@dataclass
class Block:
    """One read request: ``count`` registers (bits) from ``start`` with function code ``fc``,
    feeding ``points``."""

    fc: int
    start: int
    count: int
    points: list[Point] = field(default_factory=list)

    def slice(self, point: Point, values: Sequence[int]) -> list[int]:
        i = point.address - self.start
        return list(values[i : i + point.count])


def plan(points: Iterable[Point], *, max_gap: int = 8, max_count: int = MAX_REGISTERS) -> list[Block]:
    """Coalesce points into requests: one per function code run of addresses, spanning gaps of
    at most ``max_gap`` unused registers and at most ``max_count`` registers (bits: 2000)."""
    by_fc: dict[int, list[Point]] = {}
    for p in points:
        by_fc.setdefault(p.fc, []).append(p)
    blocks: list[Block] = []
    for fc in sorted(by_fc):
        limit = MAX_BITS if fc in BIT_FC else max_count
        gap = max_gap * 16 if fc in BIT_FC else max_gap
        cur: Block | None = None
        for p in sorted(by_fc[fc], key=lambda q: (q.address, q.count)):
            if cur is not None:
                end = cur.start + cur.count
                new_end = max(end, p.end)
                if p.address - end <= gap and new_end - cur.start <= limit:
                    cur.count = new_end - cur.start
                    cur.points.append(p)
                    continue
            cur = Block(fc, p.address, p.count, [p])
            blocks.append(cur)
    return blocks
