"""Comparison of two ranges, trend, export; and the disk-full behaviour."""

from __future__ import annotations

import io
import subprocess
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from twin.errors import StorageError
from twin.timeseries.base import Record, Selector, TimeSeriesQuery, TimeSeriesStore
from twin.timeseries.query import compare, export, trend

W0 = 1_699_833_600.0  # a day boundary (2023-11-13T00:00Z)
DAY = 86400.0


def week(start: float, base: float, slope_per_h: float = 0.0) -> list[Record]:
    return [
        ("d1", "temp", base + slope_per_h * h, start + h * 3600, 0, "", "", ",")
        for h in range(7 * 24)
    ]


def test_compare_this_week_with_last(store: TimeSeriesStore) -> None:
    store.write_records(week(W0 - 7 * DAY, 10.0) + week(W0, 12.0))
    q = TimeSeriesQuery(
        W0, W0 + 7 * DAY, Selector.of(devices="d1"), bucket="1d", aggregates=("avg", "count")
    )
    t = compare(store, q, "7d")
    rows = t.to_pylist()
    assert len(rows) == 7
    assert all(r["avg"] == 12.0 and r["avg_previous"] == 10.0 for r in rows)
    assert all(
        r["avg_delta"] == pytest.approx(2.0) and r["avg_pct"] == pytest.approx(20.0) for r in rows
    )
    assert rows[0]["count_previous"] == 24


def test_trend_slope(store: TimeSeriesStore) -> None:
    store.write_records(week(W0, 5.0, slope_per_h=0.5))
    q = TimeSeriesQuery(W0, W0 + 2 * DAY, Selector.of(devices="d1"))
    (row,) = trend(store, q).to_pylist()
    assert row["slope_per_h"] == pytest.approx(0.5)
    assert row["n"] == 48 and row["start_value"] == 5.0
    qb = TimeSeriesQuery(W0, W0 + 2 * DAY, Selector.of(devices="d1"), bucket="6h")
    (rowb,) = trend(store, qb).to_pylist()
    assert rowb["slope_per_h"] == pytest.approx(0.5)


def test_export_csv_parquet_xlsx(store: TimeSeriesStore, tmp_path: Path) -> None:
    store.write_records(week(W0, 1.0))
    t = store.query(TimeSeriesQuery(W0, W0 + DAY, bucket="6h", aggregates=("avg", "max")))
    csv = export(t, "csv")
    assert csv is not None
    lines = csv.decode().splitlines()
    assert lines[0].replace('"', "") == "ts,device,metric,avg,max" and len(lines) == 5
    pq_bytes = export(t, "parquet")
    assert pq_bytes is not None
    assert pq.read_table(io.BytesIO(pq_bytes)).equals(t)
    pytest.importorskip("openpyxl", reason="XLSX export needs openpyxl")
    export(t, "xlsx", tmp_path / "out.xlsx")
    from openpyxl import load_workbook

    ws = load_workbook(tmp_path / "out.xlsx").active
    assert ws is not None
    rows = list(ws.values)
    assert rows[0] == ("ts", "device", "metric", "avg", "max") and len(rows) == 5
    with pytest.raises(ValueError):
        export(t, "docx")


def test_write_refused_below_free_space_floor(tmp_path: Path) -> None:
    from twin.timeseries.lance import LanceStore

    store = LanceStore(tmp_path / "ts", min_free_bytes=1024)
    store.write_records(week(W0, 1.0))
    store.min_free_bytes = 1 << 62  # "the disk is full"
    with pytest.raises(StorageError, match="write refused"):
        store.write_records(week(W0 + 7 * DAY, 1.0))
    assert store.stats().disk_nearly_full
    store.min_free_bytes = 1024  # space returns: writes resume
    store.write_records(week(W0 + 7 * DAY, 1.0))
    assert store.query(TimeSeriesQuery(W0, W0 + 14 * DAY)).num_rows == 2 * 7 * 24


@pytest.mark.slow
def test_real_full_disk_fails_loudly_and_never_corrupts(tmp_path: Path) -> None:
    """A 24 MiB tmpfs really fills up (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {res.stderr.decode().strip()}")
    try:
        from twin.timeseries.lance import LanceStore

        store = LanceStore(mnt / "ts", min_free_bytes=0, compact_every=1000)
        ok = 0
        failed = False
        import random

        for k in range(400):
            batch = [
                ("d1", "noise", random.random(), W0 + k * 1000 + i * 0.1, 0, "", "", ",")
                for i in range(10_000)
            ]
            try:
                store.write_records(batch)
                ok += len(batch)
            except StorageError:
                failed = True
                break
        assert failed, "the disk never filled"
        # the store still opens and holds exactly the batches that succeeded
        reopened = LanceStore(mnt / "ts", min_free_bytes=0)
        assert reopened.query(
            TimeSeriesQuery(W0 - 1, W0 + 1e7, bucket="1000d", aggregates=("count",))
        ).column("count").to_pylist() == [ok]
        # free space (expire half, compact, drop old versions) and writing resumes
        reopened.delete_before("raw", Selector(), W0 + (ok // 20_000) * 1000)
        reopened.reclaim()
        reopened.write_records([("d1", "noise", 1.0, W0 + 1e6, 0, "", "", ",")])
        assert reopened.query(TimeSeriesQuery(W0 + 1e6, W0 + 1e6 + 1)).num_rows == 1
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
