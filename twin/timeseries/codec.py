"""Column codecs for the series-chunk layout (``chunks.py``): one series' timestamps and
values over one chunk of time, each encoded as one ``bytes``.

Measured before choosing (issue 19; one series, one day at 90 s +- 0-3 s jitter in ms,
960 points; bytes per point):

==========================  ==========  ================  ==============
column                      pcodec 1.1  XOR + byte        zstd (pyarrow;
                                        shuffle + zstd    what numcodecs
                                        (Gorilla-like)    and Lance offer)
==========================  ==========  ================  ==============
timestamps (us, jittered)   1.63        -                 3.51 (dod)
float64 random walk         5.95        6.23              7.34
float64 sine + noise        5.91        6.22              7.43
integer counter             0.89        -                 -
0/1 metric (5 % flips)      0.16        -                 -
==========================  ==========  ================  ==============

Full-precision float64 noise is near its entropy with any of them (a step of ~0.1 on a
value of ~20 is ~45 significant bits); pcodec (``pcodec`` on PyPI, the successor of
q_compress: delta/"float mult"/"float quant" modes chosen per chunk, then tANS over
adaptive bins) is the best on every column measured and decodes 960 values in ~5 us, so it
is the entropy coder here. ``numcodecs`` brings zstd/blosc/pcodec wrappers and nothing
better for these columns; Lance's own encodings are what the row layout uses (11 B/pt on
the realistic data). Around pcodec each value chunk picks the smallest of (adaptive, all
vectorised numpy, no per-value loop):

* ``CONST``: every value has the same bit pattern (8 bytes for the whole chunk);
* ``RLE``: run lengths + run values (booleans, set points, status codes);
* ``DECIMAL``: the values are ``int / 10**e`` exactly for one ``e`` <= 6 (what most
  sensors report, and integer counters with ``e = 0``): pcodec over the int64s, whose
  delta mode is the "delta + bit-packing" for counters;
* ``FLOAT``: pcodec over the float64 bit patterns (exact for every float64: NaN payloads,
  -0.0, subnormals, inf).

Every codec is lossless to the bit: decoding gives back the very bit patterns encoded.
"""

from __future__ import annotations

import numpy as np
from pcodec import ChunkConfig, DeltaSpec
from pcodec import standalone as pco

CONST, RLE, DECIMAL, FLOAT, EMPTY = 0, 1, 2, 3, 4
CHAIN = 6  # after GRID (5, timestamps only)
"""``CHAIN`` (timestamps or values): encoded columns one after the other, each as its
4-byte little-endian length then its bytes; decodes to their concatenation. What a
downsampling tier stores where its column is a raw chunk's column verbatim
(``partial_chunks.from_raw_chunks``: no encode at all)."""
LEVEL = 8
"""pcodec's compression level for the raw chunks (its default): the smallest output.
Downsampling tiers use ``FAST`` instead: on 1,440 float64s level 2 compresses ~8x faster
than level 8 (0.05 vs 0.43 ms) for ~1.7 % more bytes, timestamps ~13x faster for ~3 %
more (measured, issue 19); a rollup is CPU-bound on these calls."""
FAST = 2
_CFGS = {level: ChunkConfig(compression_level=level) for level in range(13)}
_MAX_EXP = 6
_POW10 = 10.0 ** np.arange(_MAX_EXP + 1)


def _pco(x: np.ndarray, level: int = LEVEL) -> bytes:
    return bytes(pco.simple_compress(np.ascontiguousarray(x), _CFGS[level]))


def _unpco(b: bytes | memoryview) -> np.ndarray:
    out = pco.simple_decompress(bytes(b))
    return np.asarray(out) if out is not None else np.zeros(0)


