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
reading is stored with quality ``bad``.

Output of ``decode`` / ``transform`` may instead use the *dense* layout, for numbers only
(what most sensor frames hold), parsed with one numpy call per batch::

    u32 0xFFFFFFFF   marker
    u32 count
    u16 names, then names x (u8 len, len bytes of UTF-8): the point table
    count x (u32 index, u16 point (into the table), f64 ts, f64 value)   22 bytes each
                     a NaN value = a bad reading Why a fixed binary layout for readings rather than JSON
or MessagePack: a module in any language writes it with a few stores (no float formatting in
the guest), and the host parses 1,000 readings in ~0.4 ms (``benchmarks/plugins/``).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

T_F64, T_I64, T_BOOL, T_STR, T_BAD, T_JSON = 0, 1, 2, 3, 4, 5

Decoded = tuple[int, str, Any, float, bool]
"""``(index, point, value, ts, good)``: ts 0.0 = receipt time; good False = a bad reading."""

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<IBB")
_F64 = struct.Struct("<d")
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


DENSE = 0xFFFFFFFF
_DENSE_STRUCT = struct.Struct("<IHdd")
_DENSE_ROW = None


def _dense_dtype() -> Any:
    global _DENSE_ROW
    if _DENSE_ROW is None:
        import numpy as np

        _DENSE_ROW = np.dtype([("i", "<u4"), ("p", "<u2"), ("ts", "<f8"), ("v", "<f8")])
    return _DENSE_ROW


def unpack_dense(buf: bytes, inputs: int) -> list[Decoded]:
    """The dense layout (numbers only): one numpy parse per batch."""
    import numpy as np

    n = len(buf)
    if n < 10:
        raise AbiError("dense output shorter than its header")
    count, nnames = struct.unpack_from("<IH", buf, 4)
    off = 10
    names: list[str] = []
    try:
        for _ in range(nnames):
            ln = buf[off]
            names.append(buf[off + 1:off + 1 + ln].decode("utf-8"))
            off += 1 + ln
    except (IndexError, UnicodeDecodeError) as exc:
        raise AbiError(f"malformed point table: {exc}") from None
    if off + 22 * count > n:
        raise AbiError(f"dense output claims {count} readings in {n} bytes")
    if count < 64:  # a few rows (one MQTT frame): struct beats numpy's per-call overhead
        out: list[Decoded] = []
        for index, p, ts, value in _DENSE_STRUCT.iter_unpack(buf[off:off + 22 * count]):
            if index >= inputs or p >= nnames:
                raise AbiError(f"row ({index}, {p}) outside the batch ({inputs}) or table ({nnames})")
            if not (0.0 <= ts < math.inf):
                raise AbiError(f"a reading has timestamp {ts!r}")
            ok = math.isfinite(value)
            out.append((index, names[p], value if ok else None, ts, ok))
        return out
    rows = np.frombuffer(buf, dtype=_dense_dtype(), count=count, offset=off)
    idx, pid, ts, val = rows["i"], rows["p"], rows["ts"], rows["v"]
    if count:
        if int(idx.max()) >= inputs:
            raise AbiError(f"reading for input {int(idx.max())}, but the batch has {inputs}")
        if int(pid.max()) >= nnames:
            raise AbiError(f"point {int(pid.max())} is not in the point table ({nnames})")
        if not (np.isfinite(ts).all() and (ts >= 0).all()):
            raise AbiError("a reading has a timestamp that is not unix seconds")
    bad = np.isnan(val)
    if bad.any() or not np.isfinite(val).all():
        vals: list[Any] = [None if b or not math.isfinite(v) else v
                           for v, b in zip(val.tolist(), bad.tolist(), strict=True)]
        good = [v is not None for v in vals]
    else:
        vals = val.tolist()
        good = [True] * count
    points = [names[p] for p in pid.tolist()]
    return list(zip(idx.tolist(), points, vals, ts.tolist(), good, strict=True))


def unpack_readings(buf: bytes | bytearray, inputs: int) -> list[Decoded]:
    """Parse the readings layout (or the dense one); every index must be < ``inputs``.
    Raises AbiError."""
    buf = bytes(buf)
    n = len(buf)
    if n < 4:
        raise AbiError("output shorter than its count")
    (count,) = _U32.unpack_from(buf, 0)
    if count == DENSE:
        return unpack_dense(buf, inputs)
    if count > (n - 4) // 15:  # the smallest reading is 15 bytes
        raise AbiError(f"output claims {count} readings in {n} bytes")
    out: list[Decoded] = []
    append = out.append
    names: dict[bytes, str] = {}
    inf = math.inf
    off = 4
    try:
        for _ in range(count):
            typ = buf[off + 4]
            plen = buf[off + 5]
            # one struct call per reading: index, type, name length, name, ts, value
            if typ == T_F64:
                index, _, _, pb, ts, value = _f64_struct(plen).unpack_from(buf, off)
                off += 22 + plen
            elif typ == T_I64:
                index, _, _, pb, ts, value = _i64_struct(plen).unpack_from(buf, off)
                off += 22 + plen
            elif typ == T_BOOL:
                index, _, _, pb, ts, b = _bool_struct(plen).unpack_from(buf, off)
                value = bool(b)
                off += 15 + plen
            elif typ == T_BAD:
                index, _, _, pb, ts = _bad_struct(plen).unpack_from(buf, off)
                value = None
                off += 14 + plen
            elif typ in (T_STR, T_JSON):
                index, _, _, pb, ts, length = _len_struct(plen).unpack_from(buf, off)
                off += 18 + plen
                if off + length > n:
                    raise AbiError("output ends inside a value")
                text = buf[off:off + length].decode("utf-8")
                off += length
                value = text if typ == T_STR else json.loads(text)
            else:
                raise AbiError(f"unknown value type {typ}")
            point = names.get(pb)
            if point is None:
                point = names[pb] = pb.decode("utf-8")
            if index >= inputs:
                raise AbiError(f"reading for input {index}, but the batch has {inputs}")
            if not (0.0 <= ts < inf):
                raise AbiError(f"reading {point!r} has timestamp {ts!r}")
            append((index, point, value, ts, typ != T_BAD))
    except (struct.error, IndexError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AbiError(f"malformed readings: {exc}") from None
    if off > n:
        raise AbiError("output ends inside a reading")
    return out


@lru_cache(maxsize=256)
def _f64_struct(plen: int) -> struct.Struct:
    return struct.Struct(f"<IBB{plen}sdd")


@lru_cache(maxsize=256)
def _i64_struct(plen: int) -> struct.Struct:
    return struct.Struct(f"<IBB{plen}sdq")


@lru_cache(maxsize=256)
def _bool_struct(plen: int) -> struct.Struct:
    return struct.Struct(f"<IBB{plen}sdB")


@lru_cache(maxsize=256)
def _bad_struct(plen: int) -> struct.Struct:
    return struct.Struct(f"<IBB{plen}sd")


@lru_cache(maxsize=256)
def _len_struct(plen: int) -> struct.Struct:
    return struct.Struct(f"<IBB{plen}sdI")
