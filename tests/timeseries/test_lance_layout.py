"""LanceDB on-disk layout: compressed time columns, and stores created in older layouts."""

from __future__ import annotations

from pathlib import Path

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
    tier = db.open_table("agg_600s").schema
    for name in ("ts", "first_ts", "last_ts"):
        assert tier.field(name).metadata == LANCE_PARTIAL_SCHEMA.field(name).metadata


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