def chain(parts: list[bytes]) -> bytes:
    """``CHAIN`` of encoded columns (a single one is returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    return bytes([CHAIN]) + b"".join(len(p).to_bytes(4, "little") + p for p in parts)


def _links(b: bytes | memoryview) -> list[bytes | memoryview]:
    out, i = [], 1
    while i < len(b):
        k = int.from_bytes(bytes(b[i : i + 4]), "little")
        out.append(b[i + 4 : i + 4 + k])
        i += 4 + k
    return out


# --- timestamps ---------------------------------------------------------------------------


GRID = 5
_NO_DELTA = {
    level: ChunkConfig(compression_level=level, delta_spec=DeltaSpec.no_op()) for level in range(13)
}


def _uvarint(x: int) -> bytes:
    out = bytearray()
    while True:
        byte = x & 0x7F
        x >>= 7
        if x:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_uvarint(b: bytes | memoryview, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        byte = b[i]
        i += 1
        x |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return x, i


def _zigzag(x: int) -> bytes:
    return _uvarint(x * 2 if x >= 0 else -x * 2 - 1)


def _read_zigzag(b: bytes | memoryview, i: int) -> tuple[int, int]:
    x, i = _read_uvarint(b, i)
    return (x // 2 if x % 2 == 0 else -(x + 1) // 2), i


def _grid(t: np.ndarray, level: int) -> bytes | None:
    """``GRID``: the timestamps as their distance from a regular grid. A poller's clock
    ticks every ``step`` with jitter: with ``g`` the common multiple of the offsets from
    the first timestamp (1000 for milliseconds) and ``u = (t - t[0]) / g``, the grid is
    ``rint(i * u[-1] / (n - 1))`` and what is stored is ``t[0]``, ``g``, ``u[-1]`` and
    the residuals (pcodec, no delta): for uniform jitter of +-J ms that is ~log2(2J*1000)
    bits a point, where delta-of-delta coding pays for the difference of two jitters.
    Realistic shape: 1.81 -> 1.57 bytes/point (measured, issue 19). None where it does not
    apply (fewer than 8 points, all equal, offsets beyond 2**52 grid units)."""
    n = t.size
    if n < 8 or int(t.min()) < -(1 << 62) or int(t.max()) > (1 << 62):
        return None
    d = t - t[0]
    g = int(np.gcd.reduce(d))
    if g <= 0:
        return None
    u = d // g
    if int(np.abs(u).max()) >= 1 << 52:
        return None
    last = int(u[-1])
    r = u - np.rint(np.arange(n) * (last / (n - 1))).astype(np.int64)
    body = bytes(pco.simple_compress(np.ascontiguousarray(r), _NO_DELTA[level]))
    return bytes([GRID]) + _zigzag(int(t[0])) + _uvarint(g) + _zigzag(last) + body


def encode_ts(t: np.ndarray, level: int = LEVEL) -> bytes:
    """int64 microseconds (any order, duplicates allowed) -> bytes: the smaller of
    pcodec over the timestamps (it finds the delta order itself, delta-of-delta for
    regular series, and the common multiple: 1000 for milliseconds) and ``_grid``."""
    t = np.asarray(t, dtype=np.int64)
    if t.size == 0:
        return bytes([EMPTY])
    grid = _grid(t, level)
    if grid is None:
        return bytes([FLOAT]) + _pco(t, level)
    # the grid wins on ~99.5 % of polled chunks: pcodec's own coding is tried at the fast
    # level first (~2x cheaper; ~0-3 % larger than at ``level``) and redone at ``level``
    # only when it comes near the grid's size
    probe = min(level, FAST)
    plain = bytes([FLOAT]) + _pco(t, probe)
    if probe < level and len(plain) < len(grid) * 1.05:
        plain = bytes([FLOAT]) + _pco(t, level)
    return grid if len(grid) < len(plain) else plain


def decode_ts(b: bytes | memoryview) -> np.ndarray:
    if b[0] == EMPTY:
        return np.zeros(0, dtype=np.int64)
    if b[0] == CHAIN:
        return np.concatenate([decode_ts(p) for p in _links(b)])
    if b[0] == GRID:
        t0, i = _read_zigzag(b, 1)
        g, i = _read_uvarint(b, i)
        last, i = _read_zigzag(b, i)
        r = np.asarray(_unpco(b[i:]), dtype=np.int64)
        n = r.size
        u = r + np.rint(np.arange(n) * (last / (n - 1))).astype(np.int64)
        return t0 + u * g
    return np.asarray(_unpco(b[1:]), dtype=np.int64)


# --- values -------------------------------------------------------------------------------


def _decimal(v: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(e, ints) with ``ints / 10**e`` bit-identical to ``v`` for every value, or None."""
    bits = v.view(np.int64)
    if not np.isfinite(v).all() or bool(((v == 0) & (bits < 0)).any()):
        return None  # NaN/inf/-0.0 have no decimal form
    probe = v[:: max(1, v.size // 16)]
    with np.errstate(all="ignore"):
        # a few values at every exponent at once first: full-precision floats fail them
        # all (one 17 x 7 numpy pass instead of seven small ones: ~5x less time per chunk)
        p = np.rint(probe[:, None] * _POW10) / _POW10
        fits = (p.view(np.int64) == probe.view(np.int64)[:, None]).all(axis=0)
        for e in np.flatnonzero(fits).tolist():
            d = np.rint(v * _POW10[e])
            if not (np.abs(d) < 2.0**53).all():
                return None
            back = d / _POW10[e]
            if np.array_equal(back.view(np.int64), bits):
                return e, d.astype(np.int64)
    return None


def encode_values(v: np.ndarray, level: int = LEVEL) -> bytes:
    """float64 values -> bytes, the smallest of the codecs in the module docstring."""
    v = np.ascontiguousarray(v, dtype=np.float64)
    n = v.size
    if n == 0:
        return bytes([EMPTY])
    bits = v.view(np.uint64)
    if bool((bits == bits[0]).all()):
        return bytes([CONST]) + n.to_bytes(4, "little") + bits[:1].tobytes()
    candidates: list[bytes] = []
    change = np.flatnonzero(bits[1:] != bits[:-1]) + 1
    if change.size + 1 <= n // 4:  # few runs: booleans, set points, states
        starts = np.r_[0, change]
        lengths = np.diff(np.r_[starts, n]).astype(np.int64)
        lb = _pco(lengths, level)
        candidates.append(
            bytes([RLE]) + len(lb).to_bytes(4, "little") + lb + _pco(v[starts], level)
        )
    dec = _decimal(v)
    if dec is not None:
        candidates.append(bytes([DECIMAL, dec[0]]) + _pco(dec[1], level))
    if dec is None:
        # (where the decimal form exists, pcodec over the floats was smaller in 36 of 451
        # realistic chunks by 67 bytes in all, 0.0002 B/pt: not worth a second encode)
        candidates.append(bytes([FLOAT]) + _pco(v, level))
    return min(candidates, key=len)


def decode_values(b: bytes | memoryview) -> np.ndarray:
    codec = b[0]
    if codec == EMPTY:
        return np.zeros(0, dtype=np.float64)
    if codec == CONST:
        n = int.from_bytes(bytes(b[1:5]), "little")
        return np.repeat(np.frombuffer(bytes(b[5:13]), dtype=np.float64), n)
    if codec == RLE:
        k = int.from_bytes(bytes(b[1:5]), "little")
        lengths = np.asarray(_unpco(b[5 : 5 + k]), dtype=np.int64)
        values = np.asarray(_unpco(b[5 + k :]), dtype=np.float64)
        return np.repeat(values, lengths)
    if codec == DECIMAL:
        e = b[1]
        return np.asarray(_unpco(b[2:]), dtype=np.int64).astype(np.float64) / _POW10[e]
    if codec == FLOAT:
        return np.asarray(_unpco(b[1:]), dtype=np.float64)
    if codec == CHAIN:
        return np.concatenate([decode_values(p) for p in _links(b)])
    raise ValueError(f"unknown value codec {codec}")


def codec_of(b: bytes | memoryview) -> int:
    return int(b[0])


# --- small per-point codes (kind, quality) --------------------------------------------------


def encode_codes(c: np.ndarray) -> bytes:
    """Small non-negative integers (kind * 4 + quality per point): run-length in practice."""
    return encode_values(np.asarray(c, dtype=np.float64))


def decode_codes(b: bytes | memoryview) -> np.ndarray:
    return decode_values(b).astype(np.uint8)


# --- strings -----------------------------------------------------------------------------


def encode_strings(s: list[str | None]) -> bytes:
    """A list of strings (None for a numeric point) -> bytes: lengths (-1 = None) by
    pcodec, then the UTF-8 bytes zstd-compressed."""
    import pyarrow as pa

    enc = [x.encode() if x is not None else b"" for x in s]
    lengths = np.array([len(x) if y is not None else -1 for x, y in zip(enc, s, strict=True)])
    body = pa.compress(b"".join(enc), "zstd", asbytes=True) if enc else b""
    lb = _pco(lengths.astype(np.int64)) if lengths.size else b""
    return len(lb).to_bytes(4, "little") + lb + body


def decode_strings(b: bytes | memoryview, n: int) -> list[str | None]:
    import pyarrow as pa

    k = int.from_bytes(bytes(b[:4]), "little")
    if n == 0:
        return []
    lengths = np.asarray(_unpco(b[4 : 4 + k]), dtype=np.int64)
    raw_len = int(np.maximum(lengths, 0).sum())
    body = bytes(b[4 + k :])
    data = pa.decompress(body, raw_len, "zstd", asbytes=True) if raw_len else b""
    ends = np.cumsum(np.maximum(lengths, 0))
    starts = ends - np.maximum(lengths, 0)
    return [
        None if ln < 0 else data[a:e].decode()
        for a, e, ln in zip(starts.tolist(), ends.tolist(), lengths.tolist(), strict=True)
    ]
