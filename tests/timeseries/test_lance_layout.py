"""LanceDB on-disk layout: compressed time columns, and stores created in older layouts."""

from __future__ import annotations

from pathlib import Path

import lance
import lancedb
import pyarrow as pa

from twin.timeseries.base import (
    PARTIAL_SCHEMA,
    RAW_SCHEMA,
    Record,
    Selector,
    TimeSeriesQuery,
    records_to_table,
)
from twin.timeseries.lance import LANCE_PARTIAL_SCHEMA, LANCE_RAW_SCHEMA, LanceStore
from twin.timeseries.partial_chunks import PCHUNK_SCHEMA
from twin.timeseries.retention import RetentionManager, RetentionPolicy

T0 = 1_700_006_400.0  # a day (and hour) boundary


def _records(start: int, n: int) -> list[Record]:
    return [
        (f"d{d}", "temperature", 20.0 + i * 0.01 + d, T0 + i * 60, 0, "s", "g", ",")
        for i in range(start, start + n)
        for d in range(3)
    ]


def _policy() -> RetentionPolicy:
    return RetentionPolicy.from_doc(
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "tiers": [
                    {"resolution": "raw", "keep": "inf"},
                    {"resolution": "10m", "keep": "inf"},
                ]
            },
        }
    )


def test_new_tables_use_the_compressed_layout(tmp_path: Path) -> None:
    store = LanceStore(tmp_path / "ts", min_free_bytes=0)
    store.write_records(_records(0, 120))
    RetentionManager(store, [_policy()]).downsample(now=T0 + 120 * 60)
    db = lancedb.connect(str(tmp_path / "ts"))
    raw = db.open_table("raw").schema
    assert raw.field("ts").metadata == LANCE_RAW_SCHEMA.field("ts").metadata
    assert b"lance-encoding:compression" in raw.field("ts").metadata
    # tiers: one row per series and rollup window (``partial_chunks.py``), no row table
    tier = lance.dataset(str(tmp_path / "ts" / "agg_600s_chunks.lance"))
    assert tier.schema == PCHUNK_SCHEMA
    assert tier.count_rows() == 3  # three series, one window
    assert not (tmp_path / "ts" / "agg_600s.lance").exists()


def test_store_created_in_the_old_plain_layout_still_works(tmp_path: Path) -> None:
    path = tmp_path / "ts"
    path.mkdir()
    db = lancedb.connect(str(path))
    # the original layout: RAW_SCHEMA / PARTIAL_SCHEMA as they are, no Lance field metadata
    plain_raw = pa.schema([f.remove_metadata() for f in RAW_SCHEMA])
    db.create_table("raw", data=records_to_table(_records(0, 60)).cast(plain_raw))
    db.create_table("agg_600s", schema=pa.schema([f.remove_metadata() for f in PARTIAL_SCHEMA]))

    store = LanceStore(path, min_free_bytes=0, compact_every=2)
    for k in range(1, 4):  # appends to the old table, compaction and index build included
        store.write_records(_records(60 * k, 60))
    store.maintain(force=True)
    raw = store.read_raw(Selector.of(devices="d1"), T0, T0 + 240 * 60)
    assert raw.num_rows == 240
    assert raw.column("value").to_pylist()[:2] == [21.0, 21.01]

    written = RetentionManager(store, [_policy()]).downsample(now=T0 + 240 * 60)
    assert written == {"agg_600s": 24 * 3}
    out = store.query(
        TimeSeriesQuery(
            T0, T0 + 240 * 60, Selector.of(devices="d0"), bucket="1h", aggregates=("count",)
        )
    )
    assert out.column("count").to_pylist() == [60, 60, 60, 60]


