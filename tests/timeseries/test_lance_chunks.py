"""The LanceDB store's series-chunk layout (issue 19): closed windows move from the row
table into one row per (series, chunk); queries, late points, retention, rollups and old
stores keep giving the very same data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.timeseries import lance_chunks
from twin.timeseries.base import Record, Selector, TimeSeriesQuery
from twin.timeseries.lance import LanceStore
from twin.timeseries.retention import RetentionManager, RetentionPolicy

T0 = 1_700_006_400.0  # a day boundary (2023-11-15)
H = 3600.0


def _open(path: Path, **kw: object) -> LanceStore:
    return LanceStore(path, min_free_bytes=0, chunk_seconds=6 * H, chunk_grace=60.0, **kw)  # type: ignore[arg-type]


def _records(hours: float = 30, devices: int = 4, seed: int = 1) -> list[Record]:
    rng = np.random.default_rng(seed)
    out: list[Record] = []
    for d in range(devices):
        phase = rng.uniform(0, 90)
        t = (
            T0
            + phase
            + np.arange(0, hours * H / 90) * 90
            + rng.integers(0, 3000, int(hours * 40)) / 1000
        )
        temp = 20 + np.cumsum(rng.normal(0, 0.1, t.size))
        counter = np.cumsum(rng.integers(0, 40, t.size))
        for i, ts in enumerate(t.tolist()):
            out.append((f"d{d}", "temp", float(temp[i]), ts, int(i % 50 == 7), "s", "g", ",a,"))
            out.append((f"d{d}", "count", int(counter[i]), ts, 0, "s", "g", ",a,"))
            out.append((f"d{d}", "on", bool((i // 37) % 2), ts, 0, "s", "g", ",a,"))
            if i % 100 == 0:
                out.append((f"d{d}", "state", f"mode{i % 3}", ts, 0, "s", "g", ",a,"))
    return out


def _write(store: LanceStore, recs: list[Record], batch: int = 5000) -> None:
    for i in range(0, len(recs), batch):
        store.write_records(recs[i : i + batch])


def _canon(t: pa.Table) -> list[tuple[object, ...]]:
    out = []
    for r in t.to_pylist():
        v = r["value"]
        bits = None if v is None else int(np.array([v]).view(np.uint64)[0])
        out.append(
            (
                r["device"],
                r["metric"],
                r["ts"],
                bits,
                r["value_str"],
                r["kind"],
                r["quality"],
                r["site"],
                r["group"] if "group" in r else r["grp"],
                r["tags"],
            )
        )
    return sorted(out, key=repr)


def _all(store: LanceStore) -> list[tuple[object, ...]]:
    return _canon(store.read_raw(Selector(), 0, 4e9))


def _aggs(store: LanceStore, bucket: str) -> pa.Table:
    q = TimeSeriesQuery(
        T0 - H,
        T0 + 40 * H,
        bucket=bucket,
        aggregates=("avg", "min", "max", "count", "first", "last", "sum"),
    )
    t = store.query(q)
    return t.sort_by([(c, "ascending") for c in t.column_names if c in ("ts", "device", "metric")])


def same_aggs(store: object, aggs: dict[str, pa.Table]) -> None:
    """``store``'s aggregates (``_aggs``) equal ``aggs`` taken before: exact but for
    avg/sum (summed in another order)."""
    for b, want in aggs.items():
        got = _aggs(store, b)  # type: ignore[arg-type]
        assert got.column_names == want.column_names
        for col in got.column_names:
            g, w = got.column(col).to_pylist(), want.column(col).to_pylist()
            if col in ("avg", "sum"):
                assert np.allclose(
                    np.array(g, dtype=float), np.array(w, dtype=float), rtol=1e-12, equal_nan=True
                )
            else:
                assert g == w, (b, col)


def one_minute_policy() -> RetentionPolicy:
    """Raw kept, a 1-minute tier kept: what the rollup tests downsample with."""
    return RetentionPolicy.from_doc(
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "tiers": [{"resolution": "raw", "keep": "inf"}, {"resolution": "1m", "keep": "inf"}]
            },
        }
    )


def test_closed_windows_become_chunks_and_read_back_identical(tmp_path: Path) -> None:
    store = _open(tmp_path / "ts")
    recs = _records()
    _write(store, recs)
    before = _all(store)
    aggs = {b: _aggs(store, b) for b in ("1m", "1h", "1d")}
    store.maintain(force=True)
    assert store._chunks.exists()
    # 30 h of data: windows [0, 6), ... [18, 24) h are closed; [24, 30) is still live
    raw_rows = store._table("raw").count_rows()
    assert 0 < raw_rows < len(recs) / 4
    assert store.stats().points == len(recs)
    assert _all(store) == before
    same_aggs(store, aggs)
    # one series over one hour, inside a closed window and across the live edge
    # (every metric: codes or strings in some chunk rows, none in others — a one-row read
    # takes only the blob columns its row holds)
    for metric, span in (("temp", H), ("count", H), ("on", H), ("state", 4 * H)):
        for a, b in ((T0 + 2 * H, T0 + 2 * H + span), (T0 + 23.5 * H, T0 + 23.5 * H + span)):
            sel = Selector.of(devices="d1", metrics=metric)
            got = _canon(store.read_raw(sel, a, b))
            want = [
                r for r in before if r[0] == "d1" and r[1] == metric and a <= r[2].timestamp() < b
            ]
            assert got == want and got
    # whole-chunk aggregates come from the stored stats: no decoding
    calls = []
    orig = lance_chunks.ChunkTable.with_blobs

    def spy(*a: object) -> pa.Table:
        calls.append(1)
        return orig(*a)  # type: ignore[arg-type]

    lance_chunks.ChunkTable.with_blobs = staticmethod(spy)  # type: ignore[method-assign]
    try:
        store.query(TimeSeriesQuery(T0, T0 + 24 * H, bucket="6h", aggregates=("avg", "count")))
    finally:
        lance_chunks.ChunkTable.with_blobs = staticmethod(orig)  # type: ignore[method-assign]
    assert not calls


def test_late_points_merge_into_closed_chunks(tmp_path: Path) -> None:
    store = _open(tmp_path / "ts")
    recs = _records(hours=14)
    _write(store, recs)
    store.maintain(force=True)
    chunk_rows = store._chunks.snapshot()[1].num_rows
    late: list[Record] = [
        ("d0", "temp", -0.0, T0 + 1 * H + 0.25, 0, "s", "g", ",a,"),
        ("d0", "temp", 5e-324, T0 + 1 * H + 0.25, 0, "s", "g", ",a,"),  # a duplicate time
        ("d2", "count", 123456789, T0 + 7 * H, 0, "s", "g", ",a,"),
        ("d9", "new", 1.5, T0 + 2 * H, 0, "s", "g", ",a,"),  # a new series in a closed window
    ]
    store.write_records(late)
    want = _canon(pa.concat_tables([store.read_raw(Selector(), 0, 4e9)]))
    assert len(want) == len(recs) + len(late)  # the query merges both layouts
    store.maintain(force=True)
    cat = store._chunks.snapshot()[1]
    assert cat.num_rows == chunk_rows + 1  # merged, one row per series and window
    keys = list(zip(*(cat.column(c).to_pylist() for c in ("device", "metric", "ts")), strict=True))
    assert len(set(keys)) == len(keys)
    assert _all(store) == want


def _rows_per_series_day(store: LanceStore, before: float) -> list[int]:
    cat = store._chunks.snapshot()[1]
    days: dict[tuple[object, ...], int] = {}
    for d, m, ts in zip(
        *(cat.column(c).to_pylist() for c in ("device", "metric", "ts")), strict=True
    ):
        if ts.timestamp() < before:
            k = (d, m, ts.timestamp() // 86400)
            days[k] = days.get(k, 0) + 1
    return sorted(set(days.values()))


def test_closed_days_merge_into_one_row_per_series(tmp_path: Path) -> None:
    store = _open(tmp_path / "ts")
    recs = _records(hours=30)
    _write(store, recs)
    before = _all(store)
    aggs = {b: _aggs(store, b) for b in ("1h", "1d")}
    store.maintain(force=True)
    # day 0 has closed (data runs to 30 h): one row per series; day 1 keeps its windows
    assert _rows_per_series_day(store, T0 + 24 * H) == [1]
    assert _all(store) == before
    same_aggs(store, aggs)
    sel = Selector.of(devices="d1", metrics="temp")
    got = _canon(store.read_raw(sel, T0 + 5 * H, T0 + 7 * H))
    assert got == [
        r for r in before if r[:2] == ("d1", "temp") and 5 * H <= r[2].timestamp() - T0 < 7 * H
    ]
    # a late point into the merged day: exact at once, one row per series-day again after
    late: Record = ("d1", "temp", 1.25, T0 + 13 * H + 0.5, 0, "s", "g", ",a,")
    store.write_records([late])
    want = _canon(store.read_raw(Selector(), 0, 4e9))
    assert len(want) == len(before) + 1
    store.maintain(force=True)
    assert _all(store) == want
    assert _rows_per_series_day(store, T0 + 24 * H) == [1]
    # retention cutting into a merged day: exact, and what is kept stays one day row
    cut = T0 + 7.5 * H + 17
    dropped = store.delete_before("raw", Selector(), cut)
    assert dropped == sum(1 for r in want if r[2].timestamp() < cut)
    assert _all(store) == [r for r in want if r[2].timestamp() >= cut]
    assert _rows_per_series_day(store, T0 + 24 * H) == [1]


def test_retention_and_rollups_on_chunks(tmp_path: Path) -> None:
    store = _open(tmp_path / "ts")
    recs = _records(hours=30)
    _write(store, recs)
    store.maintain(force=True)
    rolled = RetentionManager(store, [one_minute_policy()]).downsample(now=T0 + 24 * H)
    assert sum(rolled.values()) > 0
    want = store.aggregate("raw", Selector(), T0, T0 + 24 * H, 60.0)
    got = store.aggregate("agg_60s", Selector(), T0, T0 + 24 * H, 60.0)
    assert got.num_rows == want.num_rows
    assert sorted(got.column("count").to_pylist()) == sorted(want.column("count").to_pylist())
    # a cut inside a chunk window
    cut = T0 + 7.5 * H + 17
    before = _all(store)
    dropped = store.delete_before("raw", Selector(), cut)
    assert dropped == sum(1 for r in before if r[2].timestamp() < cut)
    assert _all(store) == [r for r in before if r[2].timestamp() >= cut]
    raw = next(t for t in store.stats().tiers if t.tier == "raw")
    assert raw.points == len(before) - dropped


def test_old_row_layout_store_opens_and_migrates_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ts"
    # the layout every store had before issue 19: the row table alone
    old = LanceStore(path, min_free_bytes=0, chunk_seconds=None)
    recs = _records(hours=20)
    _write(old, recs)
    old.maintain(force=True)
    assert not (path / "raw_chunks.lance").exists()
    before = _all(old)
    aggs = _aggs(old, "1h")
    old.close()

    new = _open(path)
    assert _all(new) == before  # opens as it is
    new.maintain()
    assert (path / "raw_chunks.lance").exists()
    assert new._table("raw").count_rows() < len(recs) / 2
    assert _all(new) == before
    assert _aggs(new, "1h").column("count").to_pylist() == aggs.column("count").to_pylist()
    new.close()
    assert _all(_open(path)) == before


def test_an_interrupted_chunk_commit_is_undone_or_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ts"
    store = _open(path)
    _write(store, _records(hours=14))
    before = _all(store)

    class Crash(Exception):
        pass

    orig_append = lance_chunks.ChunkTable.append

    def append_then_crash(self: lance_chunks.ChunkTable, rows: pa.Table) -> None:
        orig_append(self, rows)
        raise Crash

    monkeypatch.setattr(lance_chunks.ChunkTable, "append", append_then_crash)
    with pytest.raises(Crash), store._maint_lock:
        store.compact_chunks()
    monkeypatch.undo()
    again = _open(path)  # the chunks were added, the raw rows not deleted: undone
    assert _all(again) == before
    again.maintain(force=True)
    assert _all(again) == before

    # a late point, then a crash after the raw delete, before the old chunk is dropped
    again.write_records([("d0", "temp", 1.25, T0 + H, 0, "s", "g", ",a,")])
    before = _all(again)
    orig_delete = lance_chunks.ChunkTable.delete_cids

    def crash_on_delete(self: lance_chunks.ChunkTable, cids: object) -> None:
        raise Crash

    monkeypatch.setattr(lance_chunks.ChunkTable, "delete_cids", crash_on_delete)
    with pytest.raises(Crash), again._maint_lock:
        again.compact_chunks()
    monkeypatch.setattr(lance_chunks.ChunkTable, "delete_cids", orig_delete)
    third = _open(path)  # finished: the old chunk row goes
    assert _all(third) == before


values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, 5e-324, -2.2250738585072014e-308, 1e308]),
    st.integers(-(2**53), 2**53),
    st.booleans(),
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(["x", "y"]),
            st.integers(0, 48 * 3600 * 1000),  # ms over two days, any order, duplicates
            values,
            st.sampled_from([0, 0, 1, 2]),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_store_round_trip_is_bit_exact(
    tmp_path_factory: pytest.TempPathFactory, pts: list[tuple[str, str, int, object, int]]
) -> None:
    store = _open(tmp_path_factory.mktemp("ts"))
    recs: list[Record] = [(d, m, v, T0 + ms / 1000, q, "s", "g", ",") for d, m, ms, v, q in pts]  # type: ignore[misc]
    recs.append(("z", "x", 1.0, T0 + 60 * H, 0, "s", "g", ","))  # closes every window before
    store.write_records(recs)
    before = _all(store)
    store.maintain(force=True)
    assert store._table("raw").count_rows() == 1  # everything else is in chunks now
    assert _all(store) == before
    store.close()


def test_open_window_rows_merge_when_it_closes(tmp_path: Path) -> None:
    store = _open(tmp_path / "ts")
    recs = _records(hours=20, devices=2)
    first = [r for r in recs if r[3] < T0 + 14 * H]
    _write(store, first)
    store.maintain(force=True)  # [12 h, 14 h) of the open window [12, 18) becomes chunk rows
    assert store._table("raw").count_rows() < 100
    _write(store, [r for r in recs if r[3] >= T0 + 14 * H])
    store.maintain(force=True)  # now [12, 18) is closed: one row per series again
    cat = store._chunks.snapshot()[1]
    closed = cat.filter(
        pa.compute.less(cat.column("ts").cast(pa.int64()), int((T0 + 18 * H) * 1e6))
    )
    keys = list(
        zip(*(closed.column(c).to_pylist() for c in ("device", "metric", "ts")), strict=True)
    )
    assert len(set(keys)) == len(keys)
    assert _all(store) == _canon(_raw_of(recs))


def _raw_of(recs: list[Record]) -> pa.Table:
    from twin.timeseries.base import records_to_table

    t = records_to_table(recs)
    return t.rename_columns([("group" if c == "grp" else c) for c in t.column_names])


def test_blobs_taken_by_fragment_match_a_dataset_take(tmp_path: Path) -> None:
    """``ChunkTable.blobs`` takes from each fragment by its live-row offset: over several
    fragments with deleted rows, in any order and with repeats, it returns what a dataset
    ``take`` returns."""
    from twin.timeseries.chunks import META_COLUMNS

    store = LanceStore(tmp_path / "ts", min_free_bytes=0, chunk_seconds=3600)
    for seed in (1, 2, 3):  # late points merged into closed chunks: more fragments
        store.write_records(_records(9, seed=seed))
        store.compact_chunks(now=T0 + 40 * 86400, force=True)
    table = store._chunks
    _ds, cat = table.snapshot()
    table.delete_cids([int(c) for c in cat.column("cid").to_pylist()[1::5]])
    ds, cat = table.snapshot()
    assert len(ds.get_fragments()) > 1
    assert any(f.metadata.deletion_file is not None for f in ds.get_fragments())
    rng = np.random.default_rng(3)
    for _ in range(20):
        idx = rng.integers(0, cat.num_rows, rng.integers(1, 12))
        rows = cat.take(pa.array(idx)).select(META_COLUMNS)
        fast = table.blobs(ds, rows, idx, cat)
        plain = lance_chunks.ChunkTable.with_blobs(ds, rows, idx)
        assert fast.equals(plain)


@pytest.mark.parametrize("cache", [128 << 20, 4096, 0])
def test_one_series_reads_match_the_whole_store(tmp_path: Path, cache: int) -> None:
    """The dashboard's read (one device, one metric: blobs from the cache or one take,
    ``chunks.decode_series``) gives exactly the store's points of that series and range:
    over merged day rows, 6-hour rows, late points not merged yet (overlapping rows), the
    row layout of the open window, a string series, a reopened store (cold cache), with a
    cache that evicts and with none."""
    store = _open(tmp_path / "ts", chunk_cache_bytes=cache)
    _write(store, _records(hours=40, devices=3))
    store.maintain(force=True)
    late: list[Record] = [
        ("d0", "temp", -0.0, T0 + 1 * H + 0.25, 0, "s", "g", ",a,"),
        ("d0", "temp", float("nan"), T0 + 1 * H + 0.25, 2, "s", "g", ",a,"),
        ("d1", "count", 7, T0 + 30 * H + 1, 0, "s", "g", ",a,"),
    ]
    store.write_records(late)
    rng = np.random.default_rng(5)

    def check(s: LanceStore) -> None:
        everything = _all(s)
        for _ in range(40):
            d, m = f"d{rng.integers(0, 3)}", ["temp", "count", "on", "state"][rng.integers(0, 4)]
            a = T0 + float(rng.uniform(-2, 42)) * H
            b = a + float(rng.choice([0.5, 1, 7, 30])) * H
            got = s.read_raw(Selector.of(devices=d, metrics=m), a, b)
            ts = got.column("ts").cast(pa.int64()).to_numpy()
            assert bool(np.all(ts[1:] >= ts[:-1]))  # by time
            assert _canon(got) == [
                r for r in everything if r[:2] == (d, m) and a <= r[2].timestamp() < b
            ]

    check(store)
    assert store._chunks.cached_bytes() <= cache
    check(_open(tmp_path / "ts", chunk_cache_bytes=cache))
