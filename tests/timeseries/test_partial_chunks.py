"""Downsampling tiers stored as partial chunks (``partial_chunks.py``): bit-exact round
trips of any partial rows, and the store's rollup, replace and retention over them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.timeseries.test_codec import float_bits
from twin.timeseries import codec
from twin.timeseries.base import PARTIAL_SCHEMA, Selector, TimeSeriesQuery
from twin.timeseries.lance import LanceStore
from twin.timeseries.partial_chunks import build_partial_chunks, decode_partial_chunks
from twin.timeseries.retention import RetentionManager, RetentionPolicy

T0 = 1_699_999_200  # a whole hour: rollup windows are bucket-aligned
RES = 60.0

maybe_float = st.one_of(st.none(), float_bits)
partial = st.tuples(
    st.integers(0, 3),  # series
    st.integers(0, 200),  # bucket
    st.integers(0, 10**6),  # count
    maybe_float,  # sum
    maybe_float,  # min
    maybe_float,  # max
    maybe_float,  # first
    maybe_float,  # last
    st.one_of(st.none(), st.text(max_size=4)),  # first_str
    st.one_of(st.none(), st.text(max_size=4)),  # last_str
    st.one_of(st.none(), st.integers(0, 59_999_999)),  # first_ts offset in the bucket
    st.one_of(st.none(), st.integers(-(10**9), 10**9)),  # last_ts offset
)


def _table(rows: list[tuple[object, ...]]) -> pa.Table:
    seen: dict[tuple[object, object], tuple[object, ...]] = {}
    for r in rows:  # one partial per (series, bucket)
        seen[(r[0], r[1])] = r
    rows = list(seen.values())
    bucket_us = int(RES * 1_000_000)

    def ts(b: object) -> int:
        return int(T0 * 1_000_000) + int(b) * bucket_us  # type: ignore[call-overload]

    cols: dict[str, list[object]] = {
        "ts": [ts(r[1]) for r in rows],
        "device": [f"d{r[0]}" for r in rows],
        "site": ["s"] * len(rows),
        "grp": [f"g{int(r[0]) % 2}" for r in rows],  # type: ignore[call-overload]
        "tags": [","] * len(rows),
        "metric": ["m"] * len(rows),
        "count": [r[2] for r in rows],
        "sum": [r[3] for r in rows],
        "min": [r[4] for r in rows],
        "max": [r[5] for r in rows],
        "first": [r[6] for r in rows],
        "last": [r[7] for r in rows],
        "first_str": [r[8] for r in rows],
        "last_str": [r[9] for r in rows],
        "first_ts": [None if r[10] is None else ts(r[1]) + int(r[10]) for r in rows],  # type: ignore[call-overload]
        "last_ts": [None if r[11] is None else ts(r[1]) + int(r[11]) for r in rows],  # type: ignore[call-overload]
    }
    return pa.table(
        {k: pa.array(v, PARTIAL_SCHEMA.field(k).type) for k, v in cols.items()},
        schema=PARTIAL_SCHEMA,
    )


def _canon(table: pa.Table) -> list[tuple[object, ...]]:
    """Rows with floats as their bit patterns (NaN payloads, -0.0 compare exactly)."""
    out = []
    for row in table.to_pylist():
        key = []
        for name in PARTIAL_SCHEMA.names:
            v = row[name]
            if isinstance(v, float):
                v = np.float64(v).view(np.int64).item()
            key.append(v)
        out.append(tuple(key))
    return sorted(out, key=repr)


@settings(max_examples=150, deadline=None)
@given(st.lists(partial, max_size=60))
def test_partials_round_trip_bit_exact(rows: list[tuple[object, ...]]) -> None:
    table = _table(rows)
    chunks = build_partial_chunks(table, T0, RES, 1)
    assert chunks.num_rows == len({r[0] for r in rows})
    assert _canon(decode_partial_chunks(chunks)) == _canon(table)


def test_one_point_buckets_cost_no_extra_columns() -> None:
    n = 1440
    t = (T0 + np.arange(n) * 60 + 7) * 1_000_000
    v = 20 + np.cumsum(np.random.default_rng(1).normal(0, 0.05, n))
    table = pa.table(
        {
            "ts": pa.array((t // 60_000_000) * 60_000_000).cast(PARTIAL_SCHEMA.field("ts").type),
            "device": ["d"] * n,
            "site": ["s"] * n,
            "grp": ["g"] * n,
            "tags": [","] * n,
            "metric": ["m"] * n,
            "count": pa.array(np.ones(n, dtype=np.int64)),
            **{c: pa.array(v) for c in ("sum", "min", "max", "first", "last")},
            "first_str": pa.nulls(n, pa.string()),
            "last_str": pa.nulls(n, pa.string()),
            "first_ts": pa.array(t).cast(PARTIAL_SCHEMA.field("first_ts").type),
            "last_ts": pa.array(t).cast(PARTIAL_SCHEMA.field("last_ts").type),
        },
        schema=PARTIAL_SCHEMA,
    )
    row = build_partial_chunks(table, T0, 60.0, 1).to_pylist()[0]
    assert row["x_blob"] is None and row["m_blob"] is None and row["s_blob"] is None
    assert row["t_blob"] == b"\0"  # bucket starts derived from first_ts
    assert _canon(decode_partial_chunks(build_partial_chunks(table, T0, 60.0, 1))) == _canon(table)


def _policy() -> RetentionPolicy:
    return RetentionPolicy.from_doc(
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "tiers": [
                    {"resolution": "raw", "keep": "inf"},
                    {"resolution": "1m", "keep": "inf"},
                    {"resolution": "1h", "keep": "inf"},
                ]
            },
        }
    )


def _records(hours: int) -> list[tuple[str, str, float, float, int, str, str, str]]:
    rng = np.random.default_rng(5)
    out = []
    for d in range(3):
        t = T0 + np.arange(0, hours * 3600, 90.0) + rng.uniform(0, 3, hours * 40)
        v = 20 + np.cumsum(rng.normal(0, 0.05, len(t)))
        for ti, vi in zip(t.tolist(), v.tolist(), strict=True):
            out.append((f"d{d}", "temp", vi, ti, 0, "s", "g", ","))
        out.append((f"d{d}", "state", "on", T0 + 100.0 + d, 0, "s", "g", ","))
    return out


def _q(store: LanceStore, bucket: str, agg: str) -> list[object]:
    out = store.query(
        TimeSeriesQuery(
            T0, T0 + 6 * 3600, Selector.of(metrics="temp"), bucket=bucket, aggregates=(agg,)
        )
    )
    return out.sort_by([("device", "ascending"), ("ts", "ascending")]).column(agg).to_pylist()


def test_rollup_tiers_answer_as_raw_does(tmp_path: Path) -> None:
    """Rolled-up tiers (chunks) give the answers raw data gives; strings survive."""
    raw_only = LanceStore(tmp_path / "raw", min_free_bytes=0)
    store = LanceStore(tmp_path / "ts", min_free_bytes=0)
    for s in (raw_only, store):
        s.write_records(_records(6))
    written = RetentionManager(store, [_policy()]).downsample(now=T0 + 6 * 3600 + 7200)
    assert written["agg_60s"] > 0 and written["agg_3600s"] > 0
    for bucket, agg in (("1m", "avg"), ("1m", "last"), ("1h", "max"), ("1h", "count")):
        assert _q(store, bucket, agg) == _q(raw_only, bucket, agg), (bucket, agg)
    # the tier itself holds the string series' first/last
    tier = store.aggregate("agg_60s", Selector.of(metrics="state"), T0, T0 + 3600, 60.0)
    assert sorted(tier.column("first_str").to_pylist()) == ["on"] * 3
    # one row per series and window, not per bucket
    stats = {t.tier: t for t in store.stats().tiers}
    assert stats["agg_60s"].points == written["agg_60s"]
    assert stats["agg_60s"].rows < stats["agg_60s"].points / 20


def test_replace_over_part_of_a_chunk_keeps_the_rest(tmp_path: Path) -> None:
    store = LanceStore(tmp_path / "ts", min_free_bytes=0)
    store.write_records(_records(6))
    sel = Selector.of(metrics="temp")
    n = store.rollup("raw", "agg_60s", sel, T0, T0 + 6 * 3600, 60.0)
    before = store.aggregate("agg_60s", sel, T0, T0 + 6 * 3600, 60.0)
    assert before.num_rows == n
    # a later, misaligned window: hours 2-3 replaced by themselves, the rest untouched
    store.rollup("raw", "agg_60s", sel, T0 + 7200, T0 + 10800, 60.0)
    after = store.aggregate("agg_60s", sel, T0, T0 + 6 * 3600, 60.0)
    assert _canon(after) == _canon(before)
    # replaced by nothing: only that hour is gone
    store.replace_partials("agg_60s", sel, T0 + 7200, T0 + 10800, PARTIAL_SCHEMA.empty_table())
    gone = store.aggregate("agg_60s", sel, T0, T0 + 6 * 3600, 60.0)
    ts = [t.timestamp() for t in gone.column("ts").to_pylist()]
    assert gone.num_rows == n - sum(
        1 for t in before.column("ts").to_pylist() if T0 + 7200 <= t.timestamp() < T0 + 10800
    )
    assert not any(T0 + 7200 <= t < T0 + 10800 for t in ts)
    # reopened, the same
    store.close()
    again = LanceStore(tmp_path / "ts", min_free_bytes=0)
    assert _canon(again.aggregate("agg_60s", sel, T0, T0 + 6 * 3600, 60.0)) == _canon(gone)
    assert math.isclose(again.earliest("agg_60s", sel, T0 + 6 * 3600) or 0, T0, abs_tol=60)


def test_rollup_from_raw_chunks_equals_the_general_path(tmp_path: Path) -> None:
    """The series-by-series rollup (``from_raw_chunks``) writes exactly the partials
    ``aggregate`` computes from raw, with bad-quality points, a late chunk row beside a
    closed one (overlapping rows, a duplicate time), integers and a fast series."""
    from twin.timeseries.base import records_to_table
    from twin.timeseries.chunks import build_chunks

    rng = np.random.default_rng(9)
    recs = []
    for d in range(3):
        step = 10.0 if d == 2 else 90.0
        t = T0 + np.arange(0, 8 * 3600, step) + rng.uniform(0, 3, int(8 * 3600 / step))
        v = 20 + np.cumsum(rng.normal(0, 0.05, len(t)))
        for i, (ti, vi) in enumerate(zip(t.tolist(), v.tolist(), strict=True)):
            recs.append((f"d{d}", "temp", vi, ti, 2 if i % 17 == 3 else 0, "s", "g", ","))
            recs.append((f"d{d}", "count", i * 7, ti, 0, "s", "g", ","))
    store = LanceStore(tmp_path / "ts", min_free_bytes=0, chunk_seconds=3600)
    store.write_records(recs)
    store.compact_chunks(now=T0 + 40 * 86400, force=True)
    late = [(f"d{d}", "temp", 99.5 + d, T0 + 1800.5 + d, 0, "s", "g", ",") for d in range(3)]
    late.append(("d0", "temp", -1.0, recs[40][3], 0, "s", "g", ","))  # a duplicate time
    store._chunks.append(build_chunks(records_to_table(late), 3600, store._chunks.next_cid()))
    sel = Selector()
    end = T0 + 6 * 3600
    want = store.aggregate("raw", sel, T0, end, 60.0)
    built = store._rollup_raw_chunks(sel, T0, end, 60.0)
    assert built is not None and built.num_rows == 6  # the fast path, one row per series
    # the 90 s counters: first_ts/first are their raw chunks' columns, chained verbatim
    tags = [b[0] for b in built.column("ft_blob").to_pylist()]
    assert tags.count(codec.CHAIN) == 2
    n = store.rollup("raw", "agg_60s", sel, T0, end, 60.0)
    got = store.aggregate("agg_60s", sel, T0, end, 60.0)
    assert n == want.num_rows
    assert _canon(got) == _canon(want)
