"""A NaN value (only ``write_table`` lets one in: the ingest edges refuse them) aggregates
the same from the row layout, from series chunks and from a rollup tier built from chunks:
it counts as a point but, like a string point, not as a number — left out of sum/min/max
(null where a bucket has no other value), and a NaN first/last is null. Before, the
chunk path summed NaN into the chunk's stored statistics and its decoded partials (null
sums, averages and minima for every bucket touching one)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from tests.timeseries.test_lance_chunks import T0, H, _open, one_minute_policy
from tests.timeseries.test_postgres_chunks import _store, prefix  # noqa: F401 (fixture)
from twin.timeseries.base import RAW_SCHEMA, TS_TYPE, Selector, TimeSeriesQuery
from twin.timeseries.retention import RetentionManager

AGGS = ("avg", "min", "max", "count", "first", "last", "sum")


def _table(hours: float = 30) -> pa.Table:
    """Two series every 90 s with NaN values: every 7th point, a whole NaN hour (no
    number in its buckets) and a NaN first point of a day."""
    out = []
    for d, phase in (("a", 0.0), ("b", 31.5)):
        ts = T0 + phase + np.arange(0, hours * H, 90.0)
        v = 20 + np.sin(np.arange(ts.size) / 10)
        v[::7] = np.nan
        hour3 = (ts >= T0 + 3 * H) & (ts < T0 + 4 * H)
        v[hour3] = np.nan
        n = ts.size
        out.append(
            pa.Table.from_pydict(
                {
                    "ts": pa.array((ts * 1e6).astype(np.int64), TS_TYPE),
                    "device": [d] * n,
                    "site": ["s"] * n,
                    "grp": ["g"] * n,
                    "tags": [","] * n,
                    "metric": ["m"] * n,
                    "value": pa.array(v),
                    "value_str": pa.nulls(n, pa.string()),
                    "kind": pa.array(np.zeros(n, np.uint8)),
                    "quality": pa.array(np.zeros(n, np.uint8)),
                },
                schema=RAW_SCHEMA,
            )
        )
    return pa.concat_tables(out)


def _rows(store: Any, bucket: str) -> list[dict[str, object]]:
    q = TimeSeriesQuery(T0, T0 + 30 * H, bucket=bucket, aggregates=AGGS)
    t = store.query(q)
    t = t.sort_by([(c, "ascending") for c in ("device", "ts")])
    return t.select(["ts", "device", *AGGS]).to_pylist()


def _same(got: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k, wv in w.items():
            gv = g[k]
            if isinstance(wv, float) and isinstance(gv, float):
                assert not math.isnan(gv) and not math.isnan(wv), (k, g, w)
                assert gv == pytest.approx(wv, rel=1e-12), (k, g, w)
            else:
                assert gv == wv, (k, g, w)


def _check(store: Any) -> None:
    store.write_table(_table())
    want = {b: _rows(store, b) for b in ("1m", "1h", "1d")}
    # the row path's meaning: NaN left out, null where a bucket has nothing else
    hour3 = [r for r in want["1h"] if r["ts"].timestamp() == T0 + 3 * H]  # type: ignore[attr-defined]
    assert len(hour3) == 2
    for r in hour3:
        assert r["count"] == 40
        assert r["sum"] is None and r["min"] is None and r["avg"] is None
    assert all(r["sum"] is not None for r in want["1d"])
    store.maintain(force=True)
    for b, rows in want.items():
        _same(_rows(store, b), rows)


def _rollup_matches(store: Any) -> None:
    rolled = RetentionManager(store, [one_minute_policy()]).downsample(now=T0 + 24 * H)
    assert sum(rolled.values()) > 0
    for bucket in (60.0, 3600.0):
        want = store.aggregate("raw", Selector(), T0, T0 + 24 * H, bucket)
        got = store.aggregate("agg_60s", Selector(), T0, T0 + 24 * H, bucket)
        _same(_partial_rows(got), _partial_rows(want))


def _partial_rows(t: pa.Table) -> list[dict[str, object]]:
    cols = ["ts", "device", "count", "sum", "min", "max", "first", "last"]
    return t.sort_by([("device", "ascending"), ("ts", "ascending")]).select(cols).to_pylist()


def test_lance_nan_aggregates_match_between_rows_chunks_and_tiers(tmp_path: Path) -> None:
    store = _open(tmp_path / "ts")
    try:
        _check(store)
        _rollup_matches(store)
    finally:
        store.close()


def test_postgres_nan_aggregates_match_between_rows_and_chunks(prefix: str) -> None:  # noqa: F811
    store = _store(prefix)
    try:
        _check(store)
    finally:
        store.close()
