"""PostgreSQL time-series store: the same protocol as ``LanceStore``, for deployments that
outgrow one machine.

Layout (every name starts with ``prefix``, default ``ts_``; layout version 2):

* ``<prefix>series``: the series catalogue, one row per (device, metric, site, grp, tags)
  with an ``int4`` id. Points refer to it, so the five text columns are stored once per
  series instead of once per point.
* ``<prefix>points``: the raw tier, one narrow row per point
  ``(ts int8 µs since the epoch, value float8, series_id int4, kind int2, quality int2,
  value_str text)`` - 24 bytes of data plus PostgreSQL's 24-byte tuple header and 4-byte
  line pointer. Range-partitioned by ``ts`` (``<prefix>points_pYYYYMMDDHH``, created on
  demand, ``partition_hours`` each). Indexes: BRIN on ``ts`` (a few pages), a BTree on
  ``series_id`` alone (its keys repeat, so BTree deduplication stores each series once per
  page with a posting list of 6-byte row pointers: a few bytes/point, where
  ``(series_id, ts)`` costs ~30) and a partial index on ``ts`` of string points only
  (empty for numeric data; it lets aggregates skip their string query for free).
  When the ``timescaledb`` extension is available the table is a hypertable (1-day
  chunks) instead (untested here: no TimescaleDB where the tests run).
* ``<prefix>agg_<seconds>s``: PARTIAL_SCHEMA rows per tier, normalised the same way
  (``series_id`` instead of the text columns; ``ts``/``first_ts``/``last_ts`` int8 µs).
  Each window is written sorted by (series, bucket), and a two-column BRIN on
  ``(series_id, ts)`` (4-page ranges, summarised right after each write) finds one
  series' rows: writing a BTree as well doubled the cost of a 1-minute rollup. The BRIN
  is scanned whole (~0.5 ms per million tier rows): partitioning tiers by time is the
  next step for very large tiers.
* ``<prefix>meta``: key/value (tier catalogue, watermarks, ``layout``).

Writes are one binary COPY per batch in one transaction (all of a batch or none of it),
the COPY buffer built with numpy (no per-row Python). Aggregates read the source rows as a
fixed-width binary COPY (``np.frombuffer``, no parsing) and bucket them with numpy, the
same semantics as ``partials.py`` but on integer series ids (string points come through a
second, indexed query only when there are any). :meth:`PostgresStore.rollup` is
``replace_partials(aggregate(...))`` without the Arrow round trip; ``replace_partials``
given the very table ``aggregate`` returned reuses its series ids.

Compaction (``reclaim``, and one partition per ``maintain``) CLUSTERs closed raw
partitions by series: points arrive in time order, one series' points one per page, so a
day of one series read ~1,000 pages; clustered, a handful. Retention drops whole
partitions when it can (instant, space returned at once) and deletes + rewrites
(``VACUUM FULL``) only the partition a cut falls into.

Stores created by earlier versions (layout 1: one ``<prefix>raw`` row per point with the
text columns) are detected at start-up and refused with the command to run::

    python -m twin.timeseries.postgres migrate postgresql://... --prefix ts_

(or ``PostgresStore(url, migrate=True)``), which converts them in one transaction.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa

from twin.errors import StorageError
from twin.timeseries.base import (
    PARTIAL_SCHEMA,
    RAW,
    RAW_SCHEMA,
    TS_TYPE,
    DataPoint,
    Record,
    Selector,
    StorageStats,
    TierStats,
    TimeSeriesQuery,
    sql_quote,
)

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
CLOSE_AFTER = 600.0
"""Seconds after a raw partition's range ends before ``compact`` may CLUSTER it."""
ANALYZE_ROWS = 100_000
"""A write of at least this many rows into a tier table is followed by ANALYZE."""
log = logging.getLogger(__name__)
LAYOUT = "2"

_SERIES_COLS = ("device", "metric", "site", "grp", "tags")
SeriesKey = tuple[str, str, str, str, str]
# Record = (device, metric, value, ts, quality, site, group, tags)
_KEY_OF = itemgetter(0, 1, 5, 6, 7)
_VALUE_OF = itemgetter(2)
_TS_OF = itemgetter(3)
_QUALITY_OF = itemgetter(4)

_POINTS_DDL = """(ts int8 NOT NULL, value double precision, series_id int4 NOT NULL,
    kind int2 NOT NULL, quality int2 NOT NULL, value_str text)"""
_PARTIAL_COLS = (
    "ts, count, sum, min, max, first, last, first_ts, last_ts, series_id, first_str, last_str"
)
_PARTIAL_DDL = """(ts int8 NOT NULL, count int8 NOT NULL, sum double precision,
    min double precision, max double precision, first double precision,
    last double precision, first_ts int8, last_ts int8, series_id int4 NOT NULL,
    first_str text, last_str text)"""

