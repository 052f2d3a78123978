"""LanceDB time-series store in the state directory.

Layout (``<state>/timeseries/``): a LanceDB database with one table per tier —
``raw`` (RAW_SCHEMA, one row per point) and ``agg_<seconds>s`` (PARTIAL_SCHEMA) — plus
``meta.json`` (tier catalogue and downsampling watermarks, replaced atomically).

Why this shape (measured, see issue 6): one row per point ingests at ~2 M points/s from
Arrow batches of ≥10k rows, and with a ZONEMAP index on ``ts`` plus BITMAP indexes on
``device`` and ``metric`` the index lookup for one series over a day takes ~1-3 ms. What
dominated after that was *taking* the non-filter columns row by row: plain uint8 and
low-cardinality string pages cost ~10x more per taken row than float64 ones. So ``site``,
``grp``, ``tags``, ``kind`` and ``quality`` are stored dictionary-encoded
(``LANCE_RAW_SCHEMA``): one-series/one-day p50 went from ~17-20 ms to ~4-5 ms at 1 M
points (clustering the table by series after the fact gained only ~1.5x more and needs a
non-atomic rewrite, so it was not adopted). Each batch is sorted by (device, metric, ts)
so a series' rows sit together inside a fragment. Value columns are zstd-compressed.

Aggregates (queries and downsampling) read the index-pruned rows and bucket them in numpy
(``partials.py``: one sort + ``reduceat``), ~6x faster than DataFusion's GROUP BY with
ordered ``first_value``.

Small appends are what kills Lance (every append is a fragment and a manifest), so:

* the Trio writer (``writer.py``) batches points (default 10k points or 1 s);
* every ``compact_every`` appends to a table (default 32) the store compacts the small
  fragments, refreshes the indexes and removes versions older than ``keep_versions_for``
  (default 1 minute; old versions are only useful to concurrent readers);
* ``maintain(force=True)`` does the same for every table (the retention pass calls it
  after deleting, which is what actually gives the space back).

Maintenance can conflict with a concurrent commit; it is retried a few times, and a
failure is logged, never raised into the write path. Every public method takes one lock,
and the store keeps one handle per table, refreshed (``checkout_latest``) after
maintenance, so readers always see the latest commit.

Disk full: a write first checks free space (``min_free_bytes``) and raises
``StorageError`` without touching the table; an ``OSError`` during the append is mapped to
``StorageError``. Lance commits by writing a new manifest last, so a failed append leaves
the previous version intact (the data files it wrote are orphans that cleanup removes).
"""

from __future__ import annotations

import contextlib
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
from twin.timeseries.base import (
    PARTIAL_SCHEMA,
    RAW,
    RAW_SCHEMA,
    SERIES_COLUMNS,
    DataPoint,
    Record,
    Selector,
    StorageStats,
    TierStats,
    TimeSeriesQuery,
    records_to_table,
    sql_quote,
)

log = logging.getLogger(__name__)

_INDEXES = (("ts", "ZONEMAP"), ("device", "BITMAP"), ("metric", "BITMAP"))

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
    [f if f.name in _DICT_COLUMNS else _lance_field(f) for f in PARTIAL_SCHEMA]
)
"""The raw table on disk: ``site``, ``grp``, ``tags``, ``kind`` and ``quality``
dictionary-encoded. They are not filter columns of the common query, so Lance *takes* them
row by row after the index lookup, and plain low-cardinality pages are expensive to take
from; dictionary pages made a one-series/one-day read ~3x faster (measured, issue 6).
Stores created before keep their plain schema: appends are converted to the table's."""


_MAX_EXP = 6
_POW10 = 10.0 ** np.arange(_MAX_EXP + 1)
VALUE_SQL = "COALESCE(value, CAST(value_dec AS DOUBLE) / power(10.0, CAST(value_exp AS DOUBLE)))"
"""The numeric value as a SQL expression over the decimal layout (see ``_encode_values``)."""


def _encode_values(table: pa.Table) -> pa.Table:
    """Decimal layout of the ``value`` column: a number with at most ``_MAX_EXP`` decimals
    (what sensors report: ``21.53``) is stored as ``value_dec / 10**value_exp``
    (``2153``, ``2``) and ``value`` is null; any other number (and NaN, inf, -0.0) stays in
    ``value`` as it is. Exact: a row is encoded only when ``dec / 10**exp`` gives back the
    very same float64, which is how it is decoded. Integers bit-pack where float64 does
    not compress: 4.9 -> 1.4 bytes/point on the benchmark's data (measured, issue 6)."""
    col = table.column("value")
    n = table.num_rows
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    v = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    exp = np.full(n, -1, dtype=np.int8)
    dec = np.zeros(n, dtype=np.int64)
    todo = valid & ~((v == 0) & np.signbit(v))
    with np.errstate(all="ignore"):
        for k in range(_MAX_EXP + 1):
            if not todo.any():
                break
            d = np.round(v * _POW10[k])
            ok = todo & (np.abs(d) < 2.0**53) & (d / _POW10[k] == v)
            exp[ok] = k
            dec[ok] = d[ok].astype(np.int64)
            todo &= ~ok
    enc = exp >= 0
    i = table.schema.get_field_index("value")
    table = table.set_column(
        i, table.schema.field(i), pa.array(v, pa.float64(), mask=~(valid & ~enc))
    )
    table = table.append_column("value_dec", pa.array(dec, pa.int64(), mask=~enc))
    return table.append_column("value_exp", pa.array(np.maximum(exp, 0).astype(np.uint8)))


