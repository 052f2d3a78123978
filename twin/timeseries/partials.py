"""Vectorised bucketing into aggregate partials (numpy), for stores without a fast GROUP BY.

``raw_partials`` turns RAW_SCHEMA rows (bad quality already filtered out) into PARTIAL_SCHEMA
rows per (bucket, series); ``combine`` rolls PARTIAL_SCHEMA rows up into coarser buckets.
Same results as the SQL in ``lance.py`` had (count(*), sum/min/max ignoring nulls, first and
last by time), but one sort plus ``ufunc.reduceat`` instead of a hash aggregate with ordered
``first_value``: downsampling a day of 1 M points went from ~10 s to well under a second.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twin.timeseries.base import PARTIAL_SCHEMA, SERIES_COLUMNS, TS_TYPE

_DENSE_LIMIT = 1 << 40


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    enc = pc.dictionary_encode(col)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.unify_dictionaries().combine_chunks() if enc.num_chunks else enc.combine_chunks()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary


def _dense(key: np.ndarray) -> np.ndarray:
    enc = pc.dictionary_encode(pa.array(key))
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _series_key(table: pa.Table) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, pa.Array]]]:
    key = np.zeros(table.num_rows, dtype=np.int64)
    parts: dict[str, tuple[np.ndarray, pa.Array]] = {}
    for name in SERIES_COLUMNS:
        codes, dictionary = _codes(table.column(name))
        parts[name] = (codes, dictionary)
        key = key * max(1, len(dictionary)) + codes
        if key.size and int(key.max()) > _DENSE_LIMIT:
            key = _dense(key)
    return key, parts


def _f64(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.to_numpy(), dtype=np.float64)  # nulls become NaN


def _us(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.cast(pa.int64()).fill_null(0).to_numpy(), dtype=np.int64)


def _build(
    table: pa.Table,
    bucket_s: float,
    *,
    bucket_t: np.ndarray,
    count: np.ndarray,
    s: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    first_v: np.ndarray,
    last_v: np.ndarray,
    first_str: pa.ChunkedArray,
    last_str: pa.ChunkedArray,
    first_t: np.ndarray,
    last_t: np.ndarray,
    valid: np.ndarray,
) -> pa.Table:
    n = table.num_rows
    if n == 0:
        return PARTIAL_SCHEMA.empty_table()
    bucket_us = max(1, round(bucket_s * 1_000_000))
    series, parts = _series_key(table)
    bidx = bucket_t // bucket_us
    bmin = int(bidx.min())
    nb = int(bidx.max()) - bmin + 1
    if series.size and int(series.max()) * nb > _DENSE_LIMIT:
        series = _dense(series)
    key = series * nb + (bidx - bmin)
    order = np.lexsort((first_t, key))
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    ends = np.r_[starts[1:], n]
    last_order = np.lexsort((last_t, key))  # same grouping, ordered by last time
    last_rows = last_order[ends - 1]
    first_rows = order[starts]

    def red(fn: np.ufunc, values: np.ndarray) -> np.ndarray:
        return np.asarray(fn.reduceat(values[order], starts))

    nvalid = red(np.add, valid.astype(np.int64))
    none = nvalid == 0
    sums = red(np.add, np.where(valid, s, 0.0))
    mins = red(np.fmin, lo)
    maxs = red(np.fmax, hi)
    cols: dict[str, pa.Array] = {
        "ts": pa.array((bidx[first_rows]) * bucket_us, pa.int64()).cast(TS_TYPE),
    }
    for name in SERIES_COLUMNS:
        codes, dictionary = parts[name]
        cols[name] = dictionary.take(pa.array(codes[first_rows])).cast(pa.string())
    cols["count"] = pa.array(red(np.add, count), pa.int64())
    cols["sum"] = pa.array(sums, pa.float64(), mask=none)
    cols["min"] = pa.array(mins, pa.float64(), mask=none)
    cols["max"] = pa.array(maxs, pa.float64(), mask=none)
    fv, lv = first_v[first_rows], last_v[last_rows]
    cols["first"] = pa.array(fv, pa.float64(), mask=np.isnan(fv))
    cols["last"] = pa.array(lv, pa.float64(), mask=np.isnan(lv))
    cols["first_str"] = first_str.take(pa.array(first_rows)).cast(pa.string())
    cols["last_str"] = last_str.take(pa.array(last_rows)).cast(pa.string())
    cols["first_ts"] = pa.array(first_t[first_rows], pa.int64()).cast(TS_TYPE)
    cols["last_ts"] = pa.array(last_t[last_rows], pa.int64()).cast(TS_TYPE)
    return pa.Table.from_arrays([cols[n] for n in PARTIAL_SCHEMA.names], schema=PARTIAL_SCHEMA)


def raw_partials(table: pa.Table, bucket_s: float) -> pa.Table:
    """RAW_SCHEMA rows (quality already filtered) → PARTIAL_SCHEMA per (bucket, series)."""
    v = _f64(table.column("value"))
    t = _us(table.column("ts"))
    valid = ~np.isnan(v)
    s = table.column("value_str")
    return _build(
        table,
        bucket_s,
        bucket_t=t,
        count=np.ones(table.num_rows, dtype=np.int64),
        s=v,
        lo=v,
        hi=v,
        first_v=v,
        last_v=v,
        first_str=s,
        last_str=s,
        first_t=t,
        last_t=t,
        valid=valid,
    )


def combine(table: pa.Table, bucket_s: float) -> pa.Table:
    """PARTIAL_SCHEMA rows → PARTIAL_SCHEMA rows in ``bucket_s`` buckets (bucket by ``ts``)."""
    sums = _f64(table.column("sum"))
    # grouped on the bucket of each row's own bucket start; first/last ordered by their times
    return _build(
        table,
        bucket_s,
        bucket_t=_us(table.column("ts")),
        count=np.asarray(table.column("count").to_numpy(), dtype=np.int64),
        s=sums,
        lo=_f64(table.column("min")),
        hi=_f64(table.column("max")),
        first_v=_f64(table.column("first")),
        last_v=_f64(table.column("last")),
        first_str=table.column("first_str"),
        last_str=table.column("last_str"),
        first_t=_us(table.column("first_ts")),
        last_t=_us(table.column("last_ts")),
        valid=~np.isnan(sums),
    )
