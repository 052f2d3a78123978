"""LanceDB time-series store in the state directory.

Layout (``<state>/timeseries/``): a LanceDB database with one table per tier —
``raw`` (RAW_SCHEMA, one row per point) and ``agg_<seconds>s`` (PARTIAL_SCHEMA) — plus
``meta.json`` (tier catalogue and downsampling watermarks, replaced atomically). With
``cold_path`` the ``agg_*`` tables live in that directory instead (hot/cold; see
``LanceStore``).

Why this shape (measured, see issue 6): one row per point ingests at ~2 M points/s from
Arrow batches of ≥10k rows, and with a ZONEMAP index on ``ts`` plus BITMAP indexes on
``device`` and ``metric`` (first round; ``device`` has a ZONEMAP since, see below) the
index lookup for one series over a day takes ~1-3 ms. What
dominated after that was *taking* the non-filter columns row by row: plain uint8 and
low-cardinality string pages cost ~10x more per taken row than float64 ones. So ``site``,
``grp``, ``tags``, ``kind`` and ``quality`` are stored dictionary-encoded
(``LANCE_RAW_SCHEMA``): one-series/one-day p50 went from ~17-20 ms to ~4-5 ms at 1 M
points (clustering the table by series after the fact gained only ~1.5x more and needs a
non-atomic rewrite, so it was not adopted). Each batch is sorted by (device, metric, ts)
so a series' rows sit together inside a fragment. Value columns are zstd-compressed.

Clustered fragments, no device bitmap (issue 6, second round). The ``device`` BITMAP was
~2.1 of 5.35 bytes/point at 10 M points: Lance's bitmaps cost ~2 bytes per row for any
column with more than a few dozen distinct values, whatever the row order (``metric`` with
10 values costs ~0). Maintenance now rewrites small fragments (``_cluster``: one atomic
``LanceOperation.Rewrite`` commit) in ``cluster_order``: time chunks of ~128 rows per
series, each sorted by (device, metric, ts); over that a ZONEMAP on ``device`` prunes to
a few zones per fragment for ~0.01 bytes/row. Whole-fragment sorting by series was tried
and rejected: ``ts`` then compresses 10-20x worse. The decimal value layout uses one
exponent per block of rows (``_block_exponent``). At 3 M points this took the store from
5.19 to 1.63 bytes/point with one-series reads no slower. Stores with the old device
BITMAP read as before and get the ZONEMAP at their next maintenance.

Aggregates (queries and downsampling) read the index-pruned rows and bucket them in numpy
(``partials.py``: one sort + ``reduceat``), ~6x faster than DataFusion's GROUP BY with
ordered ``first_value``. Profiling a one-day rollup of 10 M points (9.6 M partial rows)
showed three costs of similar size: reading, bucketing, and writing the tier. Bucketing now
unifies dictionary columns instead of decoding them and runs in bucket-aligned windows of
~1.5 M rows (``aggregate_rows``; ~1.5x less CPU than one 9.6 M-row pass). Tier tables store
``sum``/``min``/``max``/``first``/``last`` in the decimal layout (``_encode_partials``):
float64 with zstd made the 1-minute tier ~25-32 bytes/row and the rollup write-bound.
The index-pruned read was measured against scanning the whole table and filtering in
Arrow: no consistent difference for a whole-day rollup (1.9 s vs 1.3-3.2 s CPU for 9.6 M
rows on the shared machine), so the pruned read stays (it wins for anything narrower).

Downsampling tiers as partial chunks (issue 19). A tier's partials are written as one row
per (series, rollup window) in ``<tier>_chunks.lance`` (``partial_chunks.py``), beside the
tier's row table of older stores (read and replaced as before, never written again: its
rows go as their windows are replaced or expire). ``rollup`` hands the partials from the
raw chunks to the encoder with dictionary-encoded series columns (no per-row strings): a
one-day rollup of 10.8 M realistic points wrote ~9.6 M partial rows before (13 s of the
16.6 s), ~10 k chunk rows now.

Small appends are what kills Lance (every append is a fragment and a manifest), so:

* the Trio writer (``writer.py``) batches points (default 10k points or 1 s);
* maintenance (``maintain``) clusters the small fragments (``_cluster``), compacts what
  has many deleted rows, refreshes the indexes and removes versions older than
  ``keep_versions_for`` (default 1 minute; old versions are only useful to concurrent
  readers). It is due (``maintenance_due``) once a table has ``compact_every`` appends
  (default 32) not maintained yet; the engine runs it off the write path, from the
  time-series service's ``Maintainer`` task in a worker thread (``writer.py``);
* safety net: ``_append`` itself runs it inline, in the writer's call, once a table has
  ``inline_compact_every`` appends (default 256) not maintained yet and no maintenance is
  running, so a bare store (the CLI, scripts) never piles up fragments;
* ``maintain(force=True)`` does the same for every table (the retention pass calls it
  after deleting, which is what actually gives the space back).

Maintenance runs beside the writes, not under the store's lock (issue 6, third round:
inline, every flush that crossed ``compact_every`` stalled for the whole rewrite). Only
one maintenance runs at a time (``_maint_lock``); it works on its own dataset handle and
takes the store's lock only to refresh the table handle at the end. Lance resolves the
commits: a ``Rewrite`` (clustering, compaction) or index commit whose read version
predates appends is rebased over them (appends only add fragments), and an append or
delete made through the stale table handle after a rewrite is rebased too (checked with
pylance 14: rewrite over a concurrent append, stale add, stale delete of rewritten rows).
What does conflict (a delete of rows the rewrite read) fails the maintenance commit; it is
retried a few times, and a failure is logged, never raised into the write path. The store
keeps one handle per table, refreshed (``checkout_latest``) after maintenance, so readers
always see the latest commit.

Disk full: a write first checks free space (``min_free_bytes``) and raises
``StorageError`` without touching the table; an ``OSError`` during the append is mapped to
``StorageError``. Lance commits by writing a new manifest last, so a failed append leaves
the previous version intact (the data files it wrote are orphans that cleanup removes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from twin.errors import StorageError
from twin.files import private_dir
from twin.timeseries.base import (
    PARTIAL_SCHEMA,
    RAW,
    RAW_SCHEMA,
    SERIES_COLUMNS,
    TS_MIN,
    DataPoint,
    Record,
    Selector,
    StorageStats,
    TierStats,
    TimeSeriesQuery,
    records_to_table,
    sql_quote,
)
from twin.timeseries.chunks import (
    CHUNK_SCHEMA,
    META_COLUMNS,
    build_chunks,
    decode_chunks,
    decode_series,
    trim_chunks,
)
from twin.timeseries.lance_chunks import CACHED_READ_ROWS, CHUNKS, ChunkTable
from twin.timeseries.partial_chunks import (
    PCHUNK_SCHEMA,
    PMETA_COLUMNS,
    build_partial_chunks,
    decode_partial_chunks,
    from_raw_chunks,
    within,
)

log = logging.getLogger(__name__)

_INDEXES = (("ts", "ZONEMAP"), ("device", "ZONEMAP"), ("metric", "BITMAP"))
"""Per table. ``device`` was a BITMAP: Lance's bitmaps cost ~2 bytes per row for any column
with more than a few dozen distinct values (measured: 10 values ~0, 30 values 0.7-1.1,
300-1000 values 2.0 B/row, whatever the row order), i.e. ~40 % of the store. Over
clustered fragments (see ``_cluster``) a ZONEMAP on ``device`` prunes to a few zones for
~0.01 B/row. ``metric`` keeps its BITMAP (cheap at low cardinality). Tables built with a
``device`` BITMAP are migrated by the next maintenance."""

_DICT_COLUMNS = ("site", "grp", "tags", "kind", "quality")
_ZSTD_COLUMNS = ("ts", "first_ts", "last_ts", "count")
_ZSTD = {b"lance-encoding:compression": b"zstd"}


def _lance_field(f: pa.Field) -> pa.Field:
    if f.name in _DICT_COLUMNS:
        return pa.field(
            f.name, pa.dictionary(pa.int32(), f.type), nullable=f.nullable, metadata=f.metadata
        )
    if f.name in _ZSTD_COLUMNS:
        return f.with_metadata({**(f.metadata or {}), **_ZSTD})
    return f


LANCE_RAW_SCHEMA = pa.schema(
    [
        *(_lance_field(f) for f in RAW_SCHEMA),
        pa.field("value_dec", pa.int64(), metadata=_ZSTD),
        pa.field("value_exp", pa.dictionary(pa.int32(), pa.uint8()), nullable=False),
    ]
)
LANCE_PARTIAL_SCHEMA = pa.schema(
    [
        *(f if f.name in _DICT_COLUMNS else _lance_field(f) for f in PARTIAL_SCHEMA),
        *(
            field
            for name in ("sum", "min", "max", "first", "last")
            for field in (
                pa.field(f"{name}_dec", pa.int64(), metadata=_ZSTD),
                pa.field(f"{name}_exp", pa.dictionary(pa.int32(), pa.uint8()), nullable=False),
            )
        ),
    ]
)
"""The raw table on disk: ``site``, ``grp``, ``tags``, ``kind`` and ``quality``
dictionary-encoded. They are not filter columns of the common query, so Lance *takes* them
row by row after the index lookup, and plain low-cardinality pages are expensive to take
from; dictionary pages made a one-series/one-day read ~3x faster (measured, issue 6).
Stores created before keep their plain schema: appends are converted to the table's."""


_MAX_EXP = 6
_POW10 = 10.0 ** np.arange(_MAX_EXP + 1)
_EXP_DICTIONARY = pa.array(np.arange(_MAX_EXP + 1, dtype=np.uint8))
VALUE_SQL = "COALESCE(value, CAST(value_dec AS DOUBLE) / power(10.0, CAST(value_exp AS DOUBLE)))"
"""The numeric value as a SQL expression over the decimal layout (see ``_encode_values``)."""


