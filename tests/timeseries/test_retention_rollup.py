"""Prompt, incremental rollup: when the next window is due, lag per (policy, tier), overlapping
policies never processed twice, a rollup killed half-way or refused by a full disk (every store
where it applies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from twin.errors import StorageError
from twin.timeseries import retention
from twin.timeseries.base import Record, Selector, TimeSeriesQuery, TimeSeriesStore
from twin.timeseries.retention import RetentionManager, RetentionPolicy

H0 = 1_699_999_200.0  # an hour boundary
TIERS = [
    {"resolution": "raw", "keep": "1h"},
    {"resolution": "1m", "keep": "1d"},
    {"resolution": "1h", "keep": "inf"},
]


def policy(name: str, select: dict[str, Any], tiers: list[dict[str, Any]] | None = None) -> Any:
    return RetentionPolicy.from_doc(
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": name, "site": "plant-a"},
            "spec": {"select": select, "tiers": tiers or TIERS},
        }
    )


def data(start: float, end: float, metrics: tuple[str, ...] = ("temp",)) -> list[Record]:
    out: list[Record] = []
    for dev in ("d1", "d2"):
        for m in metrics:
            t = start
            while t < end:
                out.append((dev, m, (t - H0) / 10.0, t, 0, "plant-a", "g", ","))
                t += 10.0
    return out


def tier_rows(store: TimeSeriesStore, tier: str, res: float) -> list[tuple[Any, ...]]:
    t = store.aggregate(tier, Selector(), 0, 4e9, res)
    return sorted(
        (r["device"], r["metric"], r["ts"].timestamp(), r["count"], r["sum"], r["min"], r["max"])
        for r in t.to_pylist()
    )


def raw_rows(store: TimeSeriesStore, end: float, res: float = 60) -> list[tuple[Any, ...]]:
    """What the 1m tier must hold: the aggregate of raw, computed directly."""
    t = store.aggregate("raw", Selector(), 0, end, res)
    return sorted(
        (r["device"], r["metric"], r["ts"].timestamp(), r["count"], r["sum"], r["min"], r["max"])
        for r in t.to_pylist()
    )


def lag_of(mgr: RetentionManager, now: float, tier: str) -> Any:
    (hit,) = [t for t in mgr.lags(now) if t.tier == tier]
    return hit


def test_next_due_and_lag_per_tier(store: TimeSeriesStore) -> None:
    store.write_records(data(H0, H0 + 600))
    mgr = RetentionManager(store, [policy("p", {"metric": "temp"})], lateness=5)
    before = lag_of(mgr, H0 + 10, "agg_60s")
    assert before.watermark is None and before.lag is None  # never run
    now = H0 + 302  # minute 4 closed at 300 but lateness keeps it open until 305
    assert mgr.next_due(now) == now  # never run: closed windows wait, catch up at once
    mgr.downsample(now)
    assert mgr.next_due(now) == H0 + 305
    m = lag_of(mgr, now, "agg_60s")
    assert (m.watermark, m.age, m.lag) == (H0 + 240, 62, 2)
    h = lag_of(mgr, now, "agg_3600s")
    assert (h.watermark, h.lag) == (H0, 0)  # the first hour is not closed: nothing waits
    # right when due, the window is rolled up and nothing closed waits any more
    assert mgr.downsample(H0 + 305) == {"agg_60s": 2}
    assert lag_of(mgr, H0 + 305, "agg_60s").lag == 0
    assert mgr.next_due(H0 + 305) == H0 + 365
    # the lag grows while nobody runs the rollup, and the catalogue follows the watermark
    assert lag_of(mgr, H0 + 500, "agg_60s").lag == 500 - 360
    assert store.get_meta("wm:p:agg_60s") == repr(H0 + 300)
    # after downtime: due at once, and one run catches every tier up
    later = H0 + 3 * 3600
    assert mgr.next_due(later) == later
    mgr.downsample(later)
    assert [t.lag for t in mgr.lags(later)] == [0, 0]
    assert mgr.next_due(later) == later + 5


def test_overlapping_policies_never_process_a_series_twice(store: TimeSeriesStore) -> None:
    store.write_records(data(H0, H0 + 2 * 3600, metrics=("temp", "hum")))
    everything = policy("a-everything", {})
    short = policy(
        "b-temp",
        {"metric": "temp"},
        [{"resolution": "raw", "keep": "1m"}, {"resolution": "1m", "keep": "1h"}],
    )
    mgr = RetentionManager(store, [short, everything])
    assert [p.name for p in mgr.policies] == ["a-everything"]
    assert mgr.skipped == {"b-temp": "its selector overlaps RetentionPolicy 'a-everything'"}
    now = H0 + 2 * 3600
    expected = raw_rows(store, now)
    mgr.run_once(now)
    mgr.run_once(now)
    rows = tier_rows(store, "agg_60s", 60)
    keys = [r[:3] for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 2 * 120  # one row per series and minute
    assert rows == expected  # counts and sums not doubled
    # b-temp's 1-minute raw keep never applied: raw temp is kept for a-everything's hour
    left = store.read_raw(Selector.of(metrics="temp"), 0, 4e9).num_rows
    assert left == 2 * 360


def test_disjoint_policies_each_process_their_own_series(store: TimeSeriesStore) -> None:
    store.write_records(data(H0, H0 + 3600, metrics=("temp", "hum")))
    temp, hum = policy("temp", {"metric": "temp"}), policy("hum", {"metric": ["hum"]})
    assert temp.disjoint_from(hum) == "different metric"
    mgr = RetentionManager(store, [temp, hum])
    assert mgr.skipped == {} and len(mgr.policies) == 2
    mgr.downsample(H0 + 3600)
    rows = tier_rows(store, "agg_60s", 60)
    assert len({r[:3] for r in rows}) == len(rows) == 2 * 2 * 60
    assert rows == raw_rows(store, H0 + 3600)


class Crash(Exception):
    """Stands for the process dying at this point."""


class CrashingStore:
    """Delegates to a store; dies on the ``n``-th window replace, either after the delete
    (the add never happens) or after the replace but before the watermark is written."""

    rollup = None  # no in-store fast path: every window goes through replace_partials

    def __init__(self, inner: TimeSeriesStore, n: int, where: str) -> None:
        self.inner, self.n, self.where, self.calls = inner, n, where, 0
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def replace_partials(self, tier: str, sel: Selector, a: float, b: float, rows: Any) -> None:
        self.calls += 1
        if self.calls == self.n and self.where == "after_delete":
            self.inner.replace_partials(tier, sel, a, b, rows.slice(0, 0))
            raise Crash
        self.inner.replace_partials(tier, sel, a, b, rows)
        if self.calls == self.n:
            self.armed = True

    def set_meta(self, key: str, value: str) -> None:
        if self.armed and key.startswith("wm:"):
            raise Crash
        self.inner.set_meta(key, value)


@pytest.mark.parametrize("where", ["after_delete", "before_watermark"])
def test_a_rollup_killed_half_way_is_repaired_by_the_next_run(
    store: TimeSeriesStore, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "MAX_BUCKETS_PER_STEP", 30)  # half an hour per step
    store.write_records(data(H0, H0 + 2 * 3600))
    pol = policy("p", {"metric": "temp"})
    now = H0 + 2 * 3600
    RetentionManager(store, [pol]).downsample(H0 + 1800)  # the first half hour is done
    crashing = CrashingStore(store, 2, where)
    with pytest.raises(Crash):
        RetentionManager(crashing, [pol]).downsample(now)  # type: ignore[arg-type]
    # the step before the crash is complete; the crashed window is behind the watermark
    assert store.get_meta("wm:p:agg_60s") == repr(H0 + 3600)
    # while "dead": queries with automatic tier choice still answer from raw past the watermark
    q = TimeSeriesQuery(
        H0, now, Selector.of(metrics="temp"), bucket="1m", aggregates=("count", "sum")
    )
    from_raw = store.query(replace(q, tier="raw"))
    assert store.query(q).to_pylist() == from_raw.to_pylist()
    # "restart": a fresh manager redoes the broken window; nothing missing, nothing twice
    RetentionManager(store, [pol]).downsample(now)
    assert tier_rows(store, "agg_60s", 60) == raw_rows(store, now)
    assert store.query(q).to_pylist() == from_raw.to_pylist()


KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from twin.timeseries import retention
    from twin.timeseries.lance import LanceStore
    from twin.timeseries.retention import RetentionManager, RetentionPolicy

    retention.MAX_BUCKETS_PER_STEP = 30  # half an hour per step
    store = LanceStore(sys.argv[1], min_free_bytes=0)
    original = LanceStore._replace_tier  # what rollup and replace_partials both run
    calls = [0]

    def replace_tier(self, tier, sel, a, b, rows, built=None):
        calls[0] += 1
        if calls[0] == 2:  # second step: delete the window's rows, then hang until killed
            original(self, tier, sel, a, b, rows.slice(0, 0))
            print("deleted", a, flush=True)
            time.sleep(600)
        original(self, tier, sel, a, b, rows, built)

    LanceStore._replace_tier = replace_tier
    pol = RetentionPolicy.from_doc({
        "apiVersion": "flux.iot/v1", "kind": "RetentionPolicy",
        "metadata": {"name": "p", "site": "plant-a"},
        "spec": {"select": {"metric": "temp"},
                 "tiers": [{"resolution": "raw", "keep": "1h"},
                           {"resolution": "1m", "keep": "1d"}]}})
    RetentionManager(store, [pol]).downsample(float(sys.argv[2]))
    """
)


