"""The chunk layout of downsampling tiers (LanceDB): one row per (series, rollup window)
holding that series' aggregate partials (PARTIAL_SCHEMA rows: one per bucket) encoded as
columns, instead of one table row per (series, bucket).

Why (issue 19): a one-day rollup of 10.8 M realistic points to 1 minute is ~9.6 M partial
rows (90 s data in 60 s buckets: most buckets hold one point); writing them as table rows
took 13 of the rollup's 16.6 s. As chunks they are ~10 k rows of blobs.

A row (``PCHUNK_SCHEMA``) holds, for one series, the partials of one ``replace`` window,
sorted by bucket:

* ``t_blob``: the bucket starts — ``b"\\0"`` when every one is ``first_ts`` floored to the
  tier's resolution (always, for partials with a point), else ``b"\\1"`` + ``encode_ts``;
* ``n_blob``: ``count`` per bucket (``encode_values``: a constant 1 costs 13 bytes);
* ``ft_blob`` / ``f_blob``: ``first_ts`` and ``first`` (``codec.encode_ts`` /
  ``encode_values``, bit-exact); from raw chunks, where every bucket holds one point, the
  raw chunks' own ``t_blob``/``v_blob`` chained (``codec.CHAIN``: no re-encode, issue 19);
* ``x_blob``: the buckets where ``last_ts``, ``last``, ``sum``, ``min`` or ``max`` differ
  from ``first_ts`` / ``first`` (bitwise), with those five columns there; null when none
  does (a bucket with one point: sum = min = max = first = last);
* ``m_blob``: which of the seven nullable columns are set, per bucket (run-length), null
  when all are;
* ``s_blob``: ``first_str`` then ``last_str``, null when every one is null.

Beside them ``t_min``/``t_max`` (first and last bucket start), ``n`` (partials), ``count``
(points summarised) and ``cid``; the series columns as in ``chunks.py``. Decoding gives
back the very partial rows encoded (bit-exact floats, nulls where they were).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from twin.timeseries import codec
from twin.timeseries.base import PARTIAL_SCHEMA, SERIES_COLUMNS, TS_TYPE
from twin.timeseries.chunks import WINDOW_FIELDS, _i64, _strings, nan_stats, series_ids

PCHUNK_SCHEMA = pa.schema(
    [
        *WINDOW_FIELDS,
        pa.field("count", pa.int64(), nullable=False),
        pa.field("res", pa.int64(), nullable=False),  # the tier's resolution, us
        pa.field("cid", pa.int64(), nullable=False),
        pa.field("t_blob", pa.binary(), nullable=False),
        pa.field("n_blob", pa.binary(), nullable=False),
        pa.field("ft_blob", pa.binary(), nullable=False),
        pa.field("f_blob", pa.binary(), nullable=False),
        pa.field("x_blob", pa.binary()),
        pa.field("m_blob", pa.binary()),
        pa.field("s_blob", pa.binary()),
    ]
)
PMETA_COLUMNS = [n for n in PCHUNK_SCHEMA.names if not n.endswith("_blob")]
PBLOB_COLUMNS = [n for n in PCHUNK_SCHEMA.names if n.endswith("_blob")]

_FLOATS = ("sum", "min", "max", "first", "last")
_NULLABLE = (*_FLOATS, "first_ts", "last_ts")  # bit j of the m_blob code: column j is set
_ALL_SET = (1 << len(_NULLABLE)) - 1
_EXTRA = ("last", "sum", "min", "max")  # x_blob's float columns, after idx and last_ts
_L = codec.FAST  # a rollup is bound by these encodes (see ``codec.FAST``)


def _pack(parts: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(4, "little") + p for p in parts)


def _unpack(b: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(b):
        k = int.from_bytes(b[i : i + 4], "little")
        out.append(b[i + 4 : i + 4 + k])
        i += 4 + k
    return out


def _valid(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _f64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """float64 values with nulls as 0.0 (their bits then compare equal everywhere)."""
    if col.null_count:
        col = col.fill_null(0.0)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _assemble(
    window_start: float,
    t_min: np.ndarray,
    t_max: np.ndarray,
    n: np.ndarray,
    count: np.ndarray,
    res_us: int,
    first_cid: int,
    blobs: Mapping[str, Sequence[bytes | None]],
    series: pa.Table,
    take: pa.Array,
) -> pa.Table:
    """PCHUNK_SCHEMA rows from their columns; blob columns not in ``blobs`` are null; the
    series columns are ``series``' rows ``take``."""
    r = len(t_min)
    cols: dict[str, pa.Array] = {
        "ts": pa.array(np.full(r, round(window_start * 1_000_000), dtype=np.int64), TS_TYPE),
        "t_min": pa.array(np.asarray(t_min, dtype=np.int64), TS_TYPE),
        "t_max": pa.array(np.asarray(t_max, dtype=np.int64), TS_TYPE),
        "n": pa.array(np.asarray(n, dtype=np.int64), pa.int64()),
        "count": pa.array(np.asarray(count, dtype=np.int64), pa.int64()),
        "res": pa.array(np.full(r, res_us, dtype=np.int64), pa.int64()),
        "cid": pa.array(np.arange(first_cid, first_cid + r), pa.int64()),
    }
    for name in PBLOB_COLUMNS:
        cols[name] = (
            pa.array(blobs[name], pa.binary()) if name in blobs else pa.nulls(r, pa.binary())
        )
    for name in SERIES_COLUMNS:
        cols[name] = _strings(series.column(name).take(take))
    return pa.Table.from_arrays([cols[c] for c in PCHUNK_SCHEMA.names], schema=PCHUNK_SCHEMA)