def _decode_values(table: pa.Table) -> pa.Table:
    """Inverse of ``_encode_values`` (a no-op for tables read from the old layout)."""
    if "value_dec" not in table.column_names:
        return table
    import pyarrow.compute as pc

    dec = table.column("value_dec")
    if dec.null_count < len(dec):
        exp = np.asarray(
            table.column("value_exp").cast(pa.uint8()).to_numpy(zero_copy_only=False),
            dtype=np.int64,
        )
        d = np.asarray(dec.to_numpy(zero_copy_only=False), dtype=np.float64)
        value = pc.if_else(
            dec.is_valid(), pa.array(d / _POW10[exp], pa.float64()), table.column("value")
        )
        i = table.schema.get_field_index("value")
        table = table.set_column(i, table.schema.field(i), value)
    return table.drop_columns(["value_dec", "value_exp"])


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


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


class LanceStore:
    """``TimeSeriesStore`` on LanceDB. Synchronous and thread-safe (one lock)."""

    def __init__(
        self,
        path: str | Path,
        *,
        compact_every: int = 32,
        keep_versions_for: timedelta = timedelta(minutes=1),
        min_free_bytes: int = 64 * 1024 * 1024,
        nearly_full_fraction: float = 0.05,
    ) -> None:
        import lancedb

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.compact_every = compact_every
        self.keep_versions_for = keep_versions_for
        self.min_free_bytes = min_free_bytes
        self.nearly_full_fraction = nearly_full_fraction
        self._db = lancedb.connect(str(self.path))
        self._lock = threading.RLock()
        self._tables: dict[str, Any] = {}
        self._datasets: dict[str, Any] = {}
        self._appends: dict[str, int] = {}
        self._schemas: dict[str, pa.Schema] = {}
        self._meta_path = self.path / "meta.json"
        self._meta: dict[str, str] = (
            json.loads(self._meta_path.read_text()) if self._meta_path.exists() else {}
        )

    # --- tables ---------------------------------------------------------------------
    def _table(self, tier: str, create: bool = False) -> Any:
        """The table handle, or None when it does not exist and ``create`` is false."""
        tbl = self._tables.get(tier)
        if tbl is not None:
            return tbl
        try:
            tbl = self._db.open_table(tier)
        except (ValueError, FileNotFoundError, RuntimeError):
            if not create:
                return None
            schema = LANCE_RAW_SCHEMA if tier == RAW else LANCE_PARTIAL_SCHEMA
            tbl = self._db.create_table(tier, schema=schema, exist_ok=True)
        self._tables[tier] = tbl
        self._schemas[tier] = tbl.schema
        return tbl

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
            return sorted(p.name[: -len(".lance")] for p in self.path.glob("*.lance"))

    # --- writes ---------------------------------------------------------------------
    def _check_space(self) -> None:
        free = shutil.disk_usage(self.path).free
        if free < self.min_free_bytes:
            raise StorageError(
                f"time-series store {self.path}: only {free} bytes free "
                f"(< {self.min_free_bytes}); write refused",
                hint="free disk space or shorten retention; writes resume when space returns",
            )

    def _append(self, tier: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._check_space()
        tbl = self._table(tier, create=True)
        schema = self._schemas[tier]
        if "value_dec" in schema.names and "value_dec" not in table.column_names:
            table = _encode_values(table)
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
        if self._appends[tier] >= self.compact_every:
            self._maintain_table(tier)

    def _drop_orphans(self, tier: str) -> None:
        """After a failed append (disk full): delete the data files it wrote and every old
        version's manifest (an emergency: concurrent readers of old versions lose them), so
        the space is there for the deletes that free the disk."""
        with contextlib.suppress(Exception):
            self._table(tier).to_lance().cleanup_old_versions(
                older_than=timedelta(0), delete_unverified=True
            )

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

    def read_raw(
        self, selector: Selector, start: float, end: float, limit: int | None = None
    ) -> pa.Table:
        where = f"{_ts_pred(start, end)} AND {selector.sql(sql_quote)}"
        with self._lock:
            ds = self._dataset(RAW)
        if ds is None:
            return RAW_SCHEMA.empty_table()
        table = _decode_values(ds.to_table(filter=where, columns=self._raw_columns(ds)))
        table = table.select(RAW_SCHEMA.names).cast(RAW_SCHEMA)
        table = table.sort_by(
            [("device", "ascending"), ("metric", "ascending"), ("ts", "ascending")]
        )
        return table.slice(0, limit) if limit is not None else table

    def aggregate(
        self, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> pa.Table:
        """Partials per (bucket, series): the rows are read with the index-pruned scan and
        bucketed in numpy (``partials.py``): one sort + ``reduceat`` was ~10x faster than
        DataFusion's GROUP BY with ordered ``first_value`` on the same data."""
        from twin.timeseries import partials

        where = f"{_ts_pred(start, end)} AND {selector.sql(sql_quote)}"
        with self._lock:
            ds = self._dataset(tier)
        if ds is None:
            return PARTIAL_SCHEMA.empty_table()
        try:
            if tier == RAW:
                cols = ["ts", *SERIES_COLUMNS, "value", "value_str"]
                if "value_dec" in ds.schema.names:
                    cols += ["value_dec", "value_exp"]
                table = ds.to_table(filter=where + " AND quality < 2", columns=cols)
                table = _decode_values(table)
                return partials.raw_partials(table, bucket)
            table = ds.to_table(filter=where, columns=PARTIAL_SCHEMA.names)
            return partials.combine(table, bucket)
        except OSError as exc:
            raise StorageError(f"time-series query on {tier} failed: {exc}") from exc

    def earliest(self, tier: str, selector: Selector, end: float) -> float | None:
        """The first timestamp before ``end`` in ``tier`` (reads the ``ts`` column only)."""
        import pyarrow.compute as pc

        with self._lock:
            ds = self._dataset(tier)
        if ds is None:
            return None
        where = f"ts < {_ts_lit(end)} AND {selector.sql(sql_quote)}"
        if tier == RAW:
            where += " AND quality < 2"
        first = pc.min(ds.to_table(filter=where, columns=["ts"]).column("ts")).as_py()
        return first.timestamp() if first is not None else None

    def query(self, q: TimeSeriesQuery) -> pa.Table:
        from twin.timeseries.query import run_query

        return run_query(self, q)

    # --- tiers and retention --------------------------------------------------------
    def replace_partials(
        self, tier: str, selector: Selector, start: float, end: float, rows: pa.Table
    ) -> None:
        with self._lock:
            tbl = self._table(tier, create=True)
            tbl.delete(f"{_ts_pred(start, end)} AND {selector.sql(sql_quote)}")
            self._datasets.pop(tier, None)
            self._append(tier, rows.select(PARTIAL_SCHEMA.names).cast(PARTIAL_SCHEMA))

    def delete_before(self, tier: str, selector: Selector, before: float) -> int:
        with self._lock:
            tbl = self._table(tier)
            if tbl is None:
                return 0
            pred = f"ts < {_ts_lit(before)} AND {selector.sql(sql_quote)}"
            n = tbl.count_rows(pred)
            if n:
                tbl.delete(pred)
                self._datasets.pop(tier, None)
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

    # --- maintenance ----------------------------------------------------------------
    def _maintain_table(self, tier: str) -> None:
        tbl = self._table(tier)
        if tbl is None:
            return
        self._appends[tier] = 0
        for attempt in range(5):
            try:
                ds = tbl.to_lance()
                # first drop what old versions alone hold (e.g. fragments a delete emptied):
                # on a full disk that is the space the compaction below needs
                ds.cleanup_old_versions(older_than=self.keep_versions_for)
                # merges small fragments and rewrites those with >10 % deleted rows
                ds.optimize.compact_files(target_rows_per_fragment=1024 * 1024)
                names = {idx.columns[0] for idx in tbl.list_indices()}
                if ds.count_rows() > 0:
                    for col, kind in _INDEXES:
                        if col not in names:
                            ds.create_scalar_index(col, kind)
                    ds.optimize.optimize_indices()
                ds.cleanup_old_versions(older_than=self.keep_versions_for)
                tbl.checkout_latest()
                self._datasets.pop(tier, None)
                return
            except Exception as exc:  # maintenance never breaks the write path
                if attempt == 4:
                    log.warning("timeseries: maintenance of %s failed: %s", tier, exc)
                    return
                log.info("timeseries: maintenance of %s conflicted (%s); retrying", tier, exc)
                time.sleep(0.05 * (attempt + 1))
                tbl.checkout_latest()

    def maintain(self, *, force: bool = False) -> None:
        with self._lock:
            for tier in self.tiers():
                if force or self._appends.get(tier, 0) > 0:
                    self._maintain_table(tier)

    def reclaim(self) -> None:
        """Compact and drop every old version now (after a retention pass)."""
        with self._lock:
            saved = self.keep_versions_for
            self.keep_versions_for = timedelta(0)
            try:
                self.maintain(force=True)
            finally:
                self.keep_versions_for = saved

    def stats(self) -> StorageStats:
        with self._lock:
            out = []
            for tier in self.tiers():
                tbl = self._table(tier)
                if tbl is None:
                    continue
                rows = int(tbl.count_rows())
                # a tier row is one point of that tier's (coarser) series
                out.append(TierStats(tier, rows, rows, _dir_size(self.path / f"{tier}.lance")))
            usage = shutil.disk_usage(self.path)
            nearly = usage.free < max(
                self.min_free_bytes * 2, usage.total * self.nearly_full_fraction
            )
            return StorageStats(tuple(out), usage.free, usage.total, nearly)

    def close(self) -> None:
        with self._lock:
            self._tables.clear()
            self._datasets.clear()