def test_decimal_value_layout_is_exact(tmp_path: Path) -> None:
    import math

    from twin.timeseries.lance import _decode_values, _encode_values

    values = [21.53, 0.1, -0.0, 0.0, 1e300, math.pi, 1 / 3, 123456.789012, -7.25, 2.0**60]
    values += [float("inf"), float("-inf"), 1e-7, 99.999999, 0.30000000000000004]
    recs: list[Record] = [("d", "m", v, T0 + i, 0, "s", "g", ",") for i, v in enumerate(values)] + [
        ("d", "s", "text", T0 + 100, 0, "s", "g", ",")
    ]
    table = records_to_table(recs)
    enc = _encode_values(table)
    assert enc.column("value_dec").null_count < len(values)  # some rows use the integers
    back = _decode_values(enc).column("value").to_pylist()
    for a, b in zip(back, table.column("value").to_pylist(), strict=True):
        assert (a is None and b is None) or (
            a is not None and b is not None and math.copysign(1, a) == math.copysign(1, b)
        )
        assert a == b
    store = LanceStore(tmp_path / "ts", min_free_bytes=0)
    store.write_records(recs)
    got = store.read_raw(Selector(), T0, T0 + 1000)
    assert (
        got.sort_by("ts").column("value").to_pylist()
        == table.sort_by("ts").column("value").to_pylist()
    )


def _index_types(path: Path, tier: str = "raw") -> dict[str, str]:
    import lance

    ds = lance.dataset(str(path / f"{tier}.lance"))
    return {d.field_names[0]: d.index_type.upper() for d in ds.describe_indices()}


def test_maintenance_clusters_small_fragments_by_series(tmp_path: Path) -> None:
    import lance
    import numpy as np

    from twin.timeseries.lance import cluster_order

    store = LanceStore(tmp_path / "ts", min_free_bytes=0, compact_every=1000, cluster_run=4)
    written = []
    for k in range(8):  # 8 appends, each one minute of 5 devices x 2 metrics
        recs: list[Record] = [
            (f"d{d}", m, 20.0 + k + d * 0.5, T0 + k * 60 + s, 0, "s", "g", ",")
            for d in range(5)
            for m in ("a", "b")
            for s in range(0, 60, 10)
        ]
        store.write_records(recs)
        written += recs
    ds = lance.dataset(str(tmp_path / "ts" / "raw.lance"))
    assert len(ds.get_fragments()) == 8
    store.maintain(force=True)
    ds = lance.dataset(str(tmp_path / "ts" / "raw.lance"))
    assert len(ds.get_fragments()) == 1
    table = ds.to_table(columns=["ts", "device", "metric"])
    # the fragment is exactly in cluster order: time chunks of 4 rows per series, each
    # sorted by (device, metric, ts)
    assert np.array_equal(cluster_order(table, 4), np.arange(table.num_rows))
    devices = table.column("device").to_pylist()
    assert devices[:4] == ["d0"] * 4 and devices[4] == "d0" and devices[8] == "d1"
    assert _index_types(tmp_path / "ts") == {
        "ts": "ZONEMAP",
        "device": "ZONEMAP",
        "metric": "BITMAP",
    }
    # every point is still there, with its value
    got = store.read_raw(Selector(), T0, T0 + 3600)
    assert got.num_rows == len(written)
    want = sorted((d, m, ts, v) for d, m, v, ts, *_ in written)
    rows = zip(
        got.column("device").to_pylist(),
        got.column("metric").to_pylist(),
        [t.timestamp() for t in got.column("ts").to_pylist()],
        got.column("value").to_pylist(),
        strict=True,
    )
    assert sorted(rows) == want
    one = store.read_raw(Selector.of(devices="d3", metrics="b"), T0 + 120, T0 + 240)
    assert one.column("value").to_pylist() == [23.5] * 6 + [24.5] * 6


