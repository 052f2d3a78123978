"""Hot/cold directories: aggregate tiers in ``cold_path``, raw and metadata in ``path``."""

from __future__ import annotations

from pathlib import Path

import pytest

from twin.timeseries.base import Record, Selector, TimeSeriesQuery
from twin.timeseries.factory import describe, lance_cold_path, lance_path, open_store
from twin.timeseries.lance import LanceStore
from twin.timeseries.retention import RetentionManager, RetentionPolicy

T0 = 1_700_006_400.0  # a day boundary
HOURS = 6


def _records() -> list[Record]:
    return [
        (f"d{d}", "temperature", 20.0 + (i % 30) * 0.1 + d, T0 + i * 60 + 1, 0, "s", "g", ",")
        for i in range(HOURS * 60)
        for d in range(3)
    ]


def _policy(raw_keep: str = "2h") -> RetentionPolicy:
    return RetentionPolicy.from_doc(
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "tiers": [
                    {"resolution": "raw", "keep": raw_keep},
                    {"resolution": "10m", "keep": "3h"},
                    {"resolution": "1h", "keep": "inf"},
                ]
            },
        }
    )


def _hourly_counts(store: LanceStore, device: str = "d1") -> list[int]:
    out = store.query(
        TimeSeriesQuery(
            T0, T0 + HOURS * 3600, Selector.of(devices=device), bucket="1h", aggregates=("count",)
        )
    )
    return [int(c) for c in out.column("count").to_pylist()]


def test_tiers_live_in_the_cold_directory(tmp_path: Path) -> None:
    hot, cold = tmp_path / "hot", tmp_path / "cold"
    store = LanceStore(hot, cold_path=cold, min_free_bytes=0, compact_every=2)
    store.write_records(_records())
    mgr = RetentionManager(store, [_policy()])
    mgr.downsample(now=T0 + HOURS * 3600)
    assert sorted(p.name for p in hot.glob("*.lance")) == ["raw.lance"]
    # tiers are stored as partial chunks (``partial_chunks.py``)
    assert sorted(p.name for p in cold.glob("*.lance")) == [
        "agg_3600s_chunks.lance",
        "agg_600s_chunks.lance",
    ]
    assert (hot / "meta.json").exists() and not (cold / "meta.json").exists()
    assert store.tiers() == ["agg_3600s", "agg_600s", "raw"]
    assert store.table_path("agg_600s") == cold / "agg_600s_chunks.lance"
    stats = {t.tier: t for t in store.stats().tiers}
    assert stats["agg_600s"].points == HOURS * 6 * 3 and stats["agg_600s"].bytes > 0
    assert stats["agg_3600s"].points == HOURS * 3 and stats["raw"].rows == HOURS * 60 * 3
    assert _hourly_counts(store) == [60] * HOURS

    # expiry across both directories: raw keeps 2 h, the 10 m tier 3 h, the 1 h tier all
    now = T0 + HOURS * 3600
    mgr.run_once(now=now)
    raw = store.read_raw(Selector(), 0, 2e9)
    assert raw.num_rows == 2 * 60 * 3
    assert min(t.timestamp() for t in raw.column("ts").to_pylist()) >= now - 2 * 3600
    stats = {t.tier: t for t in store.stats().tiers}
    assert stats["agg_600s"].points == 3 * 6 * 3
    assert stats["agg_3600s"].points == HOURS * 3
    # the answer is the same from whichever tier/directory holds each hour
    assert _hourly_counts(store) == [60] * HOURS

    # reopened: everything is found where it is
    store.close()
    again = LanceStore(hot, cold_path=cold, min_free_bytes=0)
    assert _hourly_counts(again) == [60] * HOURS
    assert again.tiers() == ["agg_3600s", "agg_600s", "raw"]


def test_existing_tier_tables_are_used_where_they_are(tmp_path: Path) -> None:
    hot, cold = tmp_path / "hot", tmp_path / "cold"
    plain = LanceStore(hot, min_free_bytes=0)
    plain.write_records(_records())
    RetentionManager(plain, [_policy("inf")]).downsample(now=T0 + 3 * 3600)
    assert (hot / "agg_600s_chunks.lance").exists()
    plain.close()

    store = LanceStore(hot, cold_path=cold, min_free_bytes=0)
    RetentionManager(store, [_policy("inf")]).downsample(now=T0 + HOURS * 3600)
    # agg_600s stays (and grows) in the hot directory; no second copy appears in the cold one
    assert not (cold / "agg_600s_chunks.lance").exists()
    assert store.table_path("agg_600s") == hot / "agg_600s_chunks.lance"
    assert {t.tier: t.points for t in store.stats().tiers}["agg_600s"] == HOURS * 6 * 3
    assert _hourly_counts(store) == [60] * HOURS


def test_factory_plumbing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWIN_TIMESERIES", raising=False)
    monkeypatch.delenv("TWIN_TIMESERIES_COLD", raising=False)
    hot, cold = tmp_path / "hot", tmp_path / "cold"
    url = f"lance:{hot}?cold={cold}"
    assert lance_path(url, tmp_path) == hot
    assert lance_cold_path(url) == cold
    assert describe(url, tmp_path) == f"lance:{hot} (cold tiers: {cold})"
    store = open_store(url, tmp_path, min_free_bytes=0)
    assert isinstance(store, LanceStore) and store.cold_path == cold
    # the default directory with a cold one, from the URL or the environment
    assert lance_path(f"lance?cold={cold}", tmp_path) == tmp_path / "timeseries"
    monkeypatch.setenv("TWIN_TIMESERIES_COLD", str(tmp_path / "envcold"))
    s2 = open_store(None, tmp_path, min_free_bytes=0)
    assert isinstance(s2, LanceStore) and s2.cold_path == tmp_path / "envcold"
    # an explicit option wins; a bare path keeps its '?'
    s3 = open_store(None, tmp_path, min_free_bytes=0, cold_path=tmp_path / "opt")
    assert isinstance(s3, LanceStore) and s3.cold_path == tmp_path / "opt"
    assert lance_path(str(tmp_path / "a?cold=b"), tmp_path) == tmp_path / "a?cold=b"
    monkeypatch.delenv("TWIN_TIMESERIES_COLD")
    assert lance_cold_path(None) is None and describe(None, tmp_path).endswith("timeseries")