# one binary COPY row of <prefix>points: 6 fields, value_str NULL (the numeric fast path)
_ROW = np.dtype(
    [
        ("n", ">i2"),
        ("l_ts", ">i4"),
        ("ts", ">i8"),
        ("l_v", ">i4"),
        ("v", ">f8"),
        ("l_sid", ">i4"),
        ("sid", ">i4"),
        ("l_k", ">i4"),
        ("k", ">i2"),
        ("l_q", ">i4"),
        ("q", ">i2"),
        ("l_s", ">i4"),
    ]
)
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, index of one row per distinct value): a hash pass, no sort."""
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(pa.array(values))
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    rep = np.zeros(len(enc.dictionary), dtype=np.int64)
    rep[codes] = np.arange(len(codes))  # some row of each value (which one: no matter)
    return codes, rep


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _lpad_ts(col: str) -> str:
    """A text form of an int8 time that sorts like the number (non-negative times)."""
    return f"lpad({col}::text, 20, '0')"


_FLOATS = ("sum", "min", "max", "first", "last")


def _out_dtype(fields: Sequence[tuple[str, str]]) -> np.dtype[Any]:
    """A binary COPY row (``FORMAT binary`` output) of fixed-width, non-null fields."""
    spec: list[tuple[str, str]] = [("n", ">i2")]
    for name, typ in fields:
        spec += [(f"l_{name}", ">i4"), (name, typ)]
    return np.dtype(spec)


_RAW_OUT = _out_dtype([("ts", ">i8"), ("sid", ">i4"), ("v", ">f8")])
_TIER_OUT = _out_dtype(
    [("ts", ">i8"), ("sid", ">i4"), ("count", ">i8")]
    + [(c, ">f8") for c in _FLOATS]
    + [("first_ts", ">i8"), ("last_ts", ">i8")]
)
# a partial row in _PARTIAL_COLS order, first_str/last_str NULL (NaN stands for a null
# float: the readers map NaN back to null, as partials.py does)
_TIER_IN = np.dtype(
    [("n", ">i2")]
    + [
        x
        for name, typ in [("ts", ">i8"), ("count", ">i8")]
        + [(c, ">f8") for c in _FLOATS]
        + [("first_ts", ">i8"), ("last_ts", ">i8"), ("sid", ">i4")]
        for x in ((f"l_{name}", ">i4"), (name, typ))
    ]
    + [("l_fs", ">i4"), ("l_ls", ">i4")]
)
# a one-point partial (count 1: min = max = first = last = sum, last_ts = first_ts): the
# repeated fields are written NULL, ~40 of ~110 bytes a row less to write and store (a
# 1-minute tier over 90-second readings is all such rows); readers restore them
_TIER_IN1 = np.dtype(
    [
        ("n", ">i2"),
        ("l_ts", ">i4"),
        ("ts", ">i8"),
        ("l_count", ">i4"),
        ("count", ">i8"),
        ("l_sum", ">i4"),
        ("sum", ">f8"),
        ("l_min", ">i4"),
        ("l_max", ">i4"),
        ("l_first", ">i4"),
        ("l_last", ">i4"),
        ("l_first_ts", ">i4"),
        ("first_ts", ">i8"),
        ("l_last_ts", ">i4"),
        ("l_sid", ">i4"),
        ("sid", ">i4"),
        ("l_fs", ">i4"),
        ("l_ls", ">i4"),
    ]
)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


@dataclass(eq=False)
class _Partials:
    """Partials per (bucket, series id) as numpy arrays; NaN = null for the floats.

    ``rollup`` follows ``partials._build``: count sums, sum/min/max over non-null values,
    ``first``/``first_str`` from the row with the smallest ``first_ts`` (ties: the earlier
    row), ``last``/``last_str`` from the row with the largest ``last_ts`` (ties: the later
    row)."""

    ts: np.ndarray
    sid: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    min: np.ndarray
    max: np.ndarray
    first: np.ndarray
    last: np.ndarray
    first_ts: np.ndarray
    last_ts: np.ndarray
    first_str: np.ndarray | None = None
    last_str: np.ndarray | None = None

    @classmethod
    def of_points(
        cls, ts: np.ndarray, sid: np.ndarray, v: np.ndarray, strs: np.ndarray | None = None
    ) -> _Partials:
        """One partial per raw point (count 1, every statistic the value itself)."""
        return cls(
            ts=ts,
            sid=sid,
            count=np.ones(len(ts), dtype=np.int64),
            sum=v,
            min=v,
            max=v,
            first=v,
            last=v,
            first_ts=ts,
            last_ts=ts,
            first_str=strs,
            last_str=strs,
        )

    @classmethod
    def from_rows(cls, rows: np.ndarray, raw: bool) -> _Partials:
        if raw:
            return cls.of_points(
                rows["ts"].astype(np.int64),
                rows["sid"].astype(np.int32),
                rows["v"].astype(np.float64),
            )
        cols: dict[str, Any] = {
            "ts": rows["ts"].astype(np.int64),
            "sid": rows["sid"].astype(np.int32),
            "count": rows["count"].astype(np.int64),
            "first_ts": rows["first_ts"].astype(np.int64),
            "last_ts": rows["last_ts"].astype(np.int64),
        }
        for c in _FLOATS:
            cols[c] = rows[c].astype(np.float64)
        return cls(**cols)

    @classmethod
    def from_str_rows(cls, rows: Sequence[tuple[Any, ...]], raw: bool) -> _Partials:
        def f64(vals: Iterable[Any]) -> np.ndarray:
            return np.array([np.nan if x is None else x for x in vals], dtype=np.float64)

        c = list(zip(*rows, strict=True))
        if raw:  # ts, series_id, value, value_str
            strs = np.array(c[3], dtype=object)
            return cls.of_points(
                np.array(c[0], dtype=np.int64), np.array(c[1], dtype=np.int32), f64(c[2]), strs
            )
        ts = np.array(c[0], dtype=np.int64)
        out: dict[str, Any] = {
            "ts": ts,
            "sid": np.array(c[1], dtype=np.int32),
            "count": np.array(c[2], dtype=np.int64),
            "first_ts": np.array([t if f is None else f for t, f in zip(ts, c[8], strict=True)]),
            "last_ts": np.array([t if f is None else f for t, f in zip(ts, c[9], strict=True)]),
            "first_str": np.array(c[10], dtype=object),
            "last_str": np.array(c[11], dtype=object),
        }
        for i, name in enumerate(_FLOATS):
            out[name] = f64(c[3 + i])
        return cls(**out)

    @classmethod
    def from_table(cls, t: pa.Table, sid: np.ndarray) -> _Partials:
        def f64(name: str) -> np.ndarray:
            return np.asarray(t.column(name).to_numpy(), dtype=np.float64)

        def us(name: str) -> np.ndarray:
            return np.asarray(t.column(name).cast(pa.int64()).to_numpy(), dtype=np.int64)

        def strs(name: str) -> np.ndarray | None:
            col = t.column(name)
            if col.null_count == len(col):
                return None
            return np.array(col.to_pylist(), dtype=object)

        ts = us("ts")
        first_ts = t.column("first_ts").cast(pa.int64()).fill_null(0).to_numpy()
        last_ts = t.column("last_ts").cast(pa.int64()).fill_null(0).to_numpy()
        return cls(
            ts=ts,
            sid=np.asarray(sid, dtype=np.int32),
            count=np.asarray(t.column("count").to_numpy(), dtype=np.int64),
            **{c: f64(c) for c in _FLOATS},
            first_ts=np.asarray(first_ts, dtype=np.int64),
            last_ts=np.asarray(last_ts, dtype=np.int64),
            first_str=strs("first_str"),
            last_str=strs("last_str"),
        )

    def _strs(self, name: str) -> np.ndarray:
        arr = getattr(self, name)
        return np.full(len(self.ts), None, dtype=object) if arr is None else arr

    def concat(self, other: _Partials) -> _Partials:
        out: dict[str, Any] = {}
        for name in (f.name for f in fields(self)):
            if name in ("first_str", "last_str"):
                out[name] = np.concatenate([self._strs(name), other._strs(name)])
            else:
                out[name] = np.concatenate([getattr(self, name), getattr(other, name)])
        return _Partials(**out)

    def sorted(self) -> _Partials:
        """By (series, time): the order tier tables are written in (their BRIN relies on it)."""
        order = np.lexsort((self.ts, self.sid))
        cols: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            cols[f.name] = None if v is None else v[order]
        return _Partials(**cols)

    def rollup(self, bucket_us: int) -> _Partials:
        """Partials per (series, bucket), ordered by series then bucket."""
        n = len(self.ts)
        if n == 0:
            return self
        bidx = np.floor_divide(self.ts, bucket_us)
        bmin = int(bidx.min())
        nb = int(bidx.max()) - bmin + 1
        sid = self.sid.astype(np.int64)
        key = (sid - int(sid.min())) * nb + (bidx - bmin)
        raw = self.last_ts is self.first_ts and self.first_ts is self.ts
        if np.all(self.first_ts[1:] >= self.first_ts[:-1]):  # rows in time order
            order = np.argsort(key, kind="stable")
        elif raw and (int(key.max()) + 1) * bucket_us < 1 << 62:
            # (series, bucket, time in bucket) in one int64: one sort instead of two
            # (clustered partitions arrive in series order, not time order)
            order = np.argsort(key * bucket_us + (self.ts - bidx * bucket_us))
        else:
            order = np.lexsort((self.first_ts, key))
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        ends = np.r_[starts[1:], n]
        first_rows = order[starts]
        # raw points: one sort serves both
        last_rows = order[ends - 1] if raw else np.lexsort((self.last_ts, key))[ends - 1]

        def red(fn: np.ufunc, values: np.ndarray) -> np.ndarray:
            return np.asarray(fn.reduceat(values[order], starts))

        valid = ~np.isnan(self.sum)
        sums = red(np.add, np.where(valid, self.sum, 0.0))
        sums[red(np.add, valid.astype(np.int64)) == 0] = np.nan
        return _Partials(
            ts=bidx[first_rows] * bucket_us,
            sid=self.sid[first_rows],
            count=red(np.add, self.count),
            sum=sums,
            min=red(np.fmin, self.min),
            max=red(np.fmax, self.max),
            first=self.first[first_rows],
            last=self.last[last_rows],
            first_ts=self.first_ts[first_rows],
            last_ts=self.last_ts[last_rows],
            first_str=None if self.first_str is None else self.first_str[first_rows],
            last_str=None if self.last_str is None else self.last_str[last_rows],
        )

    def copy_chunks(self, rows_per_chunk: int = 200_000) -> Iterable[bytes]:
        """The rows as binary COPY input for ``_PARTIAL_COLS``."""
        n = len(self.ts)
        has_str = np.zeros(n, dtype=bool)
        for s in (self.first_str, self.last_str):
            if s is not None:
                has_str |= np.array([x is not None for x in s], dtype=bool)
        single = ~has_str & (self.count == 1) & (self.first_ts == self.last_ts)
        for name in ("min", "max", "first", "last"):
            single &= _same(self.sum, getattr(self, name))
        yield _COPY_HEADER
        one = np.flatnonzero(single)
        for i in range(0, len(one), rows_per_chunk):
            idx = one[i : i + rows_per_chunk]
            r1 = np.empty(len(idx), dtype=_TIER_IN1)
            r1["n"] = 12
            for name in ("ts", "count", "sum", "first_ts"):
                r1[f"l_{name}"] = 8
                r1[name] = getattr(self, name)[idx]
            for name in ("min", "max", "first", "last", "last_ts", "fs", "ls"):
                r1[f"l_{name}"] = -1
            r1["l_sid"], r1["sid"] = 4, self.sid[idx]
            yield r1.tobytes()
        fixed = np.flatnonzero(~has_str & ~single)
        for i in range(0, len(fixed), rows_per_chunk):
            idx = fixed[i : i + rows_per_chunk]
            rec = np.empty(len(idx), dtype=_TIER_IN)
            rec["n"] = 12
            for name in ("ts", "count", *_FLOATS, "first_ts", "last_ts"):
                rec[f"l_{name}"] = 8
                rec[name] = getattr(self, name)[idx]
            rec["l_sid"], rec["sid"] = 4, self.sid[idx]
            rec["l_fs"], rec["l_ls"] = -1, -1
            yield rec.tobytes()
        for i in np.flatnonzero(has_str).tolist():
            parts = [struct.pack(">hiqiq", 12, 8, int(self.ts[i]), 8, int(self.count[i]))]
            for name in _FLOATS:
                parts.append(struct.pack(">id", 8, float(getattr(self, name)[i])))
            parts.append(
                struct.pack(
                    ">iqiqii",
                    8,
                    int(self.first_ts[i]),
                    8,
                    int(self.last_ts[i]),
                    4,
                    int(self.sid[i]),
                )
            )
            for s in (self.first_str, self.last_str):
                v = None if s is None else s[i]
                if v is None:
                    parts.append(struct.pack(">i", -1))
                else:
                    raw = str(v).encode()
                    parts.append(struct.pack(">i", len(raw)) + raw)
            yield b"".join(parts)
        yield _COPY_TRAILER


class PostgresStore:
    """``TimeSeriesStore`` on PostgreSQL (psycopg 3). Synchronous, thread-safe (one lock)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ts_",
        connect_timeout: float = 5,
        partition_hours: int = 6,
        migrate: bool = False,
    ) -> None:
        import psycopg

        if not _NAME.match(prefix):
            raise ValueError(f"prefix {prefix!r} must match {_NAME.pattern}")
        if partition_hours < 1 or 24 % partition_hours:
            raise ValueError("partition_hours must divide 24 (1, 2, 3, 4, 6, 8, 12 or 24)")
        self.prefix = prefix
        self._lock = threading.RLock()
        try:
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=int(connect_timeout))
            self._url, self._connect_timeout = url, int(connect_timeout)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
        self._partitions: set[str] = set()
        self._last_aggregate: tuple[weakref.ref[pa.Table], _Partials] | None = None
        self.partition_s = partition_hours * 3600
        self._dirty: set[str] = set()  # tables with deleted rows to rewrite on reclaim()
        self._tier_tables: set[str] = set()
        self._ids: dict[SeriesKey, int] = {}  # series catalogue cache, both ways
        self._keys: dict[int, SeriesKey] = {}
        self.timescale = False
        try:
            self._setup(migrate)
        except BaseException:
            self._conn.close()
            raise

    # --- schema ---------------------------------------------------------------------
    def _t(self, tier: str) -> str:
        return f"{self.prefix}points" if tier == RAW else f"{self.prefix}{tier}"

    @property
    def _series(self) -> str:
        return f"{self.prefix}series"

    def _exec(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            with self._conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {exc}") from exc

    def _tables(self) -> set[str]:
        """Top-level tables (not partitions) of this prefix."""
        rows = self._exec(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND c.relname LIKE %s AND NOT c.relispartition",
            [self.prefix.replace("_", r"\_") + "%"],
        )
        return {r[0] for r in rows}

    def _legacy_tables(self) -> list[str]:
        """Layout-1 tables of this prefix: ``raw`` and tier tables with text series columns."""
        names = [
            n
            for n in self._tables()
            if n == f"{self.prefix}raw" or re.fullmatch(re.escape(self.prefix) + r"agg_\d+s", n)
        ]
        if not names:
            return []
        rows = self._exec(
            "SELECT DISTINCT table_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND column_name = 'device' "
            "AND table_name = ANY(%s)",
            [names],
        )
        return sorted(r[0] for r in rows)

    def _setup(self, migrate: bool) -> None:
        with self._lock:
            # many short indexed queries: JIT compilation (tens of ms) only costs here
            self._exec("SET jit = off")
            legacy = self._legacy_tables()
            if legacy and not migrate:
                raise StorageError(
                    f"PostgreSQL time-series tables {', '.join(legacy)} use the old layout "
                    "(one row per point with the series text columns). Convert them once "
                    "(one transaction; stop writers first) with:\n"
                    f"    python -m twin.timeseries.postgres migrate <url> --prefix {self.prefix}\n"
                    "or open the store with PostgresStore(url, migrate=True)."
                )
            self._create_layout()
            if legacy:
                self._migrate(legacy)

    def _create_layout(self) -> None:
        pts = self._t(RAW)
        self._exec(
            f"CREATE TABLE IF NOT EXISTS {self._series} (id int4 GENERATED BY DEFAULT AS "
            "IDENTITY PRIMARY KEY, device text NOT NULL, metric text NOT NULL, "
            "site text NOT NULL, grp text NOT NULL, tags text NOT NULL, "
            "UNIQUE (device, metric, site, grp, tags))"
        )
        exists = pts in self._tables()
        if not exists:
            avail = self._exec("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
            if avail:  # pragma: no cover - no TimescaleDB where the tests run
                try:
                    self._exec("CREATE EXTENSION IF NOT EXISTS timescaledb")
                    self._exec(f"CREATE TABLE IF NOT EXISTS {pts} {_POINTS_DDL}")
                    self._exec(
                        "SELECT create_hypertable(%s, 'ts', chunk_time_interval => "
                        "86400000000::bigint, if_not_exists => true)",
                        [pts],
                    )
                    self.timescale = True
                except StorageError:
                    self.timescale = False
            if not self.timescale:
                self._exec(
                    f"CREATE TABLE IF NOT EXISTS {pts} {_POINTS_DDL} PARTITION BY RANGE (ts)"
                )
        else:
            self.timescale = bool(
                self._exec(
                    "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND c.relname = %s "
                    "AND c.relkind = 'r'",
                    [pts],
                )
            )
        self._exec(
            f"CREATE INDEX IF NOT EXISTS {pts}_brin ON {pts} USING brin (ts) "
            "WITH (pages_per_range = 16)"
        )
        self._exec(f"CREATE INDEX IF NOT EXISTS {pts}_sid ON {pts} (series_id)")
        # only string points: lets aggregates skip their second query for free
        self._exec(
            f"CREATE INDEX IF NOT EXISTS {pts}_str ON {pts} (ts) WHERE value_str IS NOT NULL"
        )
        self._exec(
            f"CREATE TABLE IF NOT EXISTS {self._t('meta')} "
            "(key text PRIMARY KEY, value text NOT NULL)"
        )
        self._exec(
            f"INSERT INTO {self._t('meta')} (key, value) VALUES ('layout', %s) "
            "ON CONFLICT (key) DO NOTHING",
            [LAYOUT],
        )

    def _partition_name(self, lo: float) -> str:
        fmt = "%Y%m%d" if self.partition_s == 86400 else "%Y%m%d%H"
        return f"{self._t(RAW)}_p{_ts(lo):{fmt}}"

    def _partition_range(self, name: str) -> tuple[float, float]:
        """Bounds of an existing partition, from the catalogue (a store keeps the size of
        the partitions it finds, whatever ``partition_hours`` says now)."""
        rows = self._exec(
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relname = %s",
            [name],
        )
        nums = re.findall(r"'?(-?\d+)'?", rows[0][0]) if rows else []
        if len(nums) < 2:
            raise StorageError(f"cannot read the bounds of partition {name}")
        return int(nums[0]) / 1e6, int(nums[1]) / 1e6

    def _ensure_partitions(self, slots: Iterable[int]) -> None:
        if self.timescale:  # pragma: no cover
            return
        pts = self._t(RAW)
        size = self.partition_s
        for slot in slots:
            name = self._partition_name(slot * size)
            if name in self._partitions:
                continue
            lo, hi = slot * size * 1_000_000, (slot + 1) * size * 1_000_000
            self._exec(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {pts} "
                f"FOR VALUES FROM ({lo}) TO ({hi})"
            )
            self._partitions.add(name)

    def _ensure_tier(self, tier: str) -> None:
        if tier in self._tier_tables or tier == RAW:
            return
        t = self._t(tier)
        self._exec(f"CREATE TABLE IF NOT EXISTS {t} {_PARTIAL_DDL}")
        # Tier rows are written sorted by (series, time) per window, so a two-column BRIN
        # finds one series' rows in a few 4-page ranges: no BTree to maintain on every
        # insert (which was half the cost of writing a 1-minute tier)
        self._exec(
            f"CREATE INDEX IF NOT EXISTS {t}_brin ON {t} USING brin (series_id, ts) "
            "WITH (pages_per_range = 4, autosummarize = on)"
        )
        self._exec(
            f"CREATE INDEX IF NOT EXISTS {t}_str ON {t} (ts) "
            "WHERE first_str IS NOT NULL OR last_str IS NOT NULL"
        )
        self._tier_tables.add(tier)

    def tiers(self) -> list[str]:
        with self._lock:
            names = self._tables()
        out = []
        for name in names:
            tier = name[len(self.prefix) :]
            if tier == "points":
                out.append(RAW)
            elif re.fullmatch(r"agg_\d+s", tier):
                out.append(tier)
        return sorted(out)

    # --- series catalogue -----------------------------------------------------------
    def _resolve(self, keys: Iterable[SeriesKey]) -> None:
        """Make sure every key has an id in the catalogue and in the cache (autocommit:
        ids stay valid even if the write that needed them rolls back)."""
        missing = sorted({k for k in keys if k not in self._ids})
        if not missing:
            return
        cols = [list(c) for c in zip(*missing, strict=True)]
        unnest = "unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
        self._exec(
            f"INSERT INTO {self._series} (device, metric, site, grp, tags) "
            f"SELECT * FROM {unnest} ON CONFLICT DO NOTHING",
            cols,
        )
        rows = self._exec(
            f"SELECT s.id, s.device, s.metric, s.site, s.grp, s.tags FROM {self._series} s "
            f"JOIN {unnest} AS u(device, metric, site, grp, tags) "
            "USING (device, metric, site, grp, tags)",
            cols,
        )
        for sid, *key in rows:
            k: SeriesKey = tuple(key)
            self._ids[k] = sid
            self._keys[sid] = k

    def _ids_of_table(self, table: pa.Table) -> np.ndarray:
        """Series ids (int32) for the rows of an Arrow table with the series columns."""
        import pyarrow.compute as pc

        n = table.num_rows
        if n == 0:
            return np.zeros(0, dtype=np.int32)
        key = np.zeros(n, dtype=np.int64)
        codes: list[np.ndarray] = []
        dicts: list[list[Any]] = []
        for name in _SERIES_COLS:
            col = table.column(name)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            enc = pc.dictionary_encode(col.combine_chunks())
            c = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            codes.append(c)
            dicts.append(enc.dictionary.to_pylist())
            key = key * max(1, len(dicts[-1])) + c
            if int(key.max()) > 1 << 40:  # keep it dense
                key = _factorize(key)[0]
        key, first_rows = _factorize(key)  # and a row of each distinct series
        combos: list[SeriesKey] = [
            tuple(str(dicts[j][codes[j][i]]) for j in range(5))  # type: ignore[misc]
            for i in first_rows
        ]
        self._resolve(combos)
        lookup = np.array([self._ids[c] for c in combos], dtype=np.int32)
        return lookup[key]

    def _keys_of(self, ids: np.ndarray) -> dict[str, pa.Array]:
        """The five series text columns for an array of series ids."""
        inv, first = _factorize(ids)
        uniq = ids[first]
        unknown = [int(i) for i in uniq if int(i) not in self._keys]
        if unknown:
            rows = self._exec(
                f"SELECT id, device, metric, site, grp, tags FROM {self._series} "
                "WHERE id = ANY(%s)",
                [unknown],
            )
            for sid, *key in rows:
                k: SeriesKey = tuple(key)
                self._keys[sid] = k
                self._ids[k] = sid
        keys = [self._keys.get(int(i), ("", "", "", "", "")) for i in uniq]
        cols = list(zip(*keys, strict=True)) if keys else [()] * 5
        idx = pa.array(inv.astype(np.int64))
        return {
            name: pa.array(list(cols[j]), pa.string()).take(idx)
            for j, name in enumerate(_SERIES_COLS)
        }

    def _series_filter(self, selector: Selector, col: str = "series_id") -> str:
        if selector == Selector():
            return "TRUE"
        return f"{col} IN (SELECT id FROM {self._series} WHERE {selector.sql(sql_quote)})"

    # --- writes ---------------------------------------------------------------------
    def write_records(self, records: Sequence[Record]) -> int:
        if not records:
            return 0
        # column by column with C-level iterators (no per-record Python bytecode): this
        # runs in the writer's thread and holds the GIL the producers need
        n = len(records)
        key_of = _KEY_OF
        with self._lock:
            try:
                sid = np.fromiter(
                    map(self._ids.__getitem__, map(key_of, records)), dtype=np.int32, count=n
                )
            except KeyError:
                self._resolve(map(key_of, records))
                sid = np.fromiter(
                    map(self._ids.__getitem__, map(key_of, records)), dtype=np.int32, count=n
                )
        ts = np.fromiter(map(_TS_OF, records), dtype=np.float64, count=n)
        us = np.round(ts * 1_000_000).astype(np.int64)
        quality = np.fromiter(map(_QUALITY_OF, records), dtype=np.int16, count=n)
        strs: list[str | None] | None = None
        if set(map(type, map(_VALUE_OF, records))) == {float}:  # the common case
            num = np.fromiter(map(_VALUE_OF, records), dtype=np.float64, count=n)
            kind = np.zeros(n, dtype=np.int16)
        else:
            num = np.empty(n, dtype=np.float64)
            kind = np.zeros(n, dtype=np.int16)
            strs = [None] * n
            for i, v in enumerate(map(_VALUE_OF, records)):
                if isinstance(v, bool):
                    num[i], kind[i] = (1.0 if v else 0.0), 1
                elif isinstance(v, int | float):
                    num[i] = float(v)
                else:
                    num[i], kind[i], strs[i] = np.nan, 2, str(v)
        return self._write(us, sid, num, kind, quality, strs)

    def write_table(self, table: pa.Table) -> int:
        """Append a RAW_SCHEMA table (all of it or nothing)."""
        table = table.cast(RAW_SCHEMA)
        if table.num_rows == 0:
            return 0
        with self._lock:
            sid = self._ids_of_table(table)
        us = table.column("ts").cast(pa.int64()).to_numpy()
        num = np.asarray(table.column("value").to_numpy(zero_copy_only=False), dtype=np.float64)
        s = table.column("value_str")
        strs = s.to_pylist() if s.null_count < len(s) else None
        kind = np.asarray(table.column("kind").to_numpy(), dtype=np.int16)
        q = np.asarray(table.column("quality").to_numpy(), dtype=np.int16)
        return self._write(us, sid, num, kind, q, strs)

    def _write(
        self,
        us: np.ndarray,
        sid: np.ndarray,
        num: np.ndarray,
        kind: np.ndarray,
        quality: np.ndarray,
        strs: Sequence[str | None] | None,
    ) -> int:
        """One binary COPY of the rows, time-ordered (BRIN stays tight), one transaction."""
        import psycopg

        n = len(us)
        if n > 1 and np.any(us[1:] < us[:-1]):
            order = np.argsort(us, kind="stable")
            us, sid, num, kind, quality = (
                us[order],
                sid[order],
                num[order],
                kind[order],
                quality[order],
            )
            if strs is not None:
                strs = [strs[i] for i in order]
        fixed = np.ones(n, dtype=bool)
        if strs is not None:
            fixed = np.fromiter((s is None for s in strs), dtype=bool, count=n)
        rows = np.empty(int(fixed.sum()), dtype=_ROW)
        rows["n"] = 6
        rows["l_ts"], rows["l_v"], rows["l_sid"] = 8, 8, 4
        rows["l_k"], rows["l_q"], rows["l_s"] = 2, 2, -1
        rows["ts"], rows["v"], rows["sid"] = us[fixed], num[fixed], sid[fixed]
        rows["k"], rows["q"] = kind[fixed], quality[fixed]
        out = [_COPY_HEADER, rows.tobytes()]
        if strs is not None:
            for i in np.flatnonzero(~fixed).tolist():
                raw = str(strs[i]).encode()
                v = num[i]
                value = struct.pack(">i", -1) if np.isnan(v) else struct.pack(">id", 8, v)
                out.append(
                    struct.pack(">hiq", 6, 8, int(us[i]))
                    + value
                    + struct.pack(">iiihih", 4, int(sid[i]), 2, int(kind[i]), 2, int(quality[i]))
                    + struct.pack(">i", len(raw))
                    + raw
                )
        out.append(_COPY_TRAILER)
        slots = np.unique(us // (self.partition_s * 1_000_000))
        with self._lock:
            self._ensure_partitions(int(x) for x in slots)
            try:
                with (
                    self._conn.transaction(),
                    self._conn.cursor() as cur,
                    cur.copy(
                        f"COPY {self._t(RAW)} (ts, value, series_id, kind, quality, value_str) "
                        "FROM STDIN (FORMAT binary)"
                    ) as cp,
                ):
                    for part in out:
                        cp.write(part)
            except psycopg.Error as exc:
                raise StorageError(f"PostgreSQL write to {self._t(RAW)} failed: {exc}") from exc
        return n

    def write_point(self, point: DataPoint) -> None:
        self.write_records(point.records())

    def write_batch(self, points: Iterable[DataPoint]) -> int:
        return self.write_records([r for p in points for r in p.records()])

    # --- reads ----------------------------------------------------------------------
    def read_raw(
        self, selector: Selector, start: float, end: float, limit: int | None = None
    ) -> pa.Table:
        if RAW not in self.tiers():
            return RAW_SCHEMA.empty_table()
        sql = (
            "SELECT p.ts, s.device, s.site, s.grp, s.tags, s.metric, p.value, p.value_str, "
            f"p.kind, p.quality FROM {self._t(RAW)} p JOIN {self._series} s "
            f"ON s.id = p.series_id WHERE p.ts >= {_us(start)} AND p.ts < {_us(end)} "
            f"AND {selector.sql(sql_quote)} ORDER BY s.device, s.metric, p.ts"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._exec(sql)
        if not rows:
            return RAW_SCHEMA.empty_table()
        cols = list(zip(*rows, strict=True))
        arrays = [pa.array(cols[0], pa.int64()).cast(TS_TYPE)]
        arrays += [
            pa.array(c, type=f.type) for c, f in zip(cols[1:], list(RAW_SCHEMA)[1:], strict=True)
        ]
        return pa.Table.from_arrays(arrays, schema=RAW_SCHEMA)

    # --- aggregation: fixed-width binary COPY out, numpy, binary COPY in ----------------
    def _copy_out(self, cur: Any, sql: str) -> bytes:
        buf = bytearray()
        with cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT binary)") as cp:
            for chunk in cp:
                buf += chunk
        return bytes(buf)

    def _read_source(
        self, tier: str, selector: Selector, start: float, end: float
    ) -> _Partials | None:
        """The rows of ``tier`` in ``[start, end)`` as numpy arrays in partial form (raw
        points are one-point partials). Numeric rows travel as one fixed-width binary COPY
        parsed with ``np.frombuffer``; rows with strings (found through a partial index, so
        the check is free when there are none) come in a second, ordinary query."""
        import psycopg

        where = f"ts >= {_us(start)} AND ts < {_us(end)} AND {self._series_filter(selector)}"
        t = self._t(tier)
        if tier == RAW:
            where += " AND quality < 2"
            num_sql = (
                "SELECT ts, series_id, coalesce(value, 'NaN') FROM "
                f"{t} WHERE {where} AND value_str IS NULL"
            )
            str_sql = (
                f"SELECT ts, series_id, value, value_str FROM {t} "
                f"WHERE {where} AND value_str IS NOT NULL"
            )
            dtype = _RAW_OUT
        else:
            # NULL min/max/first/last/last_ts in a count-1 row: written compact (_TIER_IN1)
            cols = ", ".join(
                f"coalesce({c}, CASE WHEN count = 1 THEN sum END, 'NaN')" for c in _FLOATS
            )
            num_sql = (
                f"SELECT ts, series_id, count, {cols}, coalesce(first_ts, ts), "
                f"coalesce(last_ts, first_ts, ts) FROM {t} WHERE {where} "
                "AND first_str IS NULL AND last_str IS NULL"
            )
            str_sql = (
                f"SELECT ts, series_id, count, {', '.join(_FLOATS)}, first_ts, last_ts, "
                f"first_str, last_str FROM {t} WHERE {where} "
                "AND (first_str IS NOT NULL OR last_str IS NOT NULL)"
            )
            dtype = _TIER_OUT
        with self._lock:
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    data = self._copy_out(cur, num_sql)
                    cur.execute(str_sql)
                    str_rows = cur.fetchall()
            except psycopg.Error as exc:
                raise StorageError(f"PostgreSQL: {exc}") from exc
        count = max(0, (len(data) - len(_COPY_HEADER) - 2) // dtype.itemsize)
        rows = np.frombuffer(data, dtype=dtype, count=count, offset=len(_COPY_HEADER))
        if count == 0 and not str_rows:
            return None
        p = _Partials.from_rows(rows, tier == RAW)
        if str_rows:
            p = p.concat(_Partials.from_str_rows(str_rows, tier == RAW))
        return p

    def _compute(
        self, source: str, selector: Selector, start: float, end: float, bucket: float
    ) -> _Partials | None:
        if source not in self.tiers():
            return None
        p = self._read_source(source, selector, start, end)
        return None if p is None else p.rollup(max(1, round(bucket * 1_000_000)))

    def aggregate(
        self, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> pa.Table:
        p = self._compute(tier, selector, start, end, bucket)
        if p is None or len(p.ts) == 0:
            return PARTIAL_SCHEMA.empty_table()
        with self._lock:
            series = self._keys_of(p.sid)

        def f64(a: np.ndarray) -> pa.Array:
            return pa.array(a, pa.float64(), mask=np.isnan(a))

        cols: dict[str, Any] = {
            "ts": pa.array(p.ts).cast(TS_TYPE),
            "count": pa.array(p.count),
            "sum": f64(p.sum),
            "min": f64(p.min),
            "max": f64(p.max),
            "first": f64(p.first),
            "last": f64(p.last),
            "first_str": pa.array(p.first_str, pa.string())
            if p.first_str is not None
            else pa.nulls(len(p.ts), pa.string()),
            "last_str": pa.array(p.last_str, pa.string())
            if p.last_str is not None
            else pa.nulls(len(p.ts), pa.string()),
            "first_ts": pa.array(p.first_ts).cast(TS_TYPE),
            "last_ts": pa.array(p.last_ts).cast(TS_TYPE),
            **series,
        }
        table = pa.Table.from_arrays([cols[n] for n in PARTIAL_SCHEMA.names], schema=PARTIAL_SCHEMA)
        # Downsampling hands this very table to replace_partials; remember its series ids
        # for as long as the (immutable) table lives, so that call skips re-encoding the
        # five text columns of every row (seconds for a day of 10,000 series).
        self._last_aggregate = (weakref.ref(table, self._forget_aggregate), p)
        return table

    def _forget_aggregate(self, _ref: Any) -> None:
        self._last_aggregate = None

    def earliest(self, tier: str, selector: Selector, end: float) -> float | None:
        """The first timestamp before ``end`` in ``tier`` (oldest raw partition first)."""
        tiers = self.tiers()
        if tier not in tiers:
            return None
        where = f"ts < {_us(end)} AND {self._series_filter(selector)}"
        if tier == RAW:
            where += " AND quality < 2"
        with self._lock:
            tables = [self._t(tier)]
            if tier == RAW and not self.timescale:
                tables = self._list_partitions() or tables
            for name in tables:
                first = self._exec(f"SELECT min(ts) FROM {name} WHERE {where}")[0][0]
                if first is not None:
                    return int(first) / 1e6
        return None

    def query(self, q: TimeSeriesQuery) -> pa.Table:
        from twin.timeseries.query import run_query

        return run_query(self, q)

    # --- tiers and retention --------------------------------------------------------
    def _replace(
        self, tier: str, selector: Selector, start: float, end: float, p: _Partials | None
    ) -> int:
        """DELETE the window, binary COPY the partials in: one transaction."""
        import psycopg

        t = self._t(tier)
        with self._lock:
            self._ensure_tier(tier)
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    cur.execute(
                        f"DELETE FROM {t} WHERE ts >= %s AND ts < %s AND "
                        f"{self._series_filter(selector)}",
                        [_us(start), _us(end)],
                    )
                    if p is None or len(p.ts) == 0:
                        return 0
                    with cur.copy(f"COPY {t} ({_PARTIAL_COLS}) FROM STDIN (FORMAT binary)") as cp:
                        for part in p.copy_chunks():
                            cp.write(part)
            except psycopg.Error as exc:
                raise StorageError(f"PostgreSQL write to {t} failed: {exc}") from exc
            # summarise the new pages now rather than when autovacuum gets to them (until
            # then every query scans them); the write is committed whatever happens here
            try:
                self._exec(f"SELECT brin_summarize_new_values('{t}_brin')")
                if len(p.ts) >= ANALYZE_ROWS:  # plans need row counts (seq scan otherwise)
                    self._exec(f"ANALYZE {t}")
            except StorageError as exc:
                log.warning("timeseries: summarising %s_brin failed: %s", t, exc)
            return len(p.ts)

    def replace_partials(
        self, tier: str, selector: Selector, start: float, end: float, rows: pa.Table
    ) -> None:
        last = self._last_aggregate
        if last is not None and last[0]() is rows:
            self._replace(tier, selector, start, end, last[1])  # already in (series, ts) order
            return
        rows = rows.select(PARTIAL_SCHEMA.names).cast(PARTIAL_SCHEMA)
        with self._lock:
            sid = self._ids_of_table(rows)
        self._replace(tier, selector, start, end, _Partials.from_table(rows, sid).sorted())

    def rollup(
        self, source: str, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> int:
        """``replace_partials(tier, selector, start, end, aggregate(source, ...))`` without
        the Arrow round trip: series stay ids, partials stay numpy arrays, both COPYs
        binary. Returns the number of partial rows written."""
        p = self._compute(source, selector, start, end, bucket)
        return self._replace(tier, selector, start, end, p)

    def delete_before(self, tier: str, selector: Selector, before: float) -> int:
        if tier not in self.tiers():
            return 0
        t = self._t(tier)
        with self._lock:
            n = 0
            expired: list[str] = []  # partitions entirely before the cut
            if tier == RAW and not self.timescale:
                for name in self._list_partitions():
                    hi = self._partition_range(name)[1]
                    if hi <= before and selector == Selector():
                        # whole partitions first: instant and the space is returned at once
                        n += int(self._exec(f"SELECT count(*) FROM {name}")[0][0])
                        self._exec(f"DROP TABLE {name}")
                        self._partitions.discard(name)
                    elif hi <= before:
                        expired.append(name)
            # per table (partition) that lost rows: only those are rewritten by reclaim()
            rows = self._exec(
                f"WITH d AS (DELETE FROM {t} WHERE ts < %s AND {self._series_filter(selector)} "
                "RETURNING tableoid) SELECT c.relname, count(*) FROM d "
                "JOIN pg_class c ON c.oid = d.tableoid GROUP BY 1",
                [_us(before)],
            )
            for name, count in rows:
                n += int(count)
                self._dirty.add(name)
            # an expired partition that a selector's delete emptied (every policy has cut
            # it by now) is dropped too, rather than rewritten
            for name in expired:
                if not self._exec(f"SELECT 1 FROM {name} LIMIT 1"):
                    self._exec(f"DROP TABLE {name}")
                    self._partitions.discard(name)
                    self._dirty.discard(name)
            return n

    def _list_partitions(self) -> list[str]:
        """Partitions of the points table, oldest first."""
        rows = self._exec(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s",
            [self._t(RAW)],
        )
        return sorted(r[0] for r in rows)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            rows = self._exec(f"SELECT value FROM {self._t('meta')} WHERE key = %s", [key])
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._exec(
                f"INSERT INTO {self._t('meta')} (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                [key, value],
            )

    def _unclustered_closed(self, now: float) -> list[tuple[str, str]]:
        """(partition, its series_id BTree) for closed partitions not CLUSTERed yet, oldest
        first. Closed: the partition's range ended ``CLOSE_AFTER`` seconds ago or more."""
        if self.timescale:  # pragma: no cover
            return []
        rows = self._exec(
            "SELECT c.relname, ic.relname, i.indisclustered, "
            "pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits h "
            "JOIN pg_class c ON c.oid = h.inhrelid JOIN pg_class p ON p.oid = h.inhparent "
            "JOIN pg_index i ON i.indrelid = c.oid JOIN pg_class ic ON ic.oid = i.indexrelid "
            "JOIN pg_am am ON am.oid = ic.relam "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] "
            "WHERE p.relname = %s AND am.amname = 'btree' AND i.indnatts = 1 "
            "AND i.indpred IS NULL AND a.attname = 'series_id'",
            [self._t(RAW)],
        )
        out = []
        for part, index, clustered, bound in sorted(rows):
            nums = re.findall(r"(-?\d+)", bound)
            if not clustered and len(nums) >= 2 and int(nums[1]) / 1e6 <= now - CLOSE_AFTER:
                out.append((part, index))
        return out

    def compact(self, *, limit: int | None = None, now: float | None = None) -> int:
        """CLUSTER closed raw partitions by series (at most ``limit``; returns how many).

        Points arrive in time order, so one series' points are spread one per page; a day
        of one series read ~1,000 pages. CLUSTER rewrites a partition sorted by
        ``series_id`` (and packed: it is also the compaction), so the same query reads a
        handful of pages. It takes an exclusive lock on that partition while it runs
        (seconds for a few million points); only closed partitions are clustered, and
        late points written afterwards are simply appended.
        """
        import time

        import psycopg

        with self._lock:
            todo = self._unclustered_closed(time.time() if now is None else now)
        todo = todo[:limit] if limit is not None else todo
        if not todo:
            return 0
        # on a connection of its own, without the store's lock: writers (into the open
        # partitions) and readers of other partitions go on meanwhile
        try:
            with psycopg.connect(
                self._url, autocommit=True, connect_timeout=self._connect_timeout
            ) as conn:
                for part, index in todo:
                    conn.execute(f"CLUSTER {part} USING {index}")
                    conn.execute(f"ANALYZE {part}")
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: compacting {todo[0][0]}...: {exc}") from exc
        return len(todo)

    def maintain(self, *, force: bool = False) -> None:
        """Every retention pass: CLUSTER at most one closed partition (bounded work).
        ``force``: every closed partition, then VACUUM (ANALYZE) of every table."""
        if not force:
            self.compact(limit=1)
            return
        self.compact()
        with self._lock:
            for tier in self.tiers():
                self._exec(f"VACUUM (ANALYZE) {self._t(tier)}")
            self._exec(f"VACUUM (ANALYZE) {self._series}")

    def reclaim(self) -> None:
        """Give the space of deleted rows back to the OS, and compact.

        Plain VACUUM only makes dead space reusable inside the files; a retention cut that
        falls inside a partition would return nothing (measured: 0 bytes). So the tables
        and partitions a ``delete_before`` touched are rewritten with ``VACUUM FULL``: with
        ``partition_hours`` partitions that is at most one partition per cut (plus tier
        tables), and an exclusive lock on the oldest partition blocks no writer. (Whole
        partitions past the cut were dropped already: their space came back at once.)
        Then every closed partition not clustered yet is (``compact``).
        """
        with self._lock:
            dirty, self._dirty = sorted(self._dirty), set()
            existing = set(self._list_partitions()) | {self._t(t) for t in self.tiers()}
            for name in dirty:
                if name in existing:
                    self._exec(f"VACUUM (FULL, ANALYZE) {name}")
            self.compact()

    def stats(self) -> StorageStats:
        """Rows and bytes per tier; the series catalogue is counted with the raw tier."""
        out = []
        with self._lock:
            for tier in self.tiers():
                t = self._t(tier)
                rows = int(self._exec(f"SELECT count(*) FROM {t}")[0][0])
                size = int(
                    self._exec(
                        "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) "
                        "FROM pg_partition_tree(%s)",
                        [t],
                    )[0][0]
                )
                if tier == RAW:
                    size += int(
                        self._exec("SELECT pg_total_relation_size(%s)", [self._series])[0][0]
                    )
                out.append(TierStats(tier, rows, rows, size))
        # the server's disk is not visible from here; -1 means unknown
        return StorageStats(tuple(out), -1, -1, False)

    def drop_all(self) -> None:
        """Drop every table of this prefix (tests, benchmarks)."""
        with self._lock:
            for tier in self.tiers():
                self._exec(f"DROP TABLE IF EXISTS {self._t(tier)} CASCADE")
            for name in ("meta", "series"):
                self._exec(f"DROP TABLE IF EXISTS {self.prefix}{name}")
            self._partitions.clear()
            self._tier_tables.clear()
            self._ids.clear()
            self._keys.clear()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- migration from layout 1 ----------------------------------------------------
    def _migrate(self, legacy: list[str]) -> None:
        """Convert layout-1 tables (text series columns on every row, ``timestamptz``) to
        this layout, in one transaction: all of it or nothing."""
        import psycopg

        old_raw = f"{self.prefix}raw"
        to_us = "(extract(epoch FROM o.ts) * 1000000)::int8"
        join = f"JOIN {self._series} s USING (device, metric, site, grp, tags)"
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                for old in legacy:
                    cur.execute(
                        f"INSERT INTO {self._series} (device, metric, site, grp, tags) "
                        f"SELECT DISTINCT device, metric, site, grp, tags FROM {old} "
                        "ON CONFLICT DO NOTHING"
                    )
                if old_raw in legacy:
                    cur.execute(
                        f"SELECT min({to_us}) / %s, max({to_us}) / %s FROM {old_raw} o",
                        [self.partition_s * 1_000_000] * 2,
                    )
                    lo, hi = cur.fetchone() or (None, None)
                    if lo is not None and hi is not None:
                        self._ensure_partitions(range(int(lo), int(hi) + 1))
                    cur.execute(
                        f"INSERT INTO {self._t(RAW)} (ts, value, series_id, kind, quality, "
                        f"value_str) SELECT {to_us}, o.value, s.id, o.kind, o.quality, "
                        f"o.value_str FROM {old_raw} o {join} ORDER BY 1"
                    )
                    cur.execute(f"DROP TABLE {old_raw} CASCADE")
                for old in legacy:
                    if old == old_raw:
                        continue
                    tier = old[len(self.prefix) :]
                    cur.execute(f"ALTER TABLE {old} RENAME TO {old}_v1")
                    self._tier_tables.discard(tier)
                    self._ensure_tier(tier)
                    cur.execute(
                        f"INSERT INTO {old} ({_PARTIAL_COLS}) SELECT "
                        f"{to_us}, o.count, o.sum, o.min, o.max, o.first, o.last, "
                        "(extract(epoch FROM o.first_ts) * 1000000)::int8, "
                        "(extract(epoch FROM o.last_ts) * 1000000)::int8, s.id, "
                        f"o.first_str, o.last_str FROM {old}_v1 o {join}"
                    )
                    cur.execute(f"DROP TABLE {old}_v1 CASCADE")
                cur.execute(
                    f"UPDATE {self._t('meta')} SET value = %s WHERE key = 'layout'", [LAYOUT]
                )
        except psycopg.Error as exc:
            self._partitions.clear()
            self._tier_tables.clear()
            raise StorageError(f"PostgreSQL: migrating {', '.join(legacy)} failed: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m twin.timeseries.postgres migrate URL [--prefix ts_]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m twin.timeseries.postgres")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mig = sub.add_parser("migrate", help="convert layout-1 tables of a prefix to layout 2")
    mig.add_argument("url")
    mig.add_argument("--prefix", default="ts_")
    args = ap.parse_args(argv)
    store = PostgresStore(args.url, prefix=args.prefix, migrate=True)
    try:
        stats = store.stats()
        print(
            f"{args.prefix}: layout {store.get_meta('layout')}, "
            + ", ".join(f"{t.tier}: {t.rows:,} rows" for t in stats.tiers)
        )
    finally:
        store.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