def test_old_device_bitmap_is_replaced_and_old_store_reads(tmp_path: Path) -> None:
    path = tmp_path / "ts"
    path.mkdir()
    db = lancedb.connect(str(path))
    # the previous layout: LANCE_RAW_SCHEMA with BITMAP indexes on device and metric
    tbl = db.create_table("raw", schema=LANCE_RAW_SCHEMA)
    from twin.timeseries.lance import _conform, _encode_values

    for start in (0, 60):  # two appends compacted into one big, unclustered fragment
        tbl.add(_conform(_encode_values(records_to_table(_records(start, 60))), LANCE_RAW_SCHEMA))
    import lance

    tbl.to_lance().optimize.compact_files(target_rows_per_fragment=1 << 20)
    ds = lance.dataset(str(path / "raw.lance"))
    for col, kind in (("ts", "ZONEMAP"), ("device", "BITMAP"), ("metric", "BITMAP")):
        ds.create_scalar_index(col, kind)
    store = LanceStore(path, min_free_bytes=0, compact_every=1000, cluster_rows=256, cluster_run=4)
    assert len(ds.get_fragments()) == 1
    assert ds.get_fragments()[0].metadata.physical_rows >= 256 // 2
    before = store.read_raw(Selector.of(devices="d2"), T0, T0 + 3 * 3600)
    assert before.num_rows == 120 and before.column("value").to_pylist()[0] == 22.0
    store.write_records(_records(120, 60))
    store.maintain(force=True)
    assert _index_types(path)["device"] == "ZONEMAP"
    # the big fragment of the old layout was clustered too (once, with the index switch)
    import numpy as np

    from twin.timeseries.lance import cluster_order

    for frag in lance.dataset(str(path / "raw.lance")).get_fragments():
        rows = frag.to_table(columns=["ts", "device", "metric"])
        assert np.array_equal(cluster_order(rows, 4), np.arange(rows.num_rows))
    after = store.read_raw(Selector.of(devices="d2"), T0, T0 + 3 * 3600)
    assert after.num_rows == 180
    assert after.column("value").to_pylist()[:2] == [22.0, 22.01]
    assert after.column("value").to_pylist()[-1] == 22.0 + 179 * 0.01


def test_one_exponent_per_block_of_rows() -> None:
    from twin.timeseries.lance import _EXP_BLOCK, _decode_values, _encode_values

    values = [20.13, 20.1, 20.0, 19.5, 2.0**60, 0.1 + 0.2]
    recs: list[Record] = [("d", "m", v, T0 + i, 0, "s", "g", ",") for i, v in enumerate(values)]
    # a second block (rows are sorted by device) holding only one-decimal values
    recs += [("e", "m", 1.5 + i, T0 + i, 0, "s", "g", ",") for i in range(2 * _EXP_BLOCK)]
    table = records_to_table(recs)
    enc = _encode_values(table)
    exp = enc.column("value_exp").to_pylist()
    dec = enc.column("value_dec").to_pylist()
    # the first block shares exponent 2 (2010 for 20.1, 250 for e's 2.5); the two odd
    # values stay floats
    assert dec[:6] == [2013, 2010, 2000, 1950, None, None]
    assert enc.column("value").to_pylist()[4:6] == [2.0**60, 0.1 + 0.2]
    assert set(exp[:4] + exp[6:_EXP_BLOCK]) == {2} and dec[6:8] == [150, 250]
    # the next block only needs exponent 1
    assert set(exp[_EXP_BLOCK : 2 * _EXP_BLOCK]) == {1}
    assert dec[_EXP_BLOCK] == round((1.5 + _EXP_BLOCK - 6) * 10)
    back = _decode_values(enc).column("value").to_pylist()
    assert back == table.column("value").to_pylist()


def test_clustering_does_not_bring_deleted_rows_back(tmp_path: Path) -> None:
    import lance

    # the row table's own compaction: no series chunks (they would take these rows)
    store = LanceStore(tmp_path / "ts", min_free_bytes=0, compact_every=1000, chunk_seconds=None)
    for k in range(3):  # three small fragments
        store.write_records(
            [(f"d{i % 5}", "m", float(i), T0 + k * 1000 + i, 0, "s", "g", ",") for i in range(100)]
        )
    assert store.delete_before("raw", Selector(), T0 + 1050) == 150  # 1 1/2 fragments
    store.maintain(force=True)
    ds = lance.dataset(str(tmp_path / "ts" / "raw.lance"))
    assert [f.metadata.physical_rows for f in ds.get_fragments()] == [150]
    rest = store.read_raw(Selector(), 0, 2e9)
    assert rest.num_rows == 150
    assert min(t.timestamp() for t in rest.column("ts").to_pylist()) == T0 + 1050


