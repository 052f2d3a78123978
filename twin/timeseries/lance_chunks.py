"""The LanceDB store's series-chunk table (``raw_chunks.lance``; layout in ``chunks.py``).

One Lance dataset beside ``raw.lance``, written and read with pylance directly. Its rows
are few (one per series and chunk: ~10 k for 10 M points), so the store keeps a
*catalogue* in memory — every column but the blobs, as of the dataset version it holds —
and answers "which chunks" with a numpy/Arrow filter over it (``selector_mask``) instead
of a Lance scan: a one-series query then costs one ``take`` of a few rows' blobs (or none,
for an aggregate whose buckets hold whole chunks). The catalogue is reloaded after every
commit to the table (compaction, retention), never on the write path.

Blob cache (issue 19, session 7). A Lance ``take`` of one row costs ~0.2-0.3 ms whatever
its size (measured with pylance 14: ~0.2 ms of CPU for one int64 cell, ~14 futex calls and
4 eventfd writes a call: its async runtime's hand-offs, not I/O), which was a third of a
one-series 1-hour read. So the blobs of the newest chunk rows stay in memory, up to
``cache_bytes``: rows are cached as they are written (compaction and the day merge hold
their bytes anyway) and as they are read, least recently used first out — what Gorilla
does for its last 26 hours, since dashboards read recent data. A row's blobs never change
(a rewrite is a new row with a new ``cid``; ``cid`` s are not reused within a process, see
``next_cid``), and entries of rows no longer in the catalogue are dropped at each reload.
Entries are keyed by (``cid``, ``t_min``, ``t_max``): another process sharing the store
could number a new row with the ``cid`` of one it deleted, but a row that differs in
content then differs in its time span too (a merge adds points, a trim moves ``t_min``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twin.timeseries.base import SERIES_COLUMNS, Selector
from twin.timeseries.chunks import CHUNK_SCHEMA, selector_mask

CHUNKS = "raw_chunks"


def _string_scalar(x: pa.Scalar) -> pa.Scalar:
    if isinstance(x, pa.DictionaryScalar):
        x = x.value
    return x if x.type == pa.string() else x.cast(pa.string())


CACHED_READ_ROWS = 16
"""Reads of at most this many chunk rows use the blob cache (a one-series read: a day row or a
few 6-hour rows); larger reads take from Lance directly and are not cached."""

class ChunkTable:
    """The chunk dataset and its in-memory catalogue. Thread-safe for readers; writers
    (the store's maintenance and retention) are serialised by the store."""

    def __init__(
        self,
        path: Path,
        name: str = CHUNKS,
        schema: pa.Schema = CHUNK_SCHEMA,
        cache_bytes: int = 0,
    ) -> None:
        """``name``/``schema``: the raw table's chunks by default; a downsampling tier's
        partial chunks (``<tier>_chunks``, ``partial_chunks.PCHUNK_SCHEMA``) otherwise.
        ``cache_bytes``: the budget of the blob cache (module docstring; 0: none)."""
        self.uri = str(path / f"{name}.lance")
        self.path = path / f"{name}.lance"
        self.schema = schema
        self.meta_columns = [n for n in schema.names if not n.endswith("_blob")]
        self.blob_columns = [n for n in schema.names if n.endswith("_blob")]
        self._lock = threading.Lock()
        self._ds: Any = None
        self._catalog: pa.Table | None = None
        self._lo = np.zeros(0, dtype=np.int64)
        self._hi = np.zeros(0, dtype=np.int64)
        self._by_series: dict[tuple[str, str], np.ndarray] | None = None
        self._names: dict[int, tuple[pa.Scalar, ...]] = {}  # catalogue row -> series
        # per catalogue row: its fragment and its offset among that fragment's live rows
        # (``blobs`` takes from the fragment: half the cost of a dataset ``take``)
        self._frag = np.zeros(0, dtype=np.int64)
        self._local = np.zeros(0, dtype=np.int64)
        self._fragments: dict[int, Any] = {}
        # per nullable blob column: which catalogue rows hold one (a one-row read takes
        # only those it needs: each column taken costs ~0.05 ms of a ~0.35 ms take)
        self.optional_blobs = [f.name for f in schema if f.name in self.blob_columns and f.nullable]
        self._has: dict[str, np.ndarray] = {}
        # (cid, t_min, t_max) -> the row's blobs (``blob_columns`` order), least recently
        # used first
        self.cache_bytes = max(0, cache_bytes)
        self._cache: OrderedDict[tuple[int, int, int], tuple[bytes | None, ...]] = OrderedDict()
        self._cached_bytes = 0
        self._cids = np.zeros(0, dtype=np.int64)  # per catalogue row
        self._max_cid = 0  # the highest cid this process has seen (never reused)

    def exists(self) -> bool:
        # (once loaded, without a stat: every query asks)
        return self._ds is not None or self.path.exists()

    def snapshot(self) -> tuple[Any, pa.Table]:
        """(dataset, catalogue) of one version; an empty catalogue when there is no table."""
        with self._lock:
            if self._catalog is None:
                self._load()
            assert self._catalog is not None
            return self._ds, self._catalog

    def _load(self) -> None:
        import lance

        self._by_series = None
        self._names = {}
        if not self.exists():
            self._ds = None
            self._catalog = self.schema.empty_table().select(self.meta_columns)
        else:
            self._ds = lance.dataset(self.uri)
            cat = self._ds.to_table(columns=self.meta_columns, with_row_address=True)
            cat = cat.combine_chunks()
            addr = np.asarray(cat.column("_rowaddr").to_numpy(), dtype=np.uint64)
            self._catalog = cat.drop_columns(["_rowaddr"])
            # scanned in order: fragment by fragment, live rows in order
            frag = (addr >> np.uint64(32)).astype(np.int64)
            pos = np.arange(len(frag), dtype=np.int64)
            first = np.r_[True, frag[1:] != frag[:-1]] if len(frag) else np.zeros(0, bool)
            self._frag = frag
            self._local = pos - np.maximum.accumulate(np.where(first, pos, 0))
            self._fragments = {f.fragment_id: f for f in self._ds.get_fragments()}
            self._has = {}
            order = np.argsort(addr)
            for name in self.optional_blobs:
                set_at = self._ds.to_table(
                    columns=[], filter=f"{name} IS NOT NULL", with_row_address=True
                )
                at = np.asarray(set_at.column("_rowaddr").to_numpy(), dtype=np.uint64)
                has = np.zeros(len(addr), dtype=bool)
                has[order[np.searchsorted(addr, at, sorter=order)]] = True
                self._has[name] = has
        self._lo = np.array(self._catalog.column("t_min").cast(pa.int64()), dtype=np.int64)
        self._hi = np.array(self._catalog.column("t_max").cast(pa.int64()), dtype=np.int64)
        self._cids = np.array(self._catalog.column("cid"), dtype=np.int64)
        if self._cids.size:
            self._max_cid = max(self._max_cid, int(self._cids.max()))
        if self._cache:
            live = set(self._keys(np.arange(len(self._cids))))
            for key in [k for k in self._cache if k not in live]:
                self._uncache(key)

    # --- the blob cache (the caller holds ``_lock``) --------------------------------------
    def _keys(self, idx: np.ndarray) -> list[tuple[int, int, int]]:
        """Cache keys of catalogue rows ``idx`` (of the current catalogue)."""
        return list(
            zip(
                self._cids[idx].tolist(),
                self._lo[idx].tolist(),
                self._hi[idx].tolist(),
                strict=True,
            )
        )

    def _uncache(self, key: tuple[int, int, int]) -> None:
        blobs = self._cache.pop(key, None)
        if blobs is not None:
            self._cached_bytes -= sum(len(b) for b in blobs if b is not None)

    def _cache_put(self, key: tuple[int, int, int], blobs: tuple[bytes | None, ...]) -> None:
        size = sum(len(b) for b in blobs if b is not None)
        if size > self.cache_bytes // 8:
            return  # (one huge row does not flush the cache)
        self._uncache(key)
        self._cache[key] = blobs
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes and self._cache:
            self._uncache(next(iter(self._cache)))

    def _cache_rows(self, rows: pa.Table, keys: list[tuple[int, int, int]] | None = None) -> None:
        """Cache the blobs of ``rows`` (with the blob columns; with ``cid``, ``t_min`` and
        ``t_max`` unless their ``keys`` are given)."""
        if not self.cache_bytes or rows.num_rows == 0:
            return
        if keys is None:
            keys = list(
                zip(
                    rows.column("cid").to_pylist(),
                    rows.column("t_min").cast(pa.int64()).to_pylist(),
                    rows.column("t_max").cast(pa.int64()).to_pylist(),
                    strict=True,
                )
            )
        cols = [rows.column(c).to_pylist() for c in self.blob_columns]
        with self._lock:
            for key, *blobs in zip(keys, *cols, strict=True):
                self._cache_put(key, tuple(blobs))

    def cached_bytes(self) -> int:
        return self._cached_bytes

    def resize_cache(self, cache_bytes: int) -> None:
        """Hold at most ``cache_bytes`` of blobs from now on (0: none), least recently used
        out first."""
        with self._lock:
            self.cache_bytes = max(0, cache_bytes)
            while self._cached_bytes > self.cache_bytes and self._cache:
                self._uncache(next(iter(self._cache)))

    def _series_rows(self, cat: pa.Table) -> dict[tuple[str, str], np.ndarray]:
        """(device, metric) -> catalogue offsets, by ``t_min`` (built once per version:
        one pass over the catalogue's rows, not over points)."""
        with self._lock:
            if self._by_series is not None and cat is self._catalog:
                return self._by_series
        order = np.argsort(np.array(cat.column("t_min").cast(pa.int64())), kind="stable")
        groups: dict[tuple[str, str], list[int]] = {}
        devs = cat.column("device").to_pylist()
        mets = cat.column("metric").to_pylist()
        for i in order.tolist():
            groups.setdefault((devs[i], mets[i]), []).append(i)
        out = {k: np.array(v, dtype=np.int64) for k, v in groups.items()}
        with self._lock:
            if cat is self._catalog:
                self._by_series = out
        return out

    def refresh(self) -> None:
        with self._lock:
            self._load()

    def select(
        self,
        selector: Selector,
        start: float,
        end: float,
        *,
        blobs: bool = True,
        snap: tuple[Any, pa.Table] | None = None,
    ) -> pa.Table:
        """Chunk rows of ``selector`` with a point in ``[start, end)`` (by their
        ``t_min``/``t_max``), with the blobs when ``blobs``; from ``snap`` (a
        ``snapshot()``) when given."""
        ds, cat = snap if snap is not None else self.snapshot()
        if cat.num_rows == 0:
            return self.schema.empty_table() if blobs else cat
        idx = self.offsets(cat, selector, start, end)
        # (one row: a zero-copy slice, ~10x cheaper than a take)
        rows = cat.slice(int(idx[0]), 1) if len(idx) == 1 else cat.take(pa.array(idx))
        if not blobs:
            return rows
        return self.blobs(ds, rows, idx, cat)

    def offsets(self, cat: pa.Table, selector: Selector, start: float, end: float) -> np.ndarray:
        """Catalogue offsets of ``selector``'s chunk rows with a point in ``[start, end)``;
        ordered by ``t_min`` per series when the selector names devices and metrics."""
        with self._lock:
            same = cat is self._catalog
            lo, hi = (self._lo, self._hi) if same else (None, None)
        if lo is None or hi is None:
            lo = np.array(cat.column("t_min").cast(pa.int64()), dtype=np.int64)
            hi = np.array(cat.column("t_max").cast(pa.int64()), dtype=np.int64)
        a, b = round(start * 1_000_000), round(end * 1_000_000)
        if (
            selector.devices
            and selector.metrics
            and not (selector.sites or selector.groups or selector.tags)
        ):
            # the dashboard's query: a lookup, not a scan of the catalogue
            by = self._series_rows(cat)
            found = [by[(d, m)] for d in selector.devices for m in selector.metrics if (d, m) in by]
            if not found:
                return np.zeros(0, dtype=np.int64)
            idx = found[0] if len(found) == 1 else np.concatenate(found)
            return idx[(hi[idx] >= a) & (lo[idx] < b)]
        mask = (hi >= a) & (lo < b)
        if mask.any():
            mask &= selector_mask(cat, selector)
        return np.flatnonzero(mask)

    @staticmethod
    def with_blobs(
        ds: Any,
        rows: pa.Table,
        idx: np.ndarray,
        schema: pa.Schema = CHUNK_SCHEMA,
    ) -> pa.Table:
        """``rows`` (catalogue rows at offsets ``idx``) with their blobs taken from ``ds``."""
        if len(idx) == 0:
            return schema.empty_table()
        names = [n for n in schema.names if n.endswith("_blob")]
        b = ds.take(idx.tolist(), columns=names)
        for name in names:
            rows = rows.append_column(name, b.column(name))
        return rows

    def blobs(
        self, ds: Any, rows: pa.Table, idx: np.ndarray, cat: pa.Table | None = None
    ) -> pa.Table:
        """``with_blobs``; when ``cat`` is the current catalogue, taken fragment by
        fragment (a one-series read takes from one fragment: ~0.2 ms instead of ~0.4 ms
        for a dataset ``take``, measured)."""
        with self._lock:
            current = cat is not None and cat is self._catalog and ds is self._ds
            frag, local, fragments, has = self._frag, self._local, self._fragments, self._has
            hit: list[tuple[bytes | None, ...]] | None = None
            # a bulk read (downsampling, a merge, a retention cut) goes to Lance: building
            # Arrow columns out of cached bytes, or caching what it took, costs a Python
            # object per row (+30 % for downsampling a day, measured)
            cached = self.cache_bytes and len(idx) <= CACHED_READ_ROWS
            keys = self._keys(idx) if current and cached and len(idx) else []
            if keys and self._cache:
                cache = self._cache
                if all(k in cache for k in keys):
                    hit = [cache[k] for k in keys]
                    for k in keys:
                        cache.move_to_end(k)
        if hit is not None:
            for j, name in enumerate(self.blob_columns):
                rows = rows.append_column(name, pa.array([h[j] for h in hit], pa.binary()))
            return rows
        if not current or len(idx) == 0:
            return self.with_blobs(ds, rows, idx, self.schema)
        if cached:
            out = self._blobs_uncached(ds, rows, idx, frag, local, fragments, has)
            self._cache_rows(out, keys)
            return out
        return self._blobs_uncached(ds, rows, idx, frag, local, fragments, has)

    def has_strings(self, cat: pa.Table, idx: np.ndarray) -> bool:
        """Whether any of catalogue rows ``idx`` holds strings (``s_blob``); True when it
        is not known (``cat`` not the current catalogue)."""
        with self._lock:
            if cat is not self._catalog:
                return True
            has = self._has.get("s_blob")
            return has is None or bool(has[idx].any())

    def series_of(self, cat: pa.Table, idx: np.ndarray) -> list[tuple[pa.Scalar, ...]] | None:
        """The series (``SERIES_COLUMNS`` as string scalars) of catalogue rows ``idx``,
        memoised per row read (reading them out of the catalogue costs ~1 us a scalar);
        None when ``cat`` is not the current catalogue."""
        with self._lock:
            current = cat is self._catalog
            names = self._names
        if not current:
            return None
        out = []
        for i in idx.tolist():
            got = names.get(i)
            if got is None:
                got = tuple(_string_scalar(cat.column(c)[i]) for c in SERIES_COLUMNS)
                names[i] = got
            out.append(got)
        return out

    def bounds(self, cat: pa.Table, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(t_min, t_max) in us of catalogue rows ``idx``."""
        with self._lock:
            if cat is self._catalog:
                return self._lo[idx], self._hi[idx]
        lo = np.array(cat.column("t_min").cast(pa.int64()), dtype=np.int64)
        hi = np.array(cat.column("t_max").cast(pa.int64()), dtype=np.int64)
        return lo[idx], hi[idx]

    def blob_tuples(
        self, ds: Any, cat: pa.Table, idx: np.ndarray
    ) -> list[tuple[bytes | None, ...]] | None:
        """The blobs of catalogue rows ``idx`` as bytes (``blob_columns`` order), from the
        cache or one take; None when ``cat`` is not the current catalogue."""
        with self._lock:
            if cat is not self._catalog or ds is not self._ds:
                return None
            keys, cache = self._keys(idx), self._cache
            if all(k in cache for k in keys):
                for k in keys:
                    cache.move_to_end(k)
                return [cache[k] for k in keys]
            frag, local, fragments, has = self._frag, self._local, self._fragments, self._has
        got = self._blobs_uncached(
            ds,
            pa.table({"cid": pa.array([k[0] for k in keys], pa.int64())}),
            idx,
            frag,
            local,
            fragments,
            has,
        )
        self._cache_rows(got, keys)
        cols = [got.column(c).to_pylist() for c in self.blob_columns]
        return list(zip(*cols, strict=True))

    def _blobs_uncached(
        self,
        ds: Any,
        rows: pa.Table,
        idx: np.ndarray,
        frag: np.ndarray,
        local: np.ndarray,
        fragments: dict[int, Any],
        has: dict[str, np.ndarray],
    ) -> pa.Table:
        if len(idx) == 1:  # the common one-series read: one row, no bookkeeping
            i = int(idx[0])
            names = [c for c in self.blob_columns if c not in has or has[c][i]]
            b = fragments[int(frag[i])].take([int(local[i])], columns=names)
            for name in self.blob_columns:
                col = b.column(name) if name in names else pa.nulls(1, pa.binary())
                rows = rows.append_column(name, col)
            return rows
        fids = frag[idx]
        if bool((fids != fids[0]).any()):
            # rows in several fragments: one dataset take beats a take per fragment
            return self.with_blobs(ds, rows, idx, self.schema)
        parts = []
        order = []
        for fid in np.unique(fids).tolist():
            at = np.flatnonzero(fids == fid)
            # a fragment takes strictly increasing offsets
            u, inv = np.unique(local[idx[at]], return_inverse=True)
            got = fragments[fid].take(u.tolist(), columns=self.blob_columns)
            if len(u) != len(at) or bool((inv != np.arange(len(at))).any()):
                got = got.take(pa.array(inv))
            parts.append(got)
            order.append(at)
        b = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        if len(parts) > 1:
            inverse = np.empty(len(idx), dtype=np.int64)
            inverse[np.concatenate(order)] = np.arange(len(idx))
            b = b.take(pa.array(inverse))
        for name in self.blob_columns:
            rows = rows.append_column(name, b.column(name))
        return rows

    def points(self) -> int:
        _ds, cat = self.snapshot()
        return int(pc.sum(cat.column("n")).as_py() or 0) if cat.num_rows else 0

    def next_cid(self) -> int:
        _ds, cat = self.snapshot()
        top = int(pc.max(cat.column("cid")).as_py() or 0) if cat.num_rows else 0
        with self._lock:  # a deleted row's cid is not reused: the cache knows it by cid
            return max(top, self._max_cid) + 1

    # --- writes (the store serialises them) --------------------------------------------
    def append(self, rows: pa.Table) -> None:
        import lance

        if rows.num_rows == 0:
            return
        rows = rows.select(self.schema.names).cast(self.schema)
        mode = "append" if self.exists() else "create"
        lance.write_dataset(rows, self.uri, schema=self.schema, mode=mode)
        with self._lock:
            self._max_cid = max(self._max_cid, int(pc.max(rows.column("cid")).as_py() or 0))
        self._cache_rows(rows)
        self.refresh()

    def delete_cids(self, cids: list[int] | tuple[int, int]) -> None:
        """Delete chunk rows by id: a list of ids, or a range ``(lo, hi)`` (``hi``
        excluded)."""
        import lance

        if not self.exists():
            return
        if isinstance(cids, tuple):
            pred = f"cid >= {int(cids[0])} AND cid < {int(cids[1])}"
        elif cids:
            pred = f"cid IN ({', '.join(str(int(c)) for c in cids)})"
        else:
            return
        lance.dataset(self.uri).delete(pred)
        self.refresh()

    def maintain(self, keep: Any) -> None:
        """Compact what deletes left behind and drop old versions."""
        import lance

        if not self.exists():
            return
        ds = lance.dataset(self.uri)
        if len(ds.get_fragments()) > 8 or any(
            f.metadata.deletion_file is not None for f in ds.get_fragments()
        ):
            ds.optimize.compact_files(target_rows_per_fragment=1 << 20)
            self.refresh()
        lance.dataset(self.uri).cleanup_old_versions(older_than=keep)
