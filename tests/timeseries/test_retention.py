"""RetentionPolicy: schema, downsampling over closed windows, idempotence, catch-up,
expiry with reclaim, automatic tier choice, stats (on every store)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from twin.timeseries.base import Record, Selector, TimeSeriesQuery, TimeSeriesStore
from twin.timeseries.query import choose_tier
from twin.timeseries.retention import (
    RetentionManager,
    RetentionPolicy,
    StorageMonitor,
    validate_doc,
)

H0 = 1_699_999_200.0  # an hour boundary

DOC: dict[str, Any] = {
    "apiVersion": "flux.iot/v1",
    "kind": "RetentionPolicy",
    "metadata": {"name": "hvac", "site": "plant-a"},
    "spec": {
        "select": {"metric": "temp"},
        "tiers": [
            {"resolution": "raw", "keep": "1h"},
            {"resolution": "1m", "keep": "1d", "aggregates": ["avg", "min", "max", "count"]},
            {"resolution": "1h", "keep": "inf"},
        ],
    },
}


def data(start: float, end: float, step: float = 10.0) -> list[Record]:
    out: list[Record] = []
    for dev in ("d1", "d2"):
        t = start
        while t < end:
            out.append((dev, "temp", (t - H0) / 10.0, t, 0, "plant-a", "g", ","))
            t += step
    return out


def test_schema_accepts_the_issue_example_and_rejects_mistakes() -> None:
    assert validate_doc(DOC) == []
    pol = RetentionPolicy.from_doc(DOC)
    assert [t.resolution for t in pol.tiers] == [None, 60.0, 3600.0]
    assert pol.tiers[2].keep == float("inf")
    assert pol.selector == Selector(sites=("plant-a",), metrics=("temp",))
    bad = copy.deepcopy(DOC)
    bad["spec"]["tiers"][1]["resolution"] = "7x"
    bad["spec"]["tiers"][2]["aggregates"] = ["median"]
    bad["spec"]["select"]["colour"] = "red"
    errs = validate_doc(bad)
    assert len(errs) == 3, errs
    order = copy.deepcopy(DOC)
    order["spec"]["tiers"] = [
        {"resolution": "1h", "keep": "1d"},
        {"resolution": "90s", "keep": "1d"},
        {"resolution": "raw", "keep": "1d"},
    ]
    errs = validate_doc(order)
    assert any("multiple of the previous" in e for e in errs)
    assert any("raw must be the first tier" in e for e in errs)
    with pytest.raises(ValueError):
        RetentionPolicy.from_doc(bad)


def _tier_rows(store: TimeSeriesStore, tier: str) -> list[dict[str, Any]]:
    t = store.aggregate(tier, Selector(), 0, 4e9, 60 if tier != "agg_3600s" else 3600)
    rows = t.drop_columns(["first_ts", "last_ts"]).to_pylist()
    return sorted(rows, key=lambda r: (r["device"], r["ts"]))


def test_downsampling_closed_windows_idempotent_and_catch_up(store: TimeSeriesStore) -> None:
    store.write_records(data(H0, H0 + 3 * 3600))
    pol = RetentionPolicy.from_doc(DOC)
    mgr = RetentionManager(store, [pol])
    now = H0 + 2 * 3600 + 150  # 2h02m30s: minute 2h02 is still open
    written = mgr.downsample(now)
    assert written["agg_60s"] == 2 * 122
    assert written["agg_3600s"] == 2 * 2
    first = _tier_rows(store, "agg_60s")
    assert first[0]["count"] == 6 and first[0]["min"] == 0 and first[0]["max"] == 5
    # re-running changes nothing
    assert mgr.downsample(now) == {}
    assert _tier_rows(store, "agg_60s") == first
    # downtime: an hour later the tiers catch up to the new closed windows
    mgr.downsample(H0 + 3 * 3600 + 5)
    rows = _tier_rows(store, "agg_60s")
    assert len(rows) == 2 * 180
    hours = _tier_rows(store, "agg_3600s")
    assert [r["count"] for r in hours] == [360, 360, 360] * 2
    # tier values equal aggregates computed from raw
    direct = store.query(
        TimeSeriesQuery(
            H0, H0 + 3 * 3600, bucket="1h", tier="raw", aggregates=("avg", "min", "max", "count")
        )
    )
    via_tier = store.query(
        TimeSeriesQuery(
            H0, H0 + 3 * 3600, bucket="1h", tier="1h", aggregates=("avg", "min", "max", "count")
        )
    )
    assert direct.to_pylist() == via_tier.to_pylist()
    # a fresh manager over the same store continues from the stored watermarks
    assert RetentionManager(store, [pol]).downsample(H0 + 3 * 3600 + 5) == {}


def test_expiry_keeps_unrolled_data_and_queries_fall_back_to_tiers(store: TimeSeriesStore) -> None:
    store.write_records(data(H0, H0 + 3 * 3600))
    store.write_records([("d9", "other", 1.0, H0, 0, "plant-a", "g", ",")])  # not selected
    pol = RetentionPolicy.from_doc(DOC)
    mgr = RetentionManager(store, [pol])
    q = TimeSeriesQuery(
        H0,
        H0 + 3 * 3600,
        Selector.of(sites="plant-a", metrics="temp"),
        bucket="1h",
        aggregates=("avg", "count", "min", "max"),
    )
    before = store.query(q).to_pylist()
    report = mgr.run_once(H0 + 3 * 3600)
    assert report.expired["raw"] == 2 * 2 * 360  # the first two hours of raw points
    raw_left = store.query(TimeSeriesQuery(H0, H0 + 4 * 3600, Selector.of(metrics="temp")))
    assert raw_left.num_rows == 2 * 360
    # the unselected series is untouched
    assert store.query(TimeSeriesQuery(H0, H0 + 1, Selector.of(devices="d9"))).num_rows == 1
    # automatic tier choice gives the same answer from the 1h tier
    assert choose_tier(store, q.selector, q.start_s, 3600)[0] == "agg_3600s"
    assert choose_tier(store, q.selector, q.start_s, 120)[0] == "agg_60s"
    assert choose_tier(store, Selector(), q.start_s, 3600)[0] == "raw"  # not covered
    assert store.query(q).to_pylist() == before
    minutes = store.query(
        TimeSeriesQuery(
            H0,
            H0 + 600,
            Selector.of(sites="plant-a", metrics="temp", devices="d1"),
            bucket="5m",
            aggregates=("count",),
        )
    )
    assert minutes.column("count").to_pylist() == [30, 30]
    # a second pass has nothing more to do
    assert mgr.run_once(H0 + 3 * 3600).expired == {}


def test_expiry_waits_for_the_rollup(store: TimeSeriesStore) -> None:
    store.write_records(data(H0, H0 + 3600))
    mgr = RetentionManager(store, [RetentionPolicy.from_doc(DOC)])
    # no downsampling has run: raw past its keep is still needed by the 1m tier
    assert mgr.expire(H0 + 10 * 3600) == {}
    mgr.downsample(H0 + 1800)
    assert mgr.expire(H0 + 10 * 3600) == {"raw": 2 * 180}


def test_stats_per_tier_and_monitor(store: TimeSeriesStore) -> None:
    store.write_records(data(H0, H0 + 3600))
    mon = StorageMonitor(store)
    r1 = mon.report(now=1000.0)
    assert r1["growth_bytes_per_s"] is None
    RetentionManager(store, [RetentionPolicy.from_doc(DOC)]).run_once(H0 + 3600)
    r2 = mon.report(now=1010.0)
    tiers = {t["tier"]: t for t in r2["tiers"]}
    assert set(tiers) == {"raw", "agg_60s", "agg_3600s"}
    assert tiers["agg_60s"]["points"] == 120
    assert tiers["raw"]["bytes_per_point"] > 0
    assert r2["growth_bytes_per_s"] is not None
    assert "disk_nearly_full" in r2