def _partial_rows(sums: list[float | None]) -> pa.Table:
    n = len(sums)
    cols: dict[str, list[object]] = {
        "ts": [int((T0 + 600 * i) * 1_000_000) for i in range(n)],
        "device": ["d"] * n,
        "site": ["s"] * n,
        "grp": ["g"] * n,
        "tags": [","] * n,
        "metric": ["m"] * n,
        "count": [3] * n,
        "sum": sums,
        "min": [None if v is None else v - 1 for v in sums],
        "max": [None if v is None else v * 3 for v in sums],
        "first": sums,
        "last": [0.1 + 0.2] * n,
        "first_str": [None] * n,
        "last_str": [None] * n,
        "first_ts": [int((T0 + 600 * i) * 1_000_000) for i in range(n)],
        "last_ts": [int((T0 + 600 * i + 1) * 1_000_000) for i in range(n)],
    }
    return pa.table(
        {k: pa.array(v, PARTIAL_SCHEMA.field(k).type) for k, v in cols.items()},
        schema=PARTIAL_SCHEMA,
    )


def test_tier_partials_round_trip_exactly_as_chunks(tmp_path: Path) -> None:
    import math

    sums = [60.39, 20.1, -0.0, 1 / 3, 1e300, None, 0.30000000000000004, 7.0, math.inf]
    rows = _partial_rows(sums)
    store = LanceStore(tmp_path / "ts", min_free_bytes=0)
    store.replace_partials("agg_600s", Selector(), T0, T0 + 600 * len(sums), rows)
    disk = lance.dataset(str(tmp_path / "ts" / "agg_600s_chunks.lance"))
    assert disk.count_rows() == 1  # one series, one window
    back = store.aggregate("agg_600s", Selector(), T0, T0 + 600 * len(sums), 600.0).sort_by("ts")
    for name in ("sum", "min", "max", "first", "last"):
        got, want = back.column(name).to_pylist(), rows.column(name).to_pylist()
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or (
                a == b and math.copysign(1, a) == math.copysign(1, b)
            )


def test_tier_table_of_the_previous_layout_still_works(tmp_path: Path) -> None:
    path = tmp_path / "ts"
    path.mkdir()
    previous = pa.schema([f for f in LANCE_PARTIAL_SCHEMA if not f.name.endswith(("_dec", "_exp"))])
    db = lancedb.connect(str(path))
    # rows of the row layout: three 10-minute partials from T0, and two later ones
    old = _partial_rows([1.0, 2.0, 3.0, 4.0, 5.0])
    db.create_table(
        "agg_600s",
        data=old.cast(pa.schema([f.remove_metadata() for f in old.schema])).cast(previous),
    )
    store = LanceStore(path, min_free_bytes=0)
    rows = _partial_rows([1.5, 2.25, None])
    store.replace_partials("agg_600s", Selector(), T0, T0 + 1800, rows)
    assert "sum_dec" not in db.open_table("agg_600s").schema.names
    # the window's old rows are gone from the row table, the new partials are chunks
    assert db.open_table("agg_600s").count_rows() == 2
    assert store.tiers() == ["agg_600s"]
    back = store.aggregate("agg_600s", Selector(), T0, T0 + 3000, 600.0).sort_by("ts")
    assert back.column("sum").to_pylist() == [1.5, 2.25, None, 4.0, 5.0]
    assert back.column("count").to_pylist() == [3, 3, 3, 3, 3]
    assert store.earliest("agg_600s", Selector(), T0 + 3000) == T0
    assert {t.tier: t.points for t in store.stats().tiers}["agg_600s"] == 5
    # retention reaches both layouts
    assert store.delete_before("agg_600s", Selector(), T0 + 2400) == 4
    back = store.aggregate("agg_600s", Selector(), T0, T0 + 3000, 600.0)
    assert back.column("sum").to_pylist() == [5.0]
