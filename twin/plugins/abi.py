"""The plugin ABI ("flux-abi-1"): how batches cross into a Wasm module's linear memory.

Every call carries a *batch* (up to ``limits.batch`` items, default 1000): one host→guest call
per batch, so the ~10-30 µs fixed cost of a call is paid once per thousand payloads, not per
payload. All integers little-endian.

Exports of a module::

    memory                              its linear memory
    alloc(len: i32) -> i32              room for the input (the host writes it there)
    configure(ptr: i32, len: i32)       optional: the plugin's config as JSON, once after start
    <entry>(ptr: i32, len: i32) -> i64  decode / encode / transform / condition / action;
                                        returns (out_ptr << 32) | out_len

The host calls ``alloc`` before every call, writes the input there, calls the entry point and
copies the output out before the next call, so a module may keep a bump allocator and reset
it at the start of each entry point.

Input of ``decode``, and input/output of ``encode``, ``condition``, ``action``: *records*::

    u32 count, then count x (u32 len, len bytes)

``decode`` records are raw payloads; ``encode`` input records are JSON commands
(``{"name": ..., "params": {...}}``) and its output records the frames to send; ``condition``
and ``action`` input records are JSON ``{"trigger": ..., "state": ..., "config": ...}``, their
output records JSON (``true``/``false``; a list of actions).

Output of ``decode`` and input/output of ``transform``: *readings*::

    u32 count, then count x
        u32 index        which input record (decode) / reading (transform) it comes from
        u8  type         0 f64 | 1 i64 | 2 bool | 3 string | 4 bad (no value) | 5 JSON text
        u8  point_len    then point_len bytes of UTF-8 point name
        f64 ts           unix seconds; 0 = the time of receipt (decode) / unchanged (transform)
        value            f64: 8 bytes | i64: 8 | bool: 1 | string, JSON: u32 len + UTF-8

A decoder that cannot make sense of payload *i* emits one reading of type 4 with index *i*: the
reading is stored with quality ``bad``. Why a fixed binary layout for readings rather than JSON
or MessagePack: a module in any language writes it with a few stores (no float formatting in
the guest), and the host parses 1,000 readings in ~0.4 ms (``benchmarks/plugins/``).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

T_F64, T_I64, T_BOOL, T_STR, T_BAD, T_JSON = 0, 1, 2, 3, 4, 5

Decoded = tuple[int, str, Any, float, bool]
"""``(index, point, value, ts, good)``: ts 0.0 = receipt time; good False = a bad reading."""

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<IBB")
_F64 = struct.Struct("<d")
_Q = struct.Struct("<q")
_TS_F64 = struct.Struct("<dd")
_TS_I64 = struct.Struct("<dq")
_TS_BOOL = struct.Struct("<dB")
_TS_LEN = struct.Struct("<dI")


class AbiError(ValueError):
    """The module's output does not follow the ABI."""


def pack_records(records: Sequence[bytes]) -> bytes:
    parts = [_U32.pack(len(records))]
    pack = _U32.pack
    for r in records:
        parts.append(pack(len(r)))
        parts.append(r)
    return b"".join(parts)


def unpack_records(buf: bytes | bytearray | memoryview) -> list[bytes]:
    mv = memoryview(buf)
    if len(mv) < 4:
        raise AbiError("output shorter than its count")
    (count,) = _U32.unpack_from(mv, 0)
    off, out = 4, []
    n = len(mv)
    for _ in range(count):
        if off + 4 > n:
            raise AbiError("output ends inside a record header")
        (length,) = _U32.unpack_from(mv, off)
        off += 4
        if off + length > n:
            raise AbiError("output ends inside a record")
        out.append(bytes(mv[off:off + length]))
        off += length
    return out


def pack_readings(readings: Iterable[tuple[str, Any, float]]) -> bytes:
    """``(point, value, ts)`` -> the readings layout (index = position)."""
    parts: list[bytes] = []
    n = 0
    for i, (point, value, ts) in enumerate(readings):
        p = point.encode("utf-8")[:255]
        if value is None:
            parts.append(_HEAD.pack(i, T_BAD, len(p)) + p + _F64.pack(ts))
        elif isinstance(value, bool):
            parts.append(_HEAD.pack(i, T_BOOL, len(p)) + p + _TS_BOOL.pack(ts, value))
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            parts.append(_HEAD.pack(i, T_I64, len(p)) + p + _TS_I64.pack(ts, value))
        elif isinstance(value, float):
            parts.append(_HEAD.pack(i, T_F64, len(p)) + p + _TS_F64.pack(ts, value))
        elif isinstance(value, str):
            b = value.encode("utf-8")
            parts.append(_HEAD.pack(i, T_STR, len(p)) + p + _TS_LEN.pack(ts, len(b)) + b)
        else:
            b = json.dumps(value, separators=(",", ":")).encode()
            parts.append(_HEAD.pack(i, T_JSON, len(p)) + p + _TS_LEN.pack(ts, len(b)) + b)
        n = i + 1
    return _U32.pack(n) + b"".join(parts)


def unpack_readings(buf: bytes | bytearray, inputs: int) -> list[Decoded]:
    """Parse the readings layout; every index must be < ``inputs``. Raises AbiError."""
    n = len(buf)
    if n < 4:
        raise AbiError("output shorter than its count")
    (count,) = _U32.unpack_from(buf, 0)
    if count > (n - 4) // 15:  # the smallest reading is 15 bytes
        raise AbiError(f"output claims {count} readings in {n} bytes")
    out: list[Decoded] = []
    append = out.append
    head, f64v, i64v, boolv, lenv = (_HEAD.unpack_from, _TS_F64.unpack_from,
                                     _TS_I64.unpack_from, _TS_BOOL.unpack_from,
                                     _TS_LEN.unpack_from)
    names: dict[bytes, str] = {}
    off = 4
    try:
        for _ in range(count):
            index, typ, plen = head(buf, off)
            off += 6
            pb = bytes(buf[off:off + plen])
            point = names.get(pb)
            if point is None:
                point = names[pb] = pb.decode("utf-8")
            off += plen
            if typ == T_F64:
                ts, value = f64v(buf, off)
                off += 16
                append((index, point, value, ts, True))
            elif typ == T_I64:
                ts, value = i64v(buf, off)
                off += 16
                append((index, point, value, ts, True))
            elif typ == T_BOOL:
                ts, b = boolv(buf, off)
                off += 9
                append((index, point, bool(b), ts, True))
            elif typ == T_BAD:
                (ts,) = _F64.unpack_from(buf, off)
                off += 8
                append((index, point, None, ts, False))
            elif typ in (T_STR, T_JSON):
                ts, length = lenv(buf, off)
                off += 12
                if off + length > n:
                    raise AbiError("output ends inside a value")
                text = bytes(buf[off:off + length]).decode("utf-8")
                off += length
                append((index, point, text if typ == T_STR else json.loads(text), ts, True))
            else:
                raise AbiError(f"unknown value type {typ}")
            if index >= inputs:
                raise AbiError(f"reading for input {index}, but the batch has {inputs}")
            if off > n:
                raise AbiError("output ends inside a reading")
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AbiError(f"malformed readings: {exc}") from None
    for r in out:
        ts = r[3]
        if not (math.isfinite(ts) and ts >= 0):
            raise AbiError(f"reading {r[1]!r} has timestamp {ts!r}")
    return out