def build_partial_chunks(
    table: pa.Table, window_start: float, res: float, first_cid: int
) -> pa.Table:
    """PARTIAL_SCHEMA rows (series columns may be dictionary-encoded; any order; one row
    per (series, bucket)) -> PCHUNK_SCHEMA rows, one per series, ``cid`` from
    ``first_cid``."""
    from twin.timeseries.partials import _series_key

    n = table.num_rows
    if n == 0:
        return PCHUNK_SCHEMA.empty_table()
    res_us = max(1, round(res * 1_000_000))
    key, _parts = _series_key(table)
    ts = _i64(table.column("ts"))
    if n > 1 and not bool(
        np.all((key[1:] > key[:-1]) | ((key[1:] == key[:-1]) & (ts[1:] > ts[:-1])))
    ):
        order = np.lexsort((ts, key))
        table = table.take(pa.array(order))
        key, ts = key[order], ts[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], n]

    count = _i64(table.column("count"))
    valid = {c: _valid(table.column(c)) for c in _NULLABLE}
    fl = {c: _f64(table.column(c)) for c in _FLOATS}
    ft = _i64(table.column("first_ts"))
    lt = _i64(table.column("last_ts"))
    mcode = np.zeros(n, dtype=np.int64)
    for j, c in enumerate(_NULLABLE):
        mcode |= valid[c].astype(np.int64) << j
    first_bits = fl["first"].view(np.int64)
    extra = lt != ft
    for c in _EXTRA:
        extra |= fl[c].view(np.int64) != first_bits
    derived = valid["first_ts"] & ((ft // res_us) * res_us == ts)
    str_cols = [table.column("first_str"), table.column("last_str")]
    has_str = any(c.null_count < len(c) for c in str_cols)
    strs = [_strings(c) for c in str_cols] if has_str else []

    # per-chunk reductions, vectorised
    all_derived = np.logical_and.reduceat(derived, starts)
    any_extra = np.logical_or.reduceat(extra, starts)
    all_set = np.logical_and.reduceat(mcode == _ALL_SET, starts)
    counts_const = np.logical_and.reduceat(np.r_[True, count[1:] == count[:-1]], starts)

    t_b: list[bytes] = []
    n_b: list[bytes] = []
    ft_b: list[bytes] = []
    f_b: list[bytes] = []
    x_b: list[bytes | None] = []
    m_b: list[bytes | None] = []
    s_b: list[bytes | None] = []
    for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        t_b.append(b"\0" if all_derived[i] else b"\1" + codec.encode_ts(ts[a:b], _L))
        if counts_const[i]:  # the common case (one point per bucket): no value scan
            c0 = np.float64(count[a]).tobytes()
            n_b.append(bytes([codec.CONST]) + (b - a).to_bytes(4, "little") + c0)
        else:
            n_b.append(codec.encode_values(count[a:b].astype(np.float64), _L))
        ft_b.append(codec.encode_ts(ft[a:b], _L))
        f_b.append(codec.encode_values(fl["first"][a:b], _L))
        if any_extra[i]:
            idx = np.flatnonzero(extra[a:b])
            parts = [codec.encode_ts(idx, _L), codec.encode_ts(lt[a:b][idx], _L)]
            parts += [codec.encode_values(fl[c][a:b][idx], _L) for c in _EXTRA]
            x_b.append(_pack(parts))
        else:
            x_b.append(None)
        m_b.append(None if all_set[i] else codec.encode_codes(mcode[a:b]))
        if has_str and any(s.slice(a, b - a).null_count < b - a for s in strs):
            s_b.append(
                codec.encode_strings(
                    strs[0].slice(a, b - a).to_pylist() + strs[1].slice(a, b - a).to_pylist()
                )
            )
        else:
            s_b.append(None)

    blobs: dict[str, Sequence[bytes | None]] = dict(
        t_blob=t_b, n_blob=n_b, ft_blob=ft_b, f_blob=f_b, x_blob=x_b, m_blob=m_b, s_blob=s_b
    )
    return _assemble(
        window_start,
        ts[starts],
        ts[ends - 1],
        ends - starts,
        np.add.reduceat(count, starts),
        res_us,
        first_cid,
        blobs,
        table,
        pa.array(starts),
    )


def decode_partial_chunks(
    rows: pa.Table, start: float | None = None, end: float | None = None
) -> pa.Table:
    """PCHUNK_SCHEMA rows (with blobs) -> PARTIAL_SCHEMA rows whose bucket starts lie in
    ``[start, end)`` (all when not given), chunk by chunk."""
    m = rows.num_rows
    if m == 0:
        return PARTIAL_SCHEMA.empty_table()
    lo = None if start is None else round(start * 1_000_000)
    hi = None if end is None else round(end * 1_000_000)
    res = rows.column("res").to_pylist()
    names = ("ts", "count", "first_ts", "last_ts", "mcode", *_FLOATS)
    acc: dict[str, list[np.ndarray]] = {k: [] for k in names}
    str_parts: list[tuple[pa.Array, pa.Array]] = []
    any_str = rows.column("s_blob").null_count < m
    counts = np.empty(m, dtype=np.int64)
    for i, (tb, nb, ftb, fb, xb, mb, sb) in enumerate(
        zip(*(rows.column(c).to_pylist() for c in PBLOB_COLUMNS), strict=True)
    ):
        ft = codec.decode_ts(ftb)
        k = len(ft)
        ts = (ft // res[i]) * res[i] if tb[0] == 0 else codec.decode_ts(tb[1:])
        first = codec.decode_values(fb)
        cnt = codec.decode_values(nb).astype(np.int64)
        lt = ft.copy()
        fl = {c: first.copy() for c in _EXTRA}
        if xb is not None:
            p = _unpack(xb)
            idx = codec.decode_ts(p[0])
            lt[idx] = codec.decode_ts(p[1])
            for j, c in enumerate(_EXTRA):
                fl[c][idx] = codec.decode_values(p[2 + j])
        mcode = codec.decode_codes(mb).astype(np.int64) if mb is not None else None
        if mcode is None:
            mcode = np.full(k, _ALL_SET, dtype=np.int64)
        keep = None
        if lo is not None or hi is not None:
            sel = np.ones(k, dtype=bool)
            if lo is not None:
                sel &= ts >= lo
            if hi is not None:
                sel &= ts < hi
            if not sel.all():
                keep = sel
        if any_str:
            if sb is not None:
                s = pa.array(codec.decode_strings(sb, 2 * k), pa.string())
                fs, ls = s.slice(0, k), s.slice(k, k)
            else:
                fs = ls = pa.nulls(k, pa.string())
            if keep is not None:
                fs, ls = fs.filter(pa.array(keep)), ls.filter(pa.array(keep))
            str_parts.append((fs, ls))
        vals = {"ts": ts, "count": cnt, "first_ts": ft, "last_ts": lt, "mcode": mcode}
        vals["first"] = first
        vals.update(fl)
        for name in names:
            v = vals[name]
            acc[name].append(v if keep is None else v[keep])
        counts[i] = k if keep is None else int(keep.sum())
    col = {k: np.concatenate(v) for k, v in acc.items()}
    total = len(col["ts"])
    mcode = col["mcode"]
    cols: dict[str, pa.Array | pa.ChunkedArray] = {
        "ts": pa.array(col["ts"], TS_TYPE),
        "count": pa.array(col["count"], pa.int64()),
    }
    for j, name in enumerate(_NULLABLE):
        unset = (mcode >> j) & 1 == 0
        mask = unset if unset.any() else None
        if name in _FLOATS:
            cols[name] = pa.array(col[name], pa.float64(), mask=mask)
        else:
            cols[name] = pa.array(col[name], TS_TYPE, mask=mask)
    if any_str:
        cols["first_str"] = pa.concat_arrays([p[0] for p in str_parts])
        cols["last_str"] = pa.concat_arrays([p[1] for p in str_parts])
    else:
        cols["first_str"] = cols["last_str"] = pa.nulls(total, pa.string())
    rep = pa.array(np.repeat(np.arange(m), counts))
    for name in SERIES_COLUMNS:
        cols[name] = _strings(rows.column(name)).take(rep)
    return pa.Table.from_arrays([cols[n] for n in PARTIAL_SCHEMA.names], schema=PARTIAL_SCHEMA)


def within(rows: pa.Table, start: float, end: float) -> np.ndarray:
    """Per chunk row: True when every bucket start lies in ``[start, end)``."""
    lo = _i64(rows.column("t_min"))
    hi = _i64(rows.column("t_max"))
    return (lo >= round(start * 1_000_000)) & (hi < round(end * 1_000_000))


def from_raw_chunks(
    rows: pa.Table, start: float, end: float, res: float, window_start: float, first_cid: int
) -> pa.Table | None:
    """PCHUNK_SCHEMA rows straight from raw chunk rows (``chunks.CHUNK_SCHEMA`` with
    blobs, sorted by series then time): the partials of each series' good points in
    ``[start, end)`` per bucket of ``res`` seconds, as ``chunks.decoded_partials`` computes
    them, bucketed and encoded series by series on small arrays (no 10 M-row Arrow table,
    no global sort). None when a chunk holds strings (the caller takes the general path).
    """
    m = rows.num_rows
    if m == 0:
        return PCHUNK_SCHEMA.empty_table()
    if rows.column("s_blob").null_count < m:
        return None
    sid = series_ids(rows)
    bounds = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1], True])
    b = max(1, round(res * 1_000_000))
    lo_us, hi_us = round(start * 1_000_000), round(end * 1_000_000)
    t_lo = _i64(rows.column("t_min"))
    t_hi = _i64(rows.column("t_max"))
    tbs = rows.column("t_blob").to_pylist()
    vbs = rows.column("v_blob").to_pylist()
    cbs = rows.column("c_blob").to_pylist()
    t_b: list[bytes] = []
    n_b: list[bytes] = []
    ft_b: list[bytes] = []
    f_b: list[bytes] = []
    x_b: list[bytes | None] = []
    m_b: list[bytes | None] = []
    firsts: list[int] = []
    meta_min: list[int] = []
    meta_max: list[int] = []
    meta_n: list[int] = []
    meta_count: list[int] = []
    for g0, g1 in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        ts_parts, v_parts = [], []
        verbatim: list[bool] = []  # per part: every point of its chunk is kept
        sorted_parts = True
        for i in range(g0, g1):
            t = codec.decode_ts(tbs[i])
            v = codec.decode_values(vbs[i])
            keep = None
            if t_lo[i] < lo_us or t_hi[i] >= hi_us:
                keep = (t >= lo_us) & (t < hi_us)
            if cbs[i] is not None:
                good = (codec.decode_codes(cbs[i]) & 3) < 2  # bad quality is skipped
                keep = good if keep is None else keep & good
            whole = keep is None or bool(keep.all())
            if not whole:
                t, v = t[keep], v[keep]
            verbatim.append(whole)
            ts_parts.append(t)
            v_parts.append(v)
        t = ts_parts[0] if len(ts_parts) == 1 else np.concatenate(ts_parts)
        if t.size == 0:
            continue
        v = v_parts[0] if len(v_parts) == 1 else np.concatenate(v_parts)
        if t.size > 1 and not bool((t[1:] >= t[:-1]).all()):  # overlapping rows (late points)
            order = np.argsort(t, kind="stable")
            t, v = t[order], v[order]
            sorted_parts = False
        bidx = t // b
        starts = np.flatnonzero(np.r_[True, bidx[1:] != bidx[:-1]])
        ends = np.r_[starts[1:], t.size]
        count = ends - starts
        multi = np.flatnonzero(count > 1)
        mcode = None
        if multi.size or np.isnan(v).any():
            # sum/min/max/last where a bucket has more than one point, NaN values as the
            # row path has them (no number: null where a bucket has no other; rare)
            stats = nan_stats(v, starts, ends)
            fl = {c: a if m is None else np.where(m, 0.0, a) for c, (a, m) in stats.items()}
            if any(m is not None for _a, m in stats.values()):
                mcode = np.full(starts.size, _ALL_SET, dtype=np.int64)
                for j, c in enumerate(_NULLABLE):
                    m = stats[c][1] if c in stats else None
                    if m is not None:
                        mcode &= ~(m.astype(np.int64) << j)
        else:
            fl = {"first": v[starts]}
        first = fl["first"]
        ft, lt = t[starts], t[ends - 1]
        k = starts.size
        t_b.append(b"\0")  # bucket starts = first_ts floored: derived
        if bool((count == count[0]).all()):
            c0 = np.float64(count[0]).tobytes()
            n_b.append(bytes([codec.CONST]) + k.to_bytes(4, "little") + c0)
        else:
            n_b.append(codec.encode_values(count.astype(np.float64), _L))
        if sorted_parts and k == t.size and mcode is None:
            # one point per bucket (90 s data in 1-minute buckets: most series): first_ts
            # and first are the chunks' columns, verbatim where every point of a chunk is
            # kept (already encoded, at ``codec.LEVEL``: no encode here, and smaller), the
            # kept points encoded where the window or bad quality cut a chunk
            tp, vp = [], []
            for i, whole, tc, vc in zip(
                range(g0, g1), verbatim, ts_parts, v_parts, strict=True
            ):
                if whole:
                    tp.append(tbs[i])
                    vp.append(vbs[i])
                elif tc.size:
                    tp.append(codec.encode_ts(tc, _L))
                    vp.append(codec.encode_values(vc, _L))
            ft_b.append(codec.chain(tp))
            f_b.append(codec.chain(vp))
        else:
            ft_b.append(codec.encode_ts(ft, _L))
            f_b.append(codec.encode_values(first, _L))
        m_b.append(None if mcode is None else codec.encode_codes(mcode))
        idx = multi
        if len(fl) > 1:
            fb = first.view(np.int64)
            differs = lt != ft
            for c in _EXTRA:
                differs |= fl[c].view(np.int64) != fb
            idx = np.flatnonzero(differs)
        if idx.size:
            parts = [codec.encode_ts(idx, _L), codec.encode_ts(lt[idx], _L)]
            parts += [codec.encode_values(fl[c][idx], _L) for c in _EXTRA]
            x_b.append(_pack(parts))
        else:
            x_b.append(None)
        firsts.append(g0)
        meta_min.append(int(bidx[0]) * b)
        meta_max.append(int(bidx[-1]) * b)
        meta_n.append(k)
        meta_count.append(int(t.size))
    blobs: dict[str, Sequence[bytes | None]]
    blobs = dict(t_blob=t_b, n_blob=n_b, ft_blob=ft_b, f_blob=f_b, x_blob=x_b, m_blob=m_b)
    return _assemble(
        window_start,
        np.asarray(meta_min, dtype=np.int64),
        np.asarray(meta_max, dtype=np.int64),
        np.asarray(meta_n, dtype=np.int64),
        np.asarray(meta_count, dtype=np.int64),
        b,
        first_cid,
        blobs,
        rows,
        pa.array(np.asarray(firsts, dtype=np.int64)),
    )