def test_kill_9_mid_rollup_leaves_a_consistent_store(tmp_path: Path) -> None:
    from twin.timeseries.lance import LanceStore

    path = tmp_path / "ts"
    tiers = [{"resolution": "raw", "keep": "1h"}, {"resolution": "1m", "keep": "1d"}]
    pol = policy("p", {"metric": "temp"}, tiers)
    store = LanceStore(path, min_free_bytes=0)
    store.write_records(data(H0, H0 + 2 * 3600))
    RetentionManager(store, [pol]).downsample(H0 + 1800)  # an earlier run: first half hour
    store.close()
    now = H0 + 2 * 3600
    # the child completes H0+30m..1h, deletes H0+1h..1h30's rows and is SIGKILLed there
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(path), repr(now)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert line.split() == ["deleted", repr(H0 + 3600)], line
    store = LanceStore(path, min_free_bytes=0)  # opens: not corrupted
    try:
        assert store.get_meta("wm:p:agg_60s") == repr(H0 + 3600)
        q = TimeSeriesQuery(
            H0, now, Selector.of(metrics="temp"), bucket="1m", aggregates=("count", "sum")
        )
        from_raw = store.query(replace(q, tier="raw")).to_pylist()
        assert store.query(q).to_pylist() == from_raw  # raw answers past the watermark
        RetentionManager(store, [pol]).downsample(now)  # the next run repairs it
        assert tier_rows(store, "agg_60s", 60) == raw_rows(store, now)
        assert store.query(q).to_pylist() == from_raw
    finally:
        store.close()


def test_full_disk_rollup_fails_loudly_keeps_data_and_resumes(tmp_path: Path) -> None:
    from twin.timeseries.lance import LanceStore

    store = LanceStore(tmp_path / "ts", min_free_bytes=1024)
    try:
        store.write_records(data(H0, H0 + 2 * 3600))
        mgr = RetentionManager(store, [policy("p", {"metric": "temp"})])
        store.min_free_bytes = 1 << 62  # "the disk is full"
        with pytest.raises(StorageError, match="write refused"):
            mgr.downsample(H0 + 2 * 3600)
        assert store.get_meta("wm:p:agg_60s") is None  # the watermark did not move
        assert mgr.expire(H0 + 10 * 3600) == {}  # raw the tier still needs is kept
        assert store.read_raw(Selector(), 0, 4e9).num_rows == 2 * 720
        store.min_free_bytes = 1024  # space returns: the next run catches up
        mgr.downsample(H0 + 2 * 3600)
        assert tier_rows(store, "agg_60s", 60) == raw_rows(store, H0 + 2 * 3600)
    finally:
        store.close()
