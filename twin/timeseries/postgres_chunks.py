"""The PostgreSQL store's series-chunk table (``<prefix>chunks``; layout in ``chunks.py``):
what TimescaleDB's compression does, on plain PostgreSQL.

One row per (series, closed raw partition): ``series_id`` and the chunk's statistics as
columns, the encoded timestamps/values/codes/strings as ``bytea`` (``STORAGE EXTERNAL``:
they are compressed already, pglz would only burn CPU on them). A BTree on
``(series_id, t_min)`` finds one series' chunks.

The chunk code works on Arrow tables whose series columns are the series id as text in
``device`` (the other four empty): the store maps ids to names only for what it returns.
These helpers take a psycopg cursor, so the caller decides the transaction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from twin.timeseries.base import RAW_SCHEMA, TS_TYPE
from twin.timeseries.chunks import BLOB_COLUMNS, CHUNK_SCHEMA, STAT_COLUMNS

META = ("cid", "series_id", "ts", "t_min", "t_max", "n", *STAT_COLUMNS)
_TS_COLS = ("ts", "t_min", "t_max", "first_ts", "last_ts")
_COPY_HEADER_LEN = 19


def _copy_out(cur: Any, sql: str) -> bytes:
    buf = bytearray()
    with cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT binary)") as cp:
        for chunk in cp:
            buf += chunk
    return bytes(buf)


def read_points(cur: Any, table: str, where: str, dtype: np.dtype[Any]) -> pa.Table:
    """Raw points of ``table`` matching ``where`` as RAW_SCHEMA rows keyed by series id
    (numeric rows as one fixed-width binary COPY, string rows by a second query)."""
    data = _copy_out(
        cur,
        f"SELECT ts, series_id, coalesce(value, 'NaN'), kind, quality FROM {table} "
        f"WHERE {where} AND value_str IS NULL",
    )
    count = max(0, (len(data) - _COPY_HEADER_LEN - 2) // dtype.itemsize)
    rows = np.frombuffer(data, dtype=dtype, count=count, offset=_COPY_HEADER_LEN)
    cur.execute(
        f"SELECT ts, series_id, value, kind, quality, value_str FROM {table} "
        f"WHERE {where} AND value_str IS NOT NULL"
    )
    srows = cur.fetchall()
    ts = rows["ts"].astype(np.int64)
    sid = rows["sid"].astype(np.int64)
    v = rows["v"].astype(np.float64)
    k = rows["k"].astype(np.uint8)
    q = rows["q"].astype(np.uint8)
    strs: list[str | None] = [None] * count
    if srows:
        c = list(zip(*srows, strict=True))
        ts = np.concatenate([ts, np.array(c[0], dtype=np.int64)])
        sid = np.concatenate([sid, np.array(c[1], dtype=np.int64)])
        v = np.concatenate([v, np.array([np.nan if x is None else x for x in c[2]])])
        k = np.concatenate([k, np.array(c[3], dtype=np.uint8)])
        q = np.concatenate([q, np.array(c[4], dtype=np.uint8)])
        strs += list(c[5])
    return points_table(ts, sid, v, k, q, strs)


def points_table(
    ts: np.ndarray,
    sid: np.ndarray,
    v: np.ndarray,
    k: np.ndarray,
    q: np.ndarray,
    strs: list[str | None] | None,
) -> pa.Table:
    n = len(ts)
    empty = pa.repeat(pa.scalar("", pa.string()), n)
    return pa.Table.from_arrays(
        [
            pa.array(ts, TS_TYPE),
            pa.array(sid, pa.int64()).cast(pa.string()),
            empty,
            empty,
            empty,
            empty,
            pa.array(v, pa.float64(), mask=k == 2),
            pa.array(strs, pa.string()) if strs is not None else pa.nulls(n, pa.string()),
            pa.array(k, pa.uint8()),
            pa.array(q, pa.uint8()),
        ],
        schema=RAW_SCHEMA,
    )


def fetch(cur: Any, table: str, where: str, *, blobs: bool) -> pa.Table:
    """Chunk rows matching ``where`` as a CHUNK_SCHEMA-like table (series id in
    ``device``), with ``cid``; without the blob columns unless ``blobs``."""
    cols = list(META) + (list(BLOB_COLUMNS) if blobs else [])
    cur.execute(f"SELECT {', '.join(cols)} FROM {table} WHERE {where}")
    rows = cur.fetchall()
    c = list(zip(*rows, strict=True)) if rows else [()] * len(cols)
    data = dict(zip(cols, c, strict=True))
    n = len(rows)
    empty = pa.repeat(pa.scalar("", pa.string()), n)
    out: dict[str, pa.Array] = {}
    for f in CHUNK_SCHEMA:
        name = f.name
        if name == "device":
            out[name] = pa.array(data["series_id"], pa.int64()).cast(pa.string())
        elif name in ("site", "grp", "tags", "metric"):
            out[name] = empty
        elif name in _TS_COLS:
            out[name] = pa.array(data[name], TS_TYPE)
        elif name in BLOB_COLUMNS:
            if not blobs:
                continue
            out[name] = pa.array([None if b is None else bytes(b) for b in data[name]], pa.binary())
        else:
            out[name] = pa.array(data[name], f.type)
    names = [f.name for f in CHUNK_SCHEMA if f.name in out]
    return pa.Table.from_arrays([out[x] for x in names], names=names)


def write(cur: Any, table: str, rows: pa.Table) -> None:
    """COPY chunk rows (from ``build_chunks`` over series-id tables) into ``table``."""
    if rows.num_rows == 0:
        return
    names = [*META[1:], *BLOB_COLUMNS]  # cid: the table's own sequence
    cols: dict[str, list[Any]] = {}
    for name in names:
        if name == "series_id":
            cols[name] = [int(x) for x in rows.column("device").to_pylist()]
        elif name in _TS_COLS:
            cols[name] = rows.column(name).cast(pa.int64()).to_pylist()
        else:
            cols[name] = rows.column(name).to_pylist()
    with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as cp:
        for row in zip(*(cols[n] for n in names), strict=True):  # one row per chunk
            cp.write_row(row)