def _encode_values(
    table: pa.Table,
    name: str = "value",
    reuse: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> pa.Table:
    """Decimal layout of the ``value`` column: a number with at most ``_MAX_EXP`` decimals
    (what sensors report: ``21.53``) is stored as ``value_dec / 10**value_exp``
    (``2153``, ``2``) and ``value`` is null; any other number (and NaN, inf, -0.0) stays in
    ``value`` as it is. Exact: a row is encoded only when ``dec / 10**exp`` gives back the
    very same float64, which is how it is decoded. Integers bit-pack where float64 does
    not compress: 4.9 -> 1.4 bytes/point on the benchmark's data (measured, issue 6).
    ``name``: the same for another float64 column (``<name>_dec``, ``<name>_exp``);
    ``reuse`` carries the work between columns that hold the same values."""
    col = table.column(name)
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    v = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    exp, dec = _decimals(v, valid, reuse)
    enc = exp >= 0
    i = table.schema.get_field_index(name)
    table = table.set_column(
        i, table.schema.field(i), pa.array(v, pa.float64(), mask=~(valid & ~enc))
    )
    table = table.append_column(f"{name}_dec", pa.array(dec, pa.int64(), mask=~enc))
    # already dictionary-encoded over 0..``_MAX_EXP``: no hash pass in ``_conform``
    exp_col = pa.DictionaryArray.from_arrays(
        pa.array(np.maximum(exp, 0).astype(np.int32)), _EXP_DICTIONARY
    )
    return table.append_column(f"{name}_exp", exp_col)


def _decimals(
    v: np.ndarray,
    valid: np.ndarray,
    reuse: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(exponent or -1, integer) per row for ``_encode_values``."""
    if reuse:
        pv, pvalid, pexp, pdec = reuse[-1]
        # a 1-minute tier over 90 s data: sum = min = max = first = last in every row
        # (bitwise: -0.0 and 0.0 must not share an encoding; 4x cheaper than equal_nan)
        if np.array_equal(pvalid, valid) and np.array_equal(pv.view(np.int64), v.view(np.int64)):
            return pexp, pdec
    n = len(v)
    exp = np.full(n, -1, dtype=np.int8)
    dec = np.zeros(n, dtype=np.int64)
    # each pass works on the rows still left (indices), not on masks over every row
    todo = np.flatnonzero(valid & ~((v == 0) & np.signbit(v)))
    if todo.size > 65536:
        # full-precision floats (issue 19's realistic data) have no decimal form: a sample
        # of evenly spread rows says so before seven passes over every row do
        probe = v[todo[:: todo.size // 4096]]
        with np.errstate(all="ignore"):
            d = np.rint(probe * _POW10[_MAX_EXP])
            fits = np.mean((np.abs(d) < 2.0**53) & (d / _POW10[_MAX_EXP] == probe))
        if fits < 0.02:
            if reuse is not None:
                reuse.append((v, valid, exp, dec))
            return exp, dec
    with np.errstate(all="ignore"):
        for k in range(_MAX_EXP + 1):
            if todo.size == 0:
                break
            x = v[todo]
            d = np.rint(x * _POW10[k])
            ok = (np.abs(d) < 2.0**53) & (d / _POW10[k] == x)
            hit = todo[ok]
            exp[hit] = k
            dec[hit] = d[ok].astype(np.int64)
            todo = todo[~ok]
    exp, dec = _block_exponent(v, exp, dec)
    if reuse is not None:
        reuse.append((v, valid, exp, dec))
    return exp, dec


_EXP_BLOCK = 256


def _block_exponent(
    v: np.ndarray, exp: np.ndarray, dec: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One exponent per block of ``_EXP_BLOCK`` consecutive rows where that stays exact:
    ``20.1`` is stored as ``2010, 2`` beside ``20.13 -> 2013, 2`` rather than ``201, 1``.
    A per-row exponent is noise that costs ~0.25-0.9 bytes/point; constant over a block
    (rows are sorted by series, so a block holds one or a few series) it costs ~nothing
    (measured, issue 6). Blocks rather than series runs: finding the runs compared two
    string columns row by row, 1.2 s of a 10 M-point rollup. Rows whose value would not be
    exact (or exceed 2**53) with the block's exponent keep their own."""
    n = len(v)
    if n == 0 or not (exp >= 0).any():
        return exp, dec
    starts = np.arange(0, n, _EXP_BLOCK)
    block_exp = np.maximum.reduceat(exp, starts)
    gexp = np.repeat(block_exp, np.diff(np.r_[starts, n])).astype(np.int64)
    lift = (exp >= 0) & (gexp > exp)
    if not lift.any():
        return exp, dec
    shift = gexp[lift] - exp[lift]
    small = np.abs(dec[lift]).astype(np.float64) * _POW10[shift] < 2.0**53
    with np.errstate(all="ignore"):
        d = np.where(small, dec[lift], 0) * (10**shift)
        ok = small & (d.astype(np.float64) / _POW10[gexp[lift]] == v[lift])
    idx = np.flatnonzero(lift)[ok]
    exp = exp.copy()
    dec = dec.copy()
    exp[idx] = gexp[idx]
    dec[idx] = d[ok]
    return exp, dec


def _decode_values(table: pa.Table, name: str = "value") -> pa.Table:
    """Inverse of ``_encode_values`` (a no-op for tables read from the old layout)."""
    if f"{name}_dec" not in table.column_names:
        return table
    import pyarrow.compute as pc

    dec = table.column(f"{name}_dec")
    if dec.null_count < len(dec):
        exp = np.asarray(
            table.column(f"{name}_exp").cast(pa.uint8()).to_numpy(zero_copy_only=False),
            dtype=np.int64,
        )
        d = np.asarray(dec.to_numpy(zero_copy_only=False), dtype=np.float64)
        value = pc.if_else(
            dec.is_valid(), pa.array(d / _POW10[exp], pa.float64()), table.column(name)
        )
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), value)
    return table.drop_columns([f"{name}_dec", f"{name}_exp"])


_PARTIAL_DECIMALS = ("sum", "min", "max", "first", "last")
"""Partial columns stored in the decimal layout in tier tables created since issue 6's
second round: float64 with zstd cost ~4.5 bytes each per row and made a 1-minute tier
~25-32 bytes/row (6-20x the raw points it summarises); a rollup pass was bound by
writing them."""


def _encode_partials(table: pa.Table) -> pa.Table:
    reuse: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for name in _PARTIAL_DECIMALS:
        table = _encode_values(table, name, reuse)
    return table


def _decode_partials(table: pa.Table) -> pa.Table:
    for name in _PARTIAL_DECIMALS:
        table = _decode_values(table, name)
    return table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the on-disk ``schema`` (dictionary-encoding columns as needed)."""
    import pyarrow.compute as pc

    cols = []
    for f in schema:
        col = table.column(f.name)
        if pa.types.is_dictionary(f.type) and not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col.cast(f.type.value_type))
        cols.append(col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _ts_lit(seconds: float) -> str:
    return f"to_timestamp_micros({round(seconds * 1_000_000)})"


def _ts_pred(start: float, end: float) -> str:
    return f"ts >= {_ts_lit(start)} AND ts < {_ts_lit(end)}"


_TS_FAR = 4e10
"""Epoch seconds past any timestamp a store holds (year 3237): "to the end"."""


def _min_ts(table: pa.Table) -> float:
    """The smallest ``ts`` of a non-empty table, in epoch seconds."""
    t = np.asarray(table.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)
    return float(t.min()) / 1e6


def _concat_partials(parts: list[pa.Table]) -> pa.Table:
    """PARTIAL_SCHEMA tables, some perhaps with dictionary-encoded series columns, as one
    (dictionary columns kept only when every part has them)."""
    if len(parts) == 1:
        return parts[0]
    if any(p.schema != parts[0].schema for p in parts):
        parts = [p.cast(PARTIAL_SCHEMA) for p in parts]
    return pa.concat_tables(parts)


def _tier_resolution(tier: str) -> float:
    """``agg_60s`` -> 60.0 (1.0 for a name of another form: only the encoding's size
    depends on it, see ``partial_chunks``)."""
    try:
        return float(tier.removeprefix("agg_").removesuffix("s"))
    except ValueError:
        return 1.0


def _dir_size(path: Path) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks, as ``du``)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def _lex_ranks(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row, the rank of its value in sorted order (strings compared as strings)."""
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    enc = pc.dictionary_encode(col)
    rank = np.empty(len(enc.dictionary), dtype=np.int64)
    rank[np.asarray(pc.sort_indices(enc.dictionary))] = np.arange(len(enc.dictionary))
    return rank[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]


