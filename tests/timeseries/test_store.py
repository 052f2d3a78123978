"""The same suite runs on every TimeSeriesStore (LanceDB and PostgreSQL)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from twin.timeseries.base import (
    DataPoint,
    Quality,
    Record,
    Selector,
    TimeSeriesQuery,
    TimeSeriesStore,
    canonical_tags,
    records_to_table,
    tag_value,
)

from .conftest import T0


def series(
    device: str, metric: str, n: int, step: float = 10.0, start: float = T0, **kw: str
) -> list[Record]:
    site = kw.get("site", "plant-a")
    group = kw.get("group", "line-1")
    tags = kw.get("tags", canonical_tags(["hvac"], {"floor": "2"}))
    return [(device, metric, float(i), start + i * step, 0, site, group, tags) for i in range(n)]


def test_canonical_tags_and_lookup() -> None:
    tags = canonical_tags(["hvac", "critical"], {"floor": 2})
    assert tags == ",critical,floor=2,hvac,"
    assert tag_value(tags, "floor") == "2"
    assert tag_value(tags, "hvac") == ""
    assert tag_value(tags, "room") is None
    assert canonical_tags() == ","


def test_datapoint_from_reading_maps_to_records() -> None:
    p = DataPoint.from_reading(
        "temp_sensor_01",
        "temperature",
        21.5,
        T0,
        "good",
        site="plant-a",
        group="line-1",
        tags=["hvac"],
        labels={"floor": "2"},
    )
    assert p.timestamp == datetime.fromtimestamp(T0, tz=UTC)
    (rec,) = p.records()
    assert rec == (
        "temp_sensor_01",
        "temperature",
        21.5,
        T0,
        0,
        "plant-a",
        "line-1",
        ",floor=2,hvac,",
    )
    multi = DataPoint("power", {"device": "m1"}, {"value": 1.0, "voltage": 230}, p.timestamp)
    assert sorted(r[1] for r in multi.records()) == ["power", "power.voltage"]
    with pytest.raises(ValueError):
        DataPoint("x", {}, {"value": 1}, p.timestamp)


def test_records_to_table_kinds() -> None:
    t = records_to_table(
        [
            ("d", "m", True, T0, 0, "", "", ","),
            ("d", "m", 3, T0 + 1, 1, "", "", ","),
            ("d", "m", "on", T0 + 2, 2, "", "", ","),
        ]
    )
    assert t.column("kind").to_pylist() == [1, 0, 2]
    assert t.column("value").to_pylist() == [1.0, 3.0, None]
    assert t.column("value_str").to_pylist() == [None, None, "on"]


def test_records_to_table_numeric_fast_path_matches_the_general_one() -> None:
    """Floats, ints and bools only go through the C-speed path; a string sends the batch
    through the general loop: both give the same kinds and bit-identical values."""
    vals: list[float] = [1.5, 7, True, False, 2**60 + 1, -0.0, 10**20, 5e-324]
    recs = [("d", "m", v, T0 + i, 0, "", "", ",") for i, v in enumerate(vals)]
    fast = records_to_table(recs)
    general = records_to_table([*recs, ("d", "m", "on", T0 + 99, 0, "", "", ",")])
    assert fast.column("kind").to_pylist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert fast.equals(general.slice(0, len(vals)))
    bits = np.asarray(fast.column("value").to_numpy()).view(np.uint64)
    assert bits.tolist() == np.array([float(v) for v in vals]).view(np.uint64).tolist()


def test_write_and_read_raw(store: TimeSeriesStore) -> None:
    assert store.write_records(series("d1", "temp", 10) + series("d2", "temp", 10)) == 20
    store.write_point(DataPoint.from_reading("d1", "state", "on", T0 + 5, site="plant-a"))
    store.write_batch([DataPoint.from_reading("d1", "alarm", True, T0 + 5, Quality.BAD)])
    t = store.query(TimeSeriesQuery(T0, T0 + 1000, Selector.of(devices="d1")))
    assert t.num_rows == 12
    assert "group" in t.column_names
    by_metric = {
        m: t.filter(pa.compute.equal(t.column("metric"), m)) for m in ("temp", "state", "alarm")
    }
    assert by_metric["temp"].column("value").to_pylist() == [float(i) for i in range(10)]
    assert by_metric["state"].column("value_str").to_pylist() == ["on"]
    assert by_metric["alarm"].column("quality").to_pylist() == [2]
    # time range is half-open [start, end)
    t2 = store.query(TimeSeriesQuery(T0 + 10, T0 + 30, Selector.of(devices="d2", metrics="temp")))
    assert t2.column("value").to_pylist() == [1.0, 2.0]


def test_aggregates_over_buckets(store: TimeSeriesStore) -> None:
    store.write_records(series("d1", "temp", 120, step=1.0, start=1_700_000_040.0))
    q = TimeSeriesQuery(
        1_700_000_040.0,
        1_700_000_160.0,
        Selector.of(devices="d1"),
        bucket="1m",
        aggregates=("avg", "min", "max", "sum", "count", "first", "last"),
    )
    t = store.query(q)
    rows = t.to_pylist()
    # epoch-aligned minutes: 1_700_000_040 is on a minute boundary
    assert [r["count"] for r in rows] == [60, 60]
    assert rows[0]["min"] == 0 and rows[0]["max"] == 59 and rows[0]["first"] == 0
    assert rows[0]["last"] == 59 and rows[0]["sum"] == sum(range(60))
    assert rows[1]["avg"] == pytest.approx(sum(range(60, 120)) / 60)


def test_bad_quality_is_skipped_by_aggregates(store: TimeSeriesStore) -> None:
    recs = series("d1", "temp", 6, step=1.0, start=1_700_000_040.0)
    recs[5] = (*recs[5][:4], 2, *recs[5][5:])  # type: ignore[assignment]
    store.write_records(recs)
    t = store.query(
        TimeSeriesQuery(1_700_000_040.0, 1_700_000_100.0, bucket=60, aggregates=("count", "max"))
    )
    assert t.to_pylist()[0]["count"] == 5
    assert t.to_pylist()[0]["max"] == 4


def test_stale_points_are_raw_but_not_aggregated(store: TimeSeriesStore) -> None:
    """Quality 3 (stale: the last good value re-reported after a failed poll) is stored and read
    back raw with its flag; aggregates count good and uncertain points only."""
    recs = series("d1", "temp", 6, step=1.0, start=1_700_000_040.0)
    recs[1] = (*recs[1][:4], int(Quality.UNCERTAIN), *recs[1][5:])  # type: ignore[assignment]
    recs[4] = (*recs[4][:2], recs[3][2], recs[4][3], int(Quality.STALE), *recs[4][5:])  # type: ignore[assignment]
    recs[5] = (*recs[5][:2], recs[3][2], recs[5][3], int(Quality.STALE), *recs[5][5:])  # type: ignore[assignment]
    store.write_records(recs)
    raw = store.query(TimeSeriesQuery(1_700_000_040.0, 1_700_000_100.0)).to_pylist()
    assert [r["quality"] for r in sorted(raw, key=lambda r: r["ts"])] == [0, 1, 0, 0, 3, 3]
    t = store.query(
        TimeSeriesQuery(1_700_000_040.0, 1_700_000_100.0, bucket=60, aggregates=("count", "max"))
    )
    assert t.to_pylist()[0]["count"] == 4
    assert t.to_pylist()[0]["max"] == 3


def test_selectors_and_group_by(store: TimeSeriesStore) -> None:
    store.write_records(
        series(
            "d1",
            "temp",
            6,
            step=10,
            site="a",
            group="g1",
            tags=canonical_tags(["hvac"], {"floor": "1"}),
        )
        + series(
            "d2", "temp", 6, step=10, site="a", group="g2", tags=canonical_tags([], {"floor": "2"})
        )
        + series(
            "d3",
            "temp",
            6,
            step=10,
            site="b",
            group="g2",
            tags=canonical_tags(["hvac"], {"floor": "2"}),
        )
        + series("d3", "hum", 6, step=10, site="b", group="g2")
    )
    start, end = 1_699_999_980.0, 1_700_000_100.0

    def q(sel: Selector, group_by: str = "device") -> list[dict[str, object]]:
        return store.query(
            TimeSeriesQuery(start, end, sel, bucket="1h", group_by=group_by, aggregates=("count",))
        ).to_pylist()

    assert {r["device"] for r in q(Selector.of(sites="a"))} == {"d1", "d2"}
    assert {r["device"] for r in q(Selector.of(groups="g2", metrics="temp"))} == {"d2", "d3"}
    assert {r["device"] for r in q(Selector.of(tags="hvac"))} == {"d1", "d3"}
    assert {r["device"] for r in q(Selector.of(tags=["hvac", "floor=2"]))} == {"d3"}
    by_site = q(Selector.of(metrics="temp"), "site")
    assert {(r["site"], r["count"]) for r in by_site} == {("a", 12), ("b", 6)}
    by_floor = q(Selector.of(metrics="temp"), "tag:floor")
    assert {(r["floor"], r["count"]) for r in by_floor} == {("1", 6), ("2", 12)}
    by_group = q(Selector.of(metrics="temp"), "group")
    assert {(r["grp"], r["count"]) for r in by_group} == {("g1", 6), ("g2", 12)}


def test_fill_options(store: TimeSeriesStore) -> None:
    base = 1_700_000_040.0
    store.write_records(
        [
            ("d1", "temp", 10.0, base + 5, 0, "", "", ","),
            ("d1", "temp", 40.0, base + 185, 0, "", "", ","),
        ]
    )

    def run(fill: str) -> list[object]:
        t = store.query(TimeSeriesQuery(base, base + 240, bucket="1m", fill=fill))
        return t.column("avg").to_pylist()

    assert run("none") == [10.0, 40.0]
    assert run("null") == [10.0, None, None, 40.0]
    assert run("zero") == [10.0, 0.0, 0.0, 40.0]
    assert run("previous") == [10.0, 10.0, 10.0, 40.0]
    assert run("linear") == [10.0, 20.0, 30.0, 40.0]


def test_string_series_first_last(store: TimeSeriesStore) -> None:
    store.write_records(
        [
            ("d1", "state", "off", T0 + 1, 0, "", "", ","),
            ("d1", "state", "on", T0 + 2, 0, "", "", ","),
        ]
    )
    t = store.query(
        TimeSeriesQuery(T0 - 100, T0 + 100, bucket="1h", aggregates=("count", "first", "last"))
    )
    row = t.to_pylist()[0]
    assert row["count"] == 2 and row["first_str"] == "off" and row["last_str"] == "on"


def test_stats_and_meta(store: TimeSeriesStore) -> None:
    store.write_records(series("d1", "temp", 100))
    st = store.stats()
    raw = {t.tier: t for t in st.tiers}["raw"]
    assert raw.points == 100 and raw.bytes > 0
    assert st.points == 100 and st.bytes_per_point > 0
    assert set(st.as_dict()) >= {"tiers", "points", "bytes", "bytes_per_point", "free_bytes"}
    assert store.get_meta("x") is None
    store.set_meta("x", "1")
    store.set_meta("x", "2")
    assert store.get_meta("x") == "2"


def test_many_small_appends_are_compacted(store: TimeSeriesStore) -> None:
    for k in range(12):
        store.write_records(series("d1", "temp", 10, start=T0 + k * 100))
    store.maintain(force=True)
    t = store.query(TimeSeriesQuery(T0, T0 + 10_000, bucket="1d", aggregates=("count",)))
    assert t.column("count").to_pylist() == [120]
    if hasattr(store, "_dataset"):
        ds = store._dataset("raw")
        assert len(ds.get_fragments()) == 1
        assert {i.columns[0] for i in store._table("raw").list_indices()} >= {
            "ts",
            "device",
            "metric",
        }


def test_empty_store_queries(store: TimeSeriesStore) -> None:
    assert store.query(TimeSeriesQuery(T0, T0 + 10)).num_rows == 0
    assert store.query(TimeSeriesQuery(T0, T0 + 10, bucket=60, fill="previous")).num_rows == 0
    assert not math.isnan(store.stats().bytes_per_point)