def cluster_order(table: pa.Table, run: int) -> np.ndarray:
    """Row order for a rewritten fragment: rows are cut in time order into chunks of about
    ``run`` rows per series, and each chunk is sorted by (device, metric, ts).

    A series' rows then sit in runs of ~``run`` rows (a one-series query reads a few runs,
    and zone maps on ``device`` prune to them) while ``ts`` still compresses: within a
    chunk every series repeats the same run of timestamps, which zstd finds; sorting a
    whole fragment by series made ``ts`` cost 2-3 bytes/point instead of ~0.1-0.3
    (measured: run 32 -> 2.29 B/pt, 128 -> 2.69, whole fragment -> 6.3 with dictionary
    noise; one-series/one-day reads got ~3x slower at 32 than at 128)."""
    n = table.num_rows
    dev = _lex_ranks(table.column("device"))
    met = _lex_ranks(table.column("metric"))
    ts = np.asarray(table.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)
    series = len(np.unique(dev * (int(met.max(initial=0)) + 1) + met)) if n else 0
    chunk_rows = max(1, series * max(1, run))
    pos = np.empty(n, dtype=np.int64)
    pos[np.argsort(ts, kind="stable")] = np.arange(n)
    return np.lexsort((ts, met, dev, pos // chunk_rows))


def _clean_dictionaries(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema`` with every dictionary column re-encoded over one clean
    dictionary: concatenated fragments carry one dictionary per batch, and indices into a
    dictionary full of duplicates compress ~15x worse (0.31 vs 0.02 bytes/point)."""
    import pyarrow.compute as pc

    cols = []
    for f in schema:
        col = table.column(f.name)
        if pa.types.is_dictionary(f.type):
            col = pc.dictionary_encode(col.cast(f.type.value_type).combine_chunks())
        cols.append(col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


class LanceStore:
    """``TimeSeriesStore`` on LanceDB. Synchronous and thread-safe (one lock).

    ``cold_path``: where aggregate tiers (``agg_*``) live when set, e.g. a bigger, slower
    disk; ``raw`` and ``meta.json`` stay in ``path``. A tier table that already exists in
    the other directory (a store opened before ``cold_path`` was set, or after it was
    removed) is used where it is: tables are never moved behind the user's back.

    ``cluster_rows`` / ``cluster_run``: maintenance rewrites fragments smaller than
    ``cluster_rows // 2`` into fragments of up to ``cluster_rows`` rows ordered by
    ``cluster_order(run=cluster_run)`` (see ``_cluster``).

    ``compact_every``: appends to a table after which maintenance is due
    (``maintenance_due``; the engine's ``Maintainer`` runs it in the background);
    ``inline_compact_every``: appends after which ``_append`` runs it inline (safety net).

    ``chunk_cache_bytes``: the chunk rows' blobs kept in memory, newest and most recently
    read first (``lance_chunks.py``: a Lance take costs ~0.25 ms a call); 0: none. ~2 days
    of 1,000 devices x 10 metrics every 90 s of full-precision floats at the default.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        cold_path: str | Path | None = None,
        compact_every: int = 32,
        inline_compact_every: int = 256,
        keep_versions_for: timedelta = timedelta(minutes=1),
        min_free_bytes: int = 64 * 1024 * 1024,
        nearly_full_fraction: float = 0.05,
        cluster_rows: int = 1024 * 1024,
        cluster_run: int = 128,
        chunk_seconds: float | None = 6 * 3600.0,
        chunk_grace: float = 900.0,
        chunk_cache_bytes: int = 128 * 1024 * 1024,
    ) -> None:
        import lancedb

        self.path = private_dir(path)  # 0700: readings are nobody else's business
        self.cold_path = Path(cold_path) if cold_path else None
        if self.cold_path is not None:
            self.cold_path.mkdir(parents=True, exist_ok=True)
        self.compact_every = compact_every
        self.inline_compact_every = max(inline_compact_every, compact_every)
        self.keep_versions_for = keep_versions_for
        self.min_free_bytes = min_free_bytes
        self.nearly_full_fraction = nearly_full_fraction
        self.cluster_rows = cluster_rows
        self.cluster_run = cluster_run
        self._db = lancedb.connect(str(self.path))
        self._cold_db = lancedb.connect(str(self.cold_path)) if self.cold_path else None
        self._lock = threading.RLock()
        # one maintenance at a time; never waited for while holding ``_lock`` (see _append)
        self._maint_lock = threading.Lock()
        self._tables: dict[str, Any] = {}
        self._where: dict[str, Path] = {}
        self._datasets: dict[str, Any] = {}
        self._appends: dict[str, int] = {}
        self._schemas: dict[str, pa.Schema] = {}
        self._meta_path = self.path / "meta.json"
        self._meta: dict[str, str] = (
            json.loads(self._meta_path.read_text()) if self._meta_path.exists() else {}
        )
        # the series-chunk layout of closed time ranges (``chunks.py``, ``lance_chunks.py``)
        self.chunk_seconds = chunk_seconds if chunk_seconds and chunk_seconds > 0 else None
        self.chunk_grace = chunk_grace
        self._chunks = ChunkTable(self.path, cache_bytes=chunk_cache_bytes)
        self._tier_chunks: dict[str, ChunkTable] = {}  # tier -> its partial chunks
        self._tier_chunk_appends: set[str] = set()  # tiers whose chunk table needs upkeep
        # bounds of the raw table's timestamps (us): a lower bound of its oldest row (a
        # query ending before it skips the raw table) and the newest row written
        self._raw_lo: int | None = None
        self._raw_hi: int | None = None
        self._raw_bounds_known = False
        self._merged_upto = 0  # windows ending before this (us) hold one row per series
        self._recover_chunk_commit()
        self._recover_tier_commits()

    # --- tables ---------------------------------------------------------------------
    def _homes(self, tier: str) -> list[tuple[Any, Path]]:
        """(connection, directory) where ``tier`` may live, the preferred one first."""
        hot = (self._db, self.path)
        if self._cold_db is None or self.cold_path is None:
            return [hot]
        cold = (self._cold_db, self.cold_path)
        return [hot, cold] if tier == RAW else [cold, hot]

    def _table(self, tier: str, create: bool = False) -> Any:
        """The table handle, or None when it does not exist and ``create`` is false."""
        tbl = self._tables.get(tier)
        if tbl is not None:
            return tbl
        homes = self._homes(tier)
        for db, where in homes:
            if not (where / f"{tier}.lance").exists():
                continue
            try:
                tbl = db.open_table(tier)
            except (ValueError, FileNotFoundError, RuntimeError):
                continue
            break
        else:
            if not create:
                return None
            db, where = homes[0]
            schema = LANCE_RAW_SCHEMA if tier == RAW else LANCE_PARTIAL_SCHEMA
            tbl = db.create_table(tier, schema=schema, exist_ok=True)
        self._tables[tier] = tbl
        self._where[tier] = where
        self._schemas[tier] = tbl.schema
        return tbl

    def _locate(self, tier: str) -> Path:
        """The directory ``tier`` is in, or would be created in."""
        where = self._where.get(tier)
        if where is not None:
            return where
        homes = self._homes(tier)
        for _db, d in homes:
            if (d / f"{tier}.lance").exists():
                return d
        return homes[0][1]

    def table_path(self, tier: str) -> Path | None:
        """The directory of ``tier``'s Lance dataset, or None when it does not exist."""
        with self._lock:
            if self._table(tier) is None:
                if tier != RAW and self._pchunks(tier).exists():
                    return self._pchunks(tier).path
                return None
            return self._where[tier] / f"{tier}.lance"

    def _dataset(self, tier: str) -> Any | None:
        ds = self._datasets.get(tier)
        if ds is None:
            tbl = self._table(tier)
            if tbl is None:
                return None
            ds = tbl.to_lance()
            self._datasets[tier] = ds
        return ds

    def tiers(self) -> list[str]:
        with self._lock:
            dirs = [self.path] + ([self.cold_path] if self.cold_path else [])
            names = {p.name[: -len(".lance")] for d in dirs for p in d.glob("*.lance")}
            names.discard(CHUNKS)  # part of ``raw``, not a tier of its own
            # a tier's partial chunks (``<tier>_chunks``) are that tier
            return sorted({n[: -len("_chunks")] if n.endswith("_chunks") else n for n in names})

    def _pchunks(self, tier: str) -> ChunkTable:
        """``tier``'s partial-chunk table (``partial_chunks.py``): beside the tier's row
        table when one exists (a store from before), else in the tier's preferred home."""
        ct = self._tier_chunks.get(tier)
        if ct is not None:
            return ct
        name = f"{tier}_chunks"
        homes = [d for _db, d in self._homes(tier)]
        where = next((d for d in homes if (d / f"{name}.lance").exists()), None)
        if where is None:
            where = self._locate(tier)
        ct = ChunkTable(where, name, PCHUNK_SCHEMA)
        self._tier_chunks[tier] = ct
        return ct

    # --- writes ---------------------------------------------------------------------
    def _check_space(self, where: Path) -> None:
        free = shutil.disk_usage(where).free
        if free < self.min_free_bytes:
            raise StorageError(
                f"time-series store {where}: only {free} bytes free "
                f"(< {self.min_free_bytes}); write refused",
                hint="free disk space or shorten retention; writes resume when space returns",
            )

    def _append(self, tier: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._check_space(self._locate(tier))
        tbl = self._table(tier, create=True)
        schema = self._schemas[tier]
        if "value_dec" in schema.names and "value_dec" not in table.column_names:
            table = _encode_values(table)
        if "sum_dec" in schema.names and "sum_dec" not in table.column_names:
            table = _encode_partials(table)
        if table.schema != schema:
            table = _conform(table, schema)
        try:
            tbl.add(table)
        except OSError as exc:
            self._drop_orphans(tier)
            raise StorageError(f"time-series write to {tier} failed: {exc}") from exc
        except Exception as exc:
            if "No space left" in str(exc) or "os error 28" in str(exc):
                self._drop_orphans(tier)
                raise StorageError(f"time-series write to {tier} failed: disk full") from exc
            raise
        self._datasets.pop(tier, None)
        self._appends[tier] = self._appends.get(tier, 0) + 1
        if tier == RAW and self._raw_bounds_known:
            import pyarrow.compute as pc

            mm = pc.min_max(table.column("ts").cast(pa.int64())).as_py()
            lo, hi = int(mm["min"]), int(mm["max"])
            self._raw_lo = lo if self._raw_lo is None else min(self._raw_lo, lo)
            self._raw_hi = hi if self._raw_hi is None else max(self._raw_hi, hi)
        # safety net only (see the module docstring); skipped while a maintenance runs:
        # it is merging these fragments already (and waiting for it here would deadlock)
        if self._appends[tier] >= self.inline_compact_every and self._maint_lock.acquire(
            blocking=False
        ):
            try:
                self._maintain_table(tier, self.keep_versions_for)
            finally:
                self._maint_lock.release()

    def pending_appends(self) -> int:
        """The most appends any table has had since its last maintenance. Without the lock:
        the service calls this from the Trio thread after each flush, and the lock can be
        held for seconds (a rollup's ``replace_partials``); ``list()`` of a dict's values
        is one step under the GIL, and a count one append behind does no harm."""
        return max(list(self._appends.values()), default=0)

    def maintenance_due(self) -> bool:
        """True when a table has ``compact_every`` appends not maintained yet."""
        return self.pending_appends() >= self.compact_every

    def fragment_count(self, tier: str = RAW) -> int:
        """Fragments of ``tier``'s latest version (0 when the table does not exist)."""
        import lance

        with self._lock:
            if self._table(tier) is None:
                return 0
            uri = self._where[tier] / f"{tier}.lance"
        return len(lance.dataset(str(uri)).get_fragments())

    def _drop_orphans(self, tier: str) -> None:
        """After a failed append (disk full): delete the data files it wrote and every old
        version's manifest (an emergency: concurrent readers of old versions lose them), so
        the space is there for the deletes that free the disk. Not while a maintenance
        runs: ``delete_unverified`` would delete the fragments it is writing."""
        if not self._maint_lock.acquire(blocking=False):
            return
        try:
            with contextlib.suppress(Exception):
                self._table(tier).to_lance().cleanup_old_versions(
                    older_than=timedelta(0), delete_unverified=True
                )
        finally:
            self._maint_lock.release()

    def write_records(self, records: Sequence[Record]) -> int:
        table = records_to_table(records)
        with self._lock:
            self._append(RAW, table)
        return table.num_rows

    def write_table(self, table: pa.Table) -> int:
        """Append a RAW_SCHEMA table (already columnar: the fastest path)."""
        with self._lock:
            self._append(RAW, table.cast(RAW_SCHEMA))
        return table.num_rows

    def write_point(self, point: DataPoint) -> None:
        self.write_records(point.records())

    def write_batch(self, points: Iterable[DataPoint]) -> int:
        return self.write_records([r for p in points for r in p.records()])

    # --- reads ----------------------------------------------------------------------
    def _sql(self, tier: str, sql: str) -> pa.Table | None:
        with self._lock:
            ds = self._dataset(tier)
        if ds is None:
            return None
        try:
            batches = ds.sql(sql).build().to_batch_records()
        except OSError as exc:
            raise StorageError(f"time-series query on {tier} failed: {exc}") from exc
        if not batches:
            return None
        return pa.Table.from_batches(batches)

    @staticmethod
    def _raw_columns(ds: Any) -> list[str]:
        extra = ["value_dec", "value_exp"] if "value_dec" in ds.schema.names else []
        return [*RAW_SCHEMA.names, *extra]

    # --- raw data: the row table (recent) + the chunk table (closed ranges) -------------
    def _raw_bounds(self) -> tuple[int | None, int | None]:
        """(lowest, highest) raw timestamp in us, None when the raw table is empty; the
        caller holds ``_lock``. One scan of ``ts`` the first time, then kept up to date by
        appends (exact) and compaction (a lower bound)."""
        if not self._raw_bounds_known:
            import pyarrow.compute as pc

            ds = self._dataset(RAW)
            lo = hi = None
            if ds is not None and ds.count_rows():
                mm = pc.min_max(ds.to_table(columns=["ts"]).column("ts").cast(pa.int64()))
                lo, hi = mm.as_py()["min"], mm.as_py()["max"]
            self._raw_lo, self._raw_hi = lo, hi
            self._raw_bounds_known = True
        return self._raw_lo, self._raw_hi

    def _raw_snapshot(
        self, start: float, end: float
    ) -> tuple[Any | None, tuple[Any, pa.Table] | None]:
        """(raw dataset or None when no raw row can be in ``[start, end)``, the chunk
        table's (dataset, catalogue) or None) as of one moment (under ``_lock``:
        compaction commits under it too)."""
        with self._lock:
            ds = self._dataset(RAW)
            if ds is not None and self.chunk_seconds is not None:
                lo, hi = self._raw_bounds()
                if lo is None or hi is None or lo >= round(end * 1e6) or hi < round(start * 1e6):
                    ds = None
            snap = self._chunks.snapshot() if self._chunks.exists() else None
        return ds, snap

    def read_raw(
        self, selector: Selector, start: float, end: float, limit: int | None = None
    ) -> pa.Table:
        where = f"{_ts_pred(start, end)} AND {selector.sql(sql_quote)}"
        ds, snap = self._raw_snapshot(start, end)
        parts = []
        in_order = False
        one = self._one_series(selector, start, end, snap) if snap is not None else None
        if one is not None:
            parts.append(one[0])
            in_order = one[1]
        elif snap is not None:
            rows = self._chunks.select(selector, start, end, snap=snap)
            if rows.num_rows:
                parts.append(decode_chunks(rows, start, end))
                # one series' chunks by time (the dashboard's query): no sort needed
                in_order = rows.num_rows == 1 or (
                    rows.num_rows <= 16
                    and all(len(set(rows.column(c).to_pylist())) == 1 for c in SERIES_COLUMNS)
                )
                if in_order:
                    t = np.asarray(parts[0].column("ts").cast(pa.int64()).to_numpy())
                    in_order = bool(np.all(t[1:] >= t[:-1]))
        if ds is not None:
            table = _decode_values(ds.to_table(filter=where, columns=self._raw_columns(ds)))
            parts.append(table.select(RAW_SCHEMA.names).cast(RAW_SCHEMA))
            in_order = False
        if not parts:
            return RAW_SCHEMA.empty_table()
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        if table.num_rows > 1 and not in_order:
            table = table.sort_by(
                [("device", "ascending"), ("metric", "ascending"), ("ts", "ascending")]
            )
        return table.slice(0, limit) if limit is not None else table

    def _one_series(
        self, selector: Selector, start: float, end: float, snap: tuple[Any, pa.Table]
    ) -> tuple[pa.Table, bool] | None:
        """The chunk part of a one-series read (the dashboard's query) straight from the
        rows' blobs (``chunks.decode_series``): (points, in time order). None when the
        selector is not one device and one metric, or a row holds strings, or the rows
        are not of one series (the general path then decodes them)."""
        if not (
            len(selector.devices) == 1
            and len(selector.metrics) == 1
            and not (selector.sites or selector.groups or selector.tags)
        ):
            return None
        ds, cat = snap
        if cat.num_rows == 0:
            return None
        ct = self._chunks
        idx = ct.offsets(cat, selector, start, end)
        if len(idx) == 0:
            return RAW_SCHEMA.empty_table(), True
        if len(idx) > CACHED_READ_ROWS or ct.has_strings(cat, idx):
            return None
        rows = ct.series_of(cat, idx)
        if rows is None or any(r != rows[0] for r in rows[1:]):
            return None
        blobs = ct.blob_tuples(ds, cat, idx)
        if blobs is None:
            return None
        lo, hi = round(start * 1_000_000), round(end * 1_000_000)
        table = decode_series(rows[0], blobs, lo, hi)
        # rows by t_min (``offsets``): in time order when they do not overlap
        t_lo, t_hi = ct.bounds(cat, idx)
        return table, bool(np.all(t_lo[1:] > t_hi[:-1]))

    aggregate_rows = 1_500_000
    """Aggregates over more rows than this are computed window by window (bucket-aligned,
    so no bucket straddles two windows): the numpy work on 9.6 M rows at once took ~1.7x
    the CPU of the same rows in ~1 M-row windows (memory traffic, page faults, sort size;
    measured, issue 6)."""

    def aggregate(
        self, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> pa.Table:
        """Partials per (bucket, series): the rows are read with the index-pruned scan and
        bucketed in numpy (``partials.py``): one sort + ``reduceat`` was ~10x faster than
        DataFusion's GROUP BY with ordered ``first_value`` on the same data."""
        return self._partials(tier, selector, start, end, bucket)

    def _partials(
        self,
        tier: str,
        selector: Selector,
        start: float,
        end: float,
        bucket: float,
        *,
        dictionary: bool = False,
    ) -> pa.Table:
        """``aggregate``; ``dictionary``: the series columns may come dictionary-encoded
        (``rollup`` hands them to ``build_partial_chunks``, which wants codes, not
        strings)."""
        from twin.timeseries import partials

        chunks = PARTIAL_SCHEMA.empty_table()
        if tier == RAW:
            ds, snap = self._raw_snapshot(start, end)
            if snap is not None:
                meta = self._chunks.select(selector, start, end, blobs=False, snap=snap)
                if meta.num_rows:
                    chunks = self._chunk_aggregate(
                        snap, meta, start, end, bucket, dictionary=dictionary
                    )
        else:
            with self._lock:
                ds = self._dataset(tier)
                ct = self._pchunks(tier)
            if ct.exists():
                rows = ct.select(selector, start, end)
                if rows.num_rows:
                    chunks = partials.combine(decode_partial_chunks(rows, start, end), bucket)
        if ds is None:
            return chunks
        try:
            out = self._aggregate_windows(ds, tier, selector, start, end, bucket)
        except OSError as exc:
            raise StorageError(f"time-series query on {tier} failed: {exc}") from exc
        if chunks.num_rows == 0:
            return out
        if out.num_rows == 0:
            return chunks
        return partials.combine(_concat_partials([chunks, out]), bucket)

    def _chunk_aggregate(
        self,
        snap: tuple[Any, pa.Table],
        meta: pa.Table,
        start: float,
        end: float,
        bucket: float,
        *,
        dictionary: bool = False,
    ) -> pa.Table:
        """Partials from chunk rows (catalogue rows, no blobs yet): whole chunks from their
        stored stats, the others decoded in bucket-aligned groups of ~``aggregate_rows``
        points. Several partials may share a bucket; ``partials.combine`` merges them."""
        from twin.timeseries import chunks as ck
        from twin.timeseries import partials

        whole = ck.stat_usable(meta, start, end, bucket)
        parts = []
        if whole.any():
            # stored partials: only these may share a bucket (several rows of one window)
            stats = ck.stat_partials(meta.filter(pa.array(whole)), bucket)
            parts.append(partials.combine(stats, bucket) if stats.num_rows > 1 else stats)
        idx = np.flatnonzero(~whole)
        if idx.size:
            ds, cat = snap
            # catalogue offsets of the rows to decode: ``select`` took them in order
            # every chunk of a series in one group, so no bucket is split between groups
            sub = meta.take(pa.array(idx))
            order = np.asarray(
                pa.compute.sort_indices(
                    sub, sort_keys=[(c, "ascending") for c in (*SERIES_COLUMNS, "ts")]
                ).to_numpy(),
                dtype=np.int64,
            )
            idx = idx[order]
            sub = sub.take(pa.array(order))
            offsets = self._catalog_offsets(cat, sub)
            n = np.asarray(sub.column("n").to_numpy(), dtype=np.int64)
            new_series = np.zeros(len(idx), dtype=bool)
            new_series[0] = True
            for c in SERIES_COLUMNS:
                col = sub.column(c).to_numpy(zero_copy_only=False)
                new_series[1:] |= col[1:] != col[:-1]
            # a new group at the first series start past each ``aggregate_rows`` points
            cum = np.cumsum(n)
            cut = np.zeros(len(idx), dtype=bool)
            last = 0
            for i in np.flatnonzero(new_series)[1:].tolist():  # per series, not per point
                if cum[i - 1] - last >= self.aggregate_rows:
                    cut[i] = True
                    last = int(cum[i - 1])
            group = np.cumsum(cut)
            for g in np.unique(group):
                sel = group == g
                rows = self._chunks.blobs(
                    ds, sub.filter(pa.array(sel)).select(ck.META_COLUMNS), offsets[sel], cat
                )
                fast = ck.decoded_partials(rows, start, end, bucket, dictionary=dictionary)
                if fast is not None:
                    if fast.num_rows:
                        parts.append(fast)
                    continue
                raw = ck.decode_chunks(rows, start, end)
                raw = raw.filter(pa.compute.less(raw.column("quality"), 2))
                if raw.num_rows:
                    parts.append(partials.raw_partials(raw, bucket))
        if not parts:
            return PARTIAL_SCHEMA.empty_table()
        # decoded groups hold disjoint series, and no stored partial shares their buckets
        return _concat_partials(parts)

    @staticmethod
    def _catalog_offsets(cat: pa.Table, rows: pa.Table) -> np.ndarray:
        """Offsets in the catalogue (= in the dataset version it was read from) of
        ``rows``, by their unique ``cid``."""
        cids = np.asarray(cat.column("cid").to_numpy(), dtype=np.int64)
        order = np.argsort(cids)
        want = np.asarray(rows.column("cid").to_numpy(), dtype=np.int64)
        return order[np.searchsorted(cids[order], want)]

    def _aggregate_windows(
        self, ds: Any, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> pa.Table:
        windows = [(start, end)]
        if ds.count_rows() > self.aggregate_rows and bucket > 0:
            n = ds.count_rows(filter=f"{_ts_pred(start, end)} AND {selector.sql(sql_quote)}")
            pieces = -(-n // self.aggregate_rows)
            if pieces > 1:
                step = max(1, round((end - start) / pieces / bucket)) * bucket
                cuts = [start]
                edge = (start // step + 1) * step  # absolute multiples: bucket-aligned
                while edge < end:
                    cuts.append(edge)
                    edge += step
                windows = list(zip(cuts, [*cuts[1:], end], strict=True))
        parts = [self._aggregate(ds, tier, selector, a, b, bucket) for a, b in windows]
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    @staticmethod
    def _aggregate(
        ds: Any, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> pa.Table:
        from twin.timeseries import partials

        where = f"{_ts_pred(start, end)} AND {selector.sql(sql_quote)}"
        if tier == RAW:
            cols = ["ts", *SERIES_COLUMNS, "value", "value_str"]
            if "value_dec" in ds.schema.names:
                cols += ["value_dec", "value_exp"]
            table = ds.to_table(filter=where + " AND quality < 2", columns=cols)
            return partials.raw_partials(_decode_values(table), bucket)
        cols = list(PARTIAL_SCHEMA.names)
        if "sum_dec" in ds.schema.names:
            cols += [f"{n}_{x}" for n in _PARTIAL_DECIMALS for x in ("dec", "exp")]
        table = _decode_partials(ds.to_table(filter=where, columns=cols))
        return partials.combine(table, bucket)

    def earliest(self, tier: str, selector: Selector, end: float) -> float | None:
        """The first timestamp before ``end`` in ``tier`` (reads the ``ts`` column only)."""
        import pyarrow.compute as pc

        found: list[float] = []
        if tier == RAW:
            ds, snap = self._raw_snapshot(TS_MIN, end)
            if snap is not None:
                meta = self._chunks.select(selector, TS_MIN, end, blobs=False, snap=snap)
                first_ts = meta.column("first_ts") if meta.num_rows else None
                if first_ts is not None and first_ts.null_count < len(first_ts):
                    f = pc.min(first_ts).as_py()
                    if f is not None and f.timestamp() < end:
                        found.append(f.timestamp())
        else:
            with self._lock:
                ds = self._dataset(tier)
                ct = self._pchunks(tier)
            if ct.exists():
                meta = ct.select(selector, TS_MIN, end, blobs=False)
                if meta.num_rows:
                    f = pc.min(meta.column("t_min")).as_py()
                    if f is not None and f.timestamp() < end:
                        found.append(f.timestamp())
        if ds is not None:
            where = f"ts < {_ts_lit(end)} AND {selector.sql(sql_quote)}"
            if tier == RAW:
                where += " AND quality < 2"
            first = pc.min(ds.to_table(filter=where, columns=["ts"]).column("ts")).as_py()
            if first is not None:
                found.append(first.timestamp())
        return min(found) if found else None

    def query(self, q: TimeSeriesQuery) -> pa.Table:
        from twin.timeseries.query import run_query

        return run_query(self, q)

    # --- tiers and retention --------------------------------------------------------
    def replace_partials(
        self, tier: str, selector: Selector, start: float, end: float, rows: pa.Table
    ) -> None:
        """The tier's partials of ``selector`` in ``[start, end)`` become ``rows``, stored
        as partial chunks (``partial_chunks.py``: one row per series and window)."""
        with self._lock:
            self._replace_tier(tier, selector, start, end, rows)

    def rollup(
        self, source: str, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> int:
        """``replace_partials(tier, ..., aggregate(source, ..., bucket))`` without building
        the partials' string columns (what ``RetentionManager.downsample`` calls when a
        store has it); the number of partial rows written. From raw chunks alone (every
        closed window: the common case) the partial chunks are built series by series
        (``partial_chunks.from_raw_chunks``); otherwise through ``_partials``."""
        built = None
        if source == RAW and self.chunk_seconds is not None:
            built = self._rollup_raw_chunks(selector, start, end, bucket)
        if built is not None:
            n = int(np.sum(built.column("n").to_numpy())) if built.num_rows else 0
            rows = PARTIAL_SCHEMA.empty_table()
        else:
            rows = self._partials(source, selector, start, end, bucket, dictionary=True)
            n = rows.num_rows
        with self._lock:
            if n == 0 and tier not in self.tiers():
                return 0  # nothing to replace, no empty tier
            self._replace_tier(tier, selector, start, end, rows, built)
        return n

    def _rollup_raw_chunks(
        self, selector: Selector, start: float, end: float, bucket: float
    ) -> pa.Table | None:
        """PCHUNK_SCHEMA rows (``cid`` unset) of ``selector``'s partials in ``[start, end)``
        when every raw point there is in chunks and none is a string; else None. The chunk
        rows are read in groups of whole series of ~``aggregate_rows`` points."""
        from twin.timeseries import chunks as ck

        ds, snap = self._raw_snapshot(start, end)
        if ds is not None:
            return None  # rows of an open window: the general path merges them
        if snap is None:
            return PCHUNK_SCHEMA.empty_table()
        cds, cat = snap
        meta = self._chunks.select(selector, start, end, blobs=False, snap=snap)
        if meta.num_rows == 0:
            return PCHUNK_SCHEMA.empty_table()
        order = np.asarray(
            pa.compute.sort_indices(
                meta, sort_keys=[(c, "ascending") for c in (*SERIES_COLUMNS, "t_min")]
            ).to_numpy(),
            dtype=np.int64,
        )
        meta = meta.take(pa.array(order))
        offsets = self._catalog_offsets(cat, meta)
        sid = ck.series_ids(meta)
        n = np.asarray(meta.column("n").to_numpy(), dtype=np.int64)
        firsts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
        cum = np.r_[0, np.cumsum(n)]
        cuts = [0]
        for i in firsts[1:].tolist():  # per series, not per point
            if cum[i] - cum[cuts[-1]] >= self.aggregate_rows:
                cuts.append(i)
        cuts.append(meta.num_rows)
        parts = []
        for a, b in itertools.pairwise(cuts):
            rows = self._chunks.blobs(
                cds, meta.slice(a, b - a).select(ck.META_COLUMNS), offsets[a:b], cat
            )
            part = from_raw_chunks(rows, start, end, bucket, start, 0)
            if part is None:
                return None
            parts.append(part)
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    _TIER_PENDING = "pchunk_commit:"

    def _replace_tier(
        self,
        tier: str,
        selector: Selector,
        start: float,
        end: float,
        rows: pa.Table,
        built: pa.Table | None = None,
    ) -> None:
        """See ``replace_partials``; the caller holds ``_lock``. A tier table of the row
        layout (a store from before) loses its rows in the window first; then the chunk
        rows are swapped: the new ones added, the old ones in the window deleted (rows
        reaching outside it are rewritten without it), crash-safe through a note in
        ``meta.json`` (``_recover_tier_commits``). ``built``: the window's partial chunks
        already encoded (``rollup``; ``rows`` is then empty)."""
        ct = self._pchunks(tier)
        self._check_space(ct.path.parent)
        pred = f"{_ts_pred(start, end)} AND {selector.sql(sql_quote)}"
        tbl = self._table(tier)
        if tbl is not None and tbl.count_rows(pred):
            tbl.delete(pred)
            self._datasets.pop(tier, None)
            self._appends[tier] = self._appends.get(tier, 0) + 1
        old_cids: list[int] = []
        new = [rows] if rows.num_rows else []
        if ct.exists():
            ds, cat = ct.snapshot()
            meta = ct.select(selector, start, end, blobs=False, snap=(ds, cat))
            if meta.num_rows:
                old_cids = [int(c) for c in meta.column("cid").to_pylist()]
                inside = within(meta, start, end)
                if not inside.all():
                    sub = meta.filter(pa.array(~inside))
                    old = ct.blobs(ds, sub.select(PMETA_COLUMNS), self._catalog_offsets(cat, sub))
                    dec = decode_partial_chunks(old)
                    t = np.asarray(dec.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)
                    out = (t < round(start * 1e6)) | (t >= round(end * 1e6))
                    if out.any():
                        new.append(dec.filter(pa.array(out)))
        res = _tier_resolution(tier)
        cid = ct.next_cid()
        encoded = []
        if built is not None and built.num_rows:
            k = built.num_rows
            i = built.schema.get_field_index("cid")
            ids = pa.array(np.arange(cid, cid + k), pa.int64())
            encoded.append(built.set_column(i, built.schema.field(i), ids))
            cid += k
        for part in new:
            ws = start if part is rows else _min_ts(part)
            encoded.append(build_partial_chunks(part, ws, res, cid))
            cid += encoded[-1].num_rows
        add = pa.concat_tables(encoded) if encoded else PCHUNK_SCHEMA.empty_table()
        if add.num_rows == 0 and not old_cids:
            return
        first = int(add.column("cid")[0].as_py()) if add.num_rows else 0
        key = self._TIER_PENDING + tier
        self.set_meta(key, json.dumps({"new": [first, first + add.num_rows], "old": old_cids}))
        try:
            ct.append(add)
        except OSError as exc:
            raise StorageError(f"time-series write to {tier} failed: {exc}") from exc
        ct.delete_cids(old_cids)
        self.set_meta(key, "")
        self._tier_chunk_appends.add(tier)

    def _recover_tier_commits(self) -> None:
        """Finish a tier chunk swap a crash interrupted (see ``_replace_tier``): when the
        new rows made it, the old ones go; when they did not, the old ones stay."""
        for key, raw in list(self._meta.items()):
            if not key.startswith(self._TIER_PENDING) or not raw:
                continue
            ct = self._pchunks(key[len(self._TIER_PENDING) :])
            note = json.loads(raw)
            lo, hi = note["new"]
            _ds, cat = ct.snapshot()
            cids = set(cat.column("cid").to_pylist()) if cat.num_rows else set()
            if hi == lo or any(lo <= c < hi for c in cids):
                ct.delete_cids(note["old"])
            log.warning("timeseries: recovered an interrupted rollup commit (%s)", key)
            self.set_meta(key, "")

    def delete_before(self, tier: str, selector: Selector, before: float) -> int:
        with self._lock:
            tbl = self._table(tier)
            n = 0
            if tbl is not None:
                pred = f"ts < {_ts_lit(before)} AND {selector.sql(sql_quote)}"
                n = tbl.count_rows(pred)
                if n:
                    tbl.delete(pred)
                    self._datasets.pop(tier, None)
            if tier == RAW and self._chunks.exists():
                n += self._delete_chunks_before(selector, before)
            elif tier != RAW and self._pchunks(tier).exists():
                ct = self._pchunks(tier)

                def partials_of_selector() -> int:
                    rows = ct.select(selector, TS_MIN, _TS_FAR, blobs=False)
                    return int(np.sum(rows.column("n").to_numpy())) if rows.num_rows else 0

                if ct.select(selector, TS_MIN, before, blobs=False).num_rows:
                    had = partials_of_selector()
                    self._replace_tier(tier, selector, TS_MIN, before, PARTIAL_SCHEMA.empty_table())
                    n += had - partials_of_selector()
            return int(n)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._meta[key] = value
            tmp = self._meta_path.with_suffix(".tmp")
            try:
                with open(tmp, "w") as f:
                    json.dump(self._meta, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._meta_path)
            except OSError as exc:
                raise StorageError(f"cannot save time-series metadata: {exc}") from exc

    # --- the series-chunk layout: compaction of closed ranges ------------------------
    _PENDING = "chunk_commit"
    compact_rows = 3_000_000
    """At most about this many raw rows are turned into chunks per pass (a store of the
    row layout with months of data migrates window by window, in bounded memory)."""

    def _commit_chunks(
        self, rows: pa.Table, old_cids: list[int], delete_raw: str | None, cutoff: float | None
    ) -> None:
        """Add chunk ``rows``, delete the raw rows ``delete_raw`` (a predicate) and the
        chunk rows ``old_cids``, in that order; the caller holds ``_lock``. Crash-safe
        through a note in ``meta.json`` (``_recover_chunk_commit``): a crash leaves either
        the old rows or the new ones, never both."""
        first = int(rows.column("cid")[0].as_py()) if rows.num_rows else 0
        note = {"new": [first, first + rows.num_rows], "old": old_cids, "cutoff": cutoff}
        self.set_meta(self._PENDING, json.dumps(note))
        self._chunks.append(rows)
        if delete_raw is not None:
            self._table(RAW).delete(delete_raw)
            self._datasets.pop(RAW, None)
            self._appends[RAW] = self._appends.get(RAW, 0) + 1  # its fragments need upkeep
        self._chunks.delete_cids(old_cids)
        self.set_meta(self._PENDING, "")

    def _recover_chunk_commit(self) -> None:
        """Finish or undo a chunk commit a crash interrupted (see ``_commit_chunks``)."""
        raw = self._meta.get(self._PENDING)
        if not raw:
            return
        note = json.loads(raw)
        lo, hi = note["new"]
        cutoff = note.get("cutoff")
        _ds, cat = self._chunks.snapshot()
        cids = set(cat.column("cid").to_pylist()) if cat.num_rows else set()
        if cutoff is not None:  # raw rows moved: were the new rows added, raw deleted?
            tbl = self._table(RAW)
            undo = not any(lo <= c < hi for c in cids) or (
                tbl is not None and tbl.count_rows(f"ts < {_ts_lit(cutoff)}") > 0
            )
        else:  # chunk rows rewritten: were the old ones deleted?
            undo = any(c in cids for c in note["old"])
        if undo:
            self._chunks.delete_cids((lo, hi))
        else:
            self._chunks.delete_cids(note["old"])
        log.warning("timeseries: %s an interrupted chunk commit", "undid" if undo else "finished")
        self.set_meta(self._PENDING, "")

    def _to_merge(self, cat: pa.Table, new: pa.Table, closed_us: int) -> np.ndarray:
        """Catalogue offsets of the chunk rows to merge in this pass: in windows that are
        closed (start + ``chunk_seconds`` <= ``closed_us``), every row of a (series,
        window) that gets new points or has more than one row. A closed window then holds
        one row per series; an open one may hold several (one per pass) until it closes."""
        import pyarrow.compute as pc

        if cat.num_rows == 0:
            return np.zeros(0, dtype=np.int64)
        assert self.chunk_seconds is not None
        chunk_us = round(self.chunk_seconds * 1_000_000)
        cat_w = np.array(cat.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64) // chunk_us
        closed = (cat_w + 1) * chunk_us <= closed_us
        # windows closed since the last pass, and windows that get new (late) points: the
        # others were merged already (a catalogue of months is not re-keyed every minute)
        look = closed & ((cat_w + 1) * chunk_us > self._merged_upto)
        if new.num_rows:
            new_wins = np.unique(
                np.array(new.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64) // chunk_us
            )
            look |= closed & np.isin(cat_w, new_wins)
        if not look.any():
            return np.zeros(0, dtype=np.int64)

        def keys(t: pa.Table, window: np.ndarray) -> pa.Array:
            cols = [t.column(c).cast(pa.string()) for c in SERIES_COLUMNS]
            return pc.binary_join_element_wise(*cols, pa.array(window).cast(pa.string()), "\x1f")

        idx = np.flatnonzero(look)
        ck = keys(cat.take(pa.array(idx)), cat_w[idx])
        counts = pc.value_counts(ck)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        hit = np.asarray(pc.is_in(ck, value_set=dup).to_numpy(zero_copy_only=False), dtype=bool)
        if new.num_rows:
            new_w = (
                np.array(new.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64) // chunk_us
            )
            if new_w.min() <= cat_w[idx].max():  # else only newer windows: the common case
                nk = pc.unique(keys(new, new_w))
                late = pc.is_in(ck, value_set=nk).to_numpy(zero_copy_only=False)
                hit |= np.asarray(late, dtype=bool)
        return idx[hit]

    l0_rows = 1_000_000
    """The open window's rows older than ``chunk_grace`` become chunk rows once there are
    this many of them (always under ``maintain(force=True)``): the row layout then holds
    at most about this many points plus the grace period, and a query of recent data
    reads chunks too. Such rows are merged into one per series when the window closes."""

    def compact_chunks(self, now: float | None = None, *, force: bool = False) -> int:
        """Move raw rows older than ``chunk_grace`` (on the clock and in the data: the
        newest timestamp written) into the chunk table; returns the points moved.

        A window is *closed* once its end is older than that edge: its rows, late points
        and earlier rows of it are merged into one chunk row per series. Rows of the open
        window move when ``l0_rows`` of them are due (or ``force``), as additional rows.
        Runs under the maintenance lock (``maintain``) beside the writer: the rows are
        read and encoded without ``_lock``; the commit takes it and re-counts, and a write
        into the range meanwhile makes the pass start over."""
        import lance

        if self.chunk_seconds is None:
            return 0
        chunk = self.chunk_seconds
        with self._lock:
            if self._table(RAW) is None:
                return 0
            lo, hi = self._raw_bounds()
            _ds, cat = self._chunks.snapshot()
            uri = str(self._where[RAW] / f"{RAW}.lance")
        newest = hi / 1e6 if hi is not None else None
        if cat.num_rows:
            import pyarrow.compute as pc

            t_max = pc.max(cat.column("t_max")).as_py().timestamp()
            newest = t_max if newest is None else max(newest, t_max)
        if newest is None:
            return 0
        edge = min(time.time() if now is None else now, newest) - self.chunk_grace
        closed = (edge // chunk) * chunk  # windows before this are closed
        closed_us = round(closed * 1e6)
        cutoff = edge
        if lo is None or lo >= round(cutoff * 1e6):
            lo_merge = self._to_merge(cat, RAW_SCHEMA.empty_table(), closed_us)
            if lo_merge.size == 0:
                self._merged_upto = max(self._merged_upto, closed_us)
                return 0
        moved = 0
        for _attempt in range(5):
            ds = lance.dataset(uri)
            pass_end = cutoff
            if not force and ds.count_rows(f"ts < {_ts_lit(cutoff)}") < self.l0_rows:
                pass_end = closed  # the open window waits until enough of it is due
            # a pass ends at a window edge after ~``compact_rows`` rows (by the ts column)
            if ds.count_rows() > self.compact_rows:
                ts = np.asarray(
                    ds.to_table(columns=["ts"], filter=f"ts < {_ts_lit(pass_end)}")
                    .column("ts")
                    .cast(pa.int64())
                    .to_numpy(),
                    dtype=np.int64,
                )
                if ts.size > self.compact_rows:
                    ts.sort()
                    at = ts[self.compact_rows] / 1e6
                    pass_end = min(pass_end, (at // chunk + 1) * chunk)
            pred = f"ts < {_ts_lit(pass_end)}"
            table = ds.to_table(filter=pred, columns=self._raw_columns(ds))
            n0 = table.num_rows
            new = _decode_values(table).select(RAW_SCHEMA.names).cast(RAW_SCHEMA)
            cds, cat = self._chunks.snapshot()
            merge = self._to_merge(cat, new, closed_us)
            if n0 == 0 and merge.size == 0:
                self._merged_upto = max(self._merged_upto, closed_us)
                break
            old_cids: list[int] = []
            if merge.size:
                old = self._chunks.blobs(cds, cat.take(pa.array(merge)), merge, cat)
                old_cids = [int(c) for c in old.column("cid").to_pylist()]
                new = pa.concat_tables([new, decode_chunks(old)])
            rows = build_chunks(new, chunk, self._chunks.next_cid())
            with self._lock:
                tbl = self._table(RAW)
                if tbl.count_rows(pred) != n0 or self._chunks.snapshot()[1] is not cat:
                    continue  # written meanwhile: read again
                self._check_space(self.path)
                self._commit_chunks(rows, old_cids, pred if n0 else None, pass_end if n0 else None)
                if pass_end >= closed:
                    self._merged_upto = max(self._merged_upto, closed_us)
                if n0:
                    self._raw_lo = max(self._raw_lo or 0, round(pass_end * 1e6))
                    if tbl.count_rows() == 0:
                        self._raw_lo = self._raw_hi = None
            moved += n0
            log.info(
                "timeseries: %d raw points before %s (and %d chunk rows) now in %d chunk rows",
                n0,
                pass_end,
                len(old_cids),
                rows.num_rows,
            )
            if pass_end >= cutoff or (pass_end >= closed and not force):
                break
        return moved

    day_seconds = 86_400.0
    """Once a day has closed, its chunk rows of one series (four 6-hour windows) merge
    into one (``merge_days``): a day row of ~1,000 points instead of four of ~240 holds
    the per-row cost (catalogue columns, Lance row, pcodec headers: ~80 B) once, ~0.4 B/pt
    less on the realistic data, and a one-day read takes one row. The open day keeps its
    6-hour windows, so recent data leaves the row layout as soon as before."""

    def _closed_day_us(self, cat: pa.Table, raw_hi: int | None, now: float | None) -> int:
        """Days before this (us) have closed: the clock and the newest point (chunks and
        raw rows), less ``chunk_grace``, floored to a day."""
        day_us = round(self.day_seconds * 1_000_000)
        t_max = np.asarray(cat.column("t_max").cast(pa.int64()).to_numpy(), dtype=np.int64)
        newest = int(t_max.max()) if t_max.size else (raw_hi or 0)
        if raw_hi is not None:
            newest = max(newest, raw_hi)
        clock = round((time.time() if now is None else now) * 1_000_000)
        edge = min(clock, newest) - round(self.chunk_grace * 1_000_000)
        return (edge // day_us) * day_us

    def merge_days(self, now: float | None = None) -> int:
        """Merge each series' chunk rows in every closed day into one row, in passes of at
        most ``compact_rows`` points (whole series-days; bounded memory); returns the rows
        merged away. A late point into a merged day becomes a row of its own (``_to_merge``
        may split the day back into windows) and is merged on the next call."""
        if self.chunk_seconds is None or self.chunk_seconds >= self.day_seconds:
            return 0
        from twin.timeseries.chunks import series_ids

        day_us = round(self.day_seconds * 1_000_000)
        merged = 0
        for _attempt in range(64):
            with self._lock:
                cds, cat = self._chunks.snapshot()
                _lo, hi = self._raw_bounds() if self._table(RAW) is not None else (None, None)
            if cat.num_rows < 2:
                break
            ts = np.asarray(cat.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)
            day = ts // day_us
            closed = (day + 1) * day_us <= self._closed_day_us(cat, hi, now)
            if not closed.any():
                break
            key = series_ids(cat) * (int(day.max() - day.min()) + 1) + (day - day.min())
            keys, counts = np.unique(key[closed], return_counts=True)
            multi = closed & np.isin(key, keys[counts > 1])
            if not multi.any():
                break
            idx = np.flatnonzero(multi)
            idx = idx[np.argsort(key[idx], kind="stable")]
            n = np.asarray(cat.column("n").to_numpy(), dtype=np.int64)[idx]
            k = key[idx]
            last = np.r_[k[1:] != k[:-1], True]  # a series-day ends here
            fits = np.flatnonzero(last & (np.cumsum(n) <= self.compact_rows))
            idx = idx[: (int(fits[-1]) + 1 if fits.size else int(np.flatnonzero(last)[0]) + 1)]
            old = self._chunks.blobs(cds, cat.take(pa.array(idx)), idx, cat)
            old_cids = [int(c) for c in old.column("cid").to_pylist()]
            rows = build_chunks(decode_chunks(old), self.day_seconds, self._chunks.next_cid())
            with self._lock:
                if self._chunks.snapshot()[1] is not cat:
                    continue  # compaction or retention committed meanwhile: look again
                self._check_space(self.path)
                self._commit_chunks(rows, old_cids, None, None)
            merged += len(old_cids) - rows.num_rows
            log.info(
                "timeseries: %d chunk rows of closed days merged into %d",
                len(old_cids),
                rows.num_rows,
            )
        return merged

    def _delete_chunks_before(self, selector: Selector, before: float) -> int:
        """Retention on the chunk table (the caller holds ``_lock``): chunk rows wholly
        before ``before`` are deleted, rows that straddle it are rewritten without the
        points before it."""
        ds, cat = self._chunks.snapshot()
        meta = self._chunks.select(selector, TS_MIN, before, blobs=False, snap=(ds, cat))
        if meta.num_rows == 0:
            return 0
        t_max = np.asarray(meta.column("t_max").cast(pa.int64()).to_numpy(), dtype=np.int64)
        n = np.asarray(meta.column("n").to_numpy(), dtype=np.int64)
        whole = t_max < round(before * 1e6)
        cids = [int(c) for c in meta.column("cid").to_pylist()]
        removed = int(n[whole].sum())
        straddle = np.flatnonzero(~whole)
        rows = CHUNK_SCHEMA.empty_table()
        if straddle.size:
            # each row keeps its window (a day row stays one): only its points before the
            # cut go, its kept points re-encoded (``trim_chunks``); rows wholly before it
            # are only deleted
            sub = meta.take(pa.array(straddle))
            offsets = self._catalog_offsets(cat, sub)
            old = self._chunks.blobs(ds, sub.select(META_COLUMNS), offsets, cat)
            rows, cut = trim_chunks(old, round(before * 1e6), self._chunks.next_cid())
            removed += cut
        self._commit_chunks(rows, cids, None, None)
        return removed

    # --- maintenance ----------------------------------------------------------------
    def _cluster(
        self, tier: str, ds: Any, *, everything: bool = False, written: set[str] | None = None
    ) -> Any:
        """Rewrite the small fragments (appends, earlier small rewrites) into fragments of up
        to ``cluster_rows`` rows in ``cluster_order``, atomically: one ``Rewrite`` commit
        replaces the old fragments by the new ones, so a reader sees either (a crash before
        the commit leaves only unreferenced files, which cleanup removes). Indexes do not
        cover the new fragments until ``optimize_indices`` (run right after); until then
        Lance scans them unindexed, still correctly. Returns the new dataset version.

        Fragments of ``cluster_rows // 2`` rows or more are left alone, and so is a group
        that is one fragment already: a single append is sorted by (device, metric, ts).
        ``everything``: every fragment (once, when a table of the old layout loses its
        device BITMAP: its big fragments were never clustered, and a ZONEMAP over them would
        read ~100x the rows a one-series query needs). ``written`` collects the data files
        of the new fragments (see ``_compact_deleted``)."""
        import lance
        from lance import LanceOperation
        from lance.fragment import write_fragments

        limit = self.cluster_rows // 2
        small = [f for f in ds.get_fragments() if everything or f.metadata.physical_rows < limit]
        groups: list[list[Any]] = []
        rows = 0
        for f in small:
            if not groups or rows >= self.cluster_rows:
                groups.append([])
                rows = 0
            groups[-1].append(f)
            rows += f.count_rows()
        schema = ds.schema
        rewrites = []
        for group in groups:
            if len(group) < 2 and not everything:
                continue
            table = pa.concat_tables([f.to_table() for f in group])
            if table.num_rows:
                table = table.take(pa.array(cluster_order(table, self.cluster_run)))
            new = write_fragments(
                _clean_dictionaries(table, schema),
                ds,
                schema=schema,
                max_rows_per_file=max(self.cluster_rows, table.num_rows),
                data_storage_version=ds.data_storage_version,
            )
            if written is not None:
                written.update(d.path for frag in new for d in frag.files)
            rewrites.append(
                LanceOperation.RewriteGroup(
                    old_fragments=[f.metadata for f in group], new_fragments=new
                )
            )
        if not rewrites:
            return ds
        op = LanceOperation.Rewrite(groups=rewrites, rewritten_indices=[])
        return lance.LanceDataset.commit(ds, op, read_version=ds.version)

    def _compact_deleted(self, ds: Any, known: set[int], written: set[str]) -> None:
        """Rewrite the fragments with >10 % deleted rows (retention, rollup re-runs), merged
        with what is left small around them, but never a fragment appended while this
        maintenance ran (neither in ``known``, the fragment ids it started from, nor written
        by its ``_cluster``): compaction concatenates without clustering, and a fragment of
        ``cluster_rows // 2`` rows or more is never clustered later. (With maintenance
        beside the writer, ``compact_files`` over the whole table merged the appends made
        during a rewrite into unclustered fragments: 10 M points went from 1.59 to 1.79
        bytes/point and one-series/one-day p50 from ~10 to ~40 ms, measured.)"""
        from lance.optimize import Compaction

        fragments = ds.get_fragments()
        if not any(f.metadata.deletion_file is not None for f in fragments):
            return  # nothing to materialise; small fragments are ``_cluster``'s
        plan = Compaction.plan(ds, {"target_rows_per_fragment": self.cluster_rows // 2})

        def ours(f: Any) -> bool:
            return f.id in known or any(d.path in written for d in f.files)

        tasks = [t for t in plan.tasks if all(ours(f) for f in t.fragments)]
        if tasks:
            Compaction.commit(ds, [t.execute(ds) for t in tasks])

    @staticmethod
    def _has_device_bitmap(ds: Any) -> bool:
        return any(
            d.field_names[:1] == ["device"] and d.index_type.upper() == "BITMAP"
            for d in ds.describe_indices()
        )

    @staticmethod
    def _ensure_indexes(ds: Any) -> None:
        current = {d.field_names[0] if d.field_names else "": d for d in ds.describe_indices()}
        for col, kind in _INDEXES:
            have = current.get(col)
            if have is not None and have.index_type.upper() != kind:
                # the old layout's device BITMAP (~2 bytes/row): replace it
                ds.drop_index(have.name)
                have = None
            if have is None:
                ds.create_scalar_index(col, kind)

    def _maintain_table(self, tier: str, keep: timedelta) -> None:
        """Maintain one table; the caller holds ``_maint_lock`` (not necessarily ``_lock``).
        Works on its own dataset handle, so appends go on meanwhile (see the module
        docstring); ``_lock`` is taken only briefly, at the start and the end."""
        import lance

        with self._lock:
            tbl = self._table(tier)
            if tbl is None:
                return
            self._appends[tier] = 0
            uri = str(self._where[tier] / f"{tier}.lance")
        for attempt in range(5):
            try:
                ds = lance.dataset(uri)
                # first drop what old versions alone hold (e.g. fragments a delete emptied):
                # on a full disk that is the space the compaction below needs
                ds.cleanup_old_versions(older_than=keep)
                known = {f.fragment_id for f in ds.get_fragments()}
                written: set[str] = set()
                ds = self._cluster(
                    tier, ds, everything=self._has_device_bitmap(ds), written=written
                )
                self._compact_deleted(ds, known, written)
                if ds.count_rows() > 0:
                    self._ensure_indexes(ds)
                    ds.optimize.optimize_indices()
                # the table handle (and the cached dataset readers get) may be on a version
                # older than ``keep`` that the rewrite replaced: move it to the latest
                # before the cleanup below can delete that version's files
                with self._lock:
                    tbl.checkout_latest()
                    self._datasets.pop(tier, None)
                ds.cleanup_old_versions(older_than=keep)
                return
            except Exception as exc:  # maintenance never breaks the write path
                if attempt == 4:
                    log.warning("timeseries: maintenance of %s failed: %s", tier, exc)
                    return
                log.info("timeseries: maintenance of %s conflicted (%s); retrying", tier, exc)
                time.sleep(0.05 * (attempt + 1))

    def maintain(self, *, force: bool = False, keep: timedelta | None = None) -> None:
        """Maintain every table with appends not maintained yet (``force``: every table).
        Safe to run from another thread while writes go on; ``keep``: override
        ``keep_versions_for``."""
        keep = self.keep_versions_for if keep is None else keep
        with self._maint_lock:
            try:
                self.compact_chunks(force=force)
                self.merge_days()
            except Exception as exc:  # maintenance never breaks the write path
                log.warning("timeseries: chunk compaction failed: %s", exc)
            with self._lock:
                tiers = [t for t in self.tiers() if force or self._appends.get(t, 0) > 0]
            for tier in tiers:
                self._maintain_table(tier, keep)
            if force or RAW in tiers:
                try:
                    self._chunks.maintain(keep)
                except Exception as exc:
                    log.warning("timeseries: maintenance of %s failed: %s", CHUNKS, exc)
            with self._lock:
                chunked = [
                    t
                    for t in self.tiers()
                    if t != RAW
                    and (force or t in self._tier_chunk_appends)
                    and self._pchunks(t).exists()
                ]
                self._tier_chunk_appends.difference_update(chunked)
            for tier in chunked:
                try:
                    self._pchunks(tier).maintain(keep)
                except Exception as exc:
                    log.warning("timeseries: maintenance of %s chunks failed: %s", tier, exc)

    def resize_chunk_cache(self, cache_bytes: int) -> None:
        """Change ``chunk_cache_bytes`` of an open store (0: no cache; entries beyond the new
        size are dropped, least recently used first)."""
        self._chunks.resize_cache(cache_bytes)

    def reclaim(self) -> None:
        """Compact and drop every old version now (after a retention pass)."""
        self.maintain(force=True, keep=timedelta(0))

    def stats(self) -> StorageStats:
        with self._lock:
            out = []
            for tier in self.tiers():
                tbl = self._table(tier)
                ct = self._pchunks(tier) if tier != RAW else None
                if tbl is None and (ct is None or not ct.exists()):
                    continue
                rows = int(tbl.count_rows()) if tbl is not None else 0
                # a tier row is one point of that tier's (coarser) series
                size = _dir_size(self._where[tier] / f"{tier}.lance") if tbl is not None else 0
                points = rows
                if ct is not None and ct.exists():
                    # a partial-chunk row holds ``n`` partials (points of the tier)
                    _ds, cat = ct.snapshot()
                    rows += cat.num_rows
                    points += int(np.sum(cat.column("n").to_numpy())) if cat.num_rows else 0
                    size += _dir_size(ct.path)
                if tier == RAW and self._chunks.exists():
                    # raw = recent rows + the chunk rows of closed ranges
                    _ds, cat = self._chunks.snapshot()
                    rows += cat.num_rows
                    points += self._chunks.points()
                    size += _dir_size(self._chunks.path)
                out.append(TierStats(tier, rows, points, size))
            # the tightest of the (one or two) disks: that is where writes fail first
            usages = [shutil.disk_usage(self.path)]
            if self.cold_path is not None:
                usages.append(shutil.disk_usage(self.cold_path))
            nearly = any(
                u.free < max(self.min_free_bytes * 2, u.total * self.nearly_full_fraction)
                for u in usages
            )
            usage = min(usages, key=lambda u: u.free)
            return StorageStats(tuple(out), usage.free, usage.total, nearly)

    def close(self) -> None:
        with self._lock:
            self._tier_chunks.clear()
            self._tables.clear()
            self._where.clear()
            self._datasets.clear()
