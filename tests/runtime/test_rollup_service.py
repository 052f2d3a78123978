"""The prompt rollup loop inside a real engine: windows are rolled up as they close, complete
(the flush barrier waits for the writer), and the lag is on the storage stats and /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from runtime.helpers import apply, eventually, fast_config, model, running_engine, sim_device, site
from twin.registry.base import Registry
from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.base import Selector


def policy() -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "RetentionPolicy",
        "metadata": {"name": "fast", "site": "plant-a"},
        "spec": {
            "select": {"site": "plant-a"},
            "tiers": [{"resolution": "raw", "keep": "1h"}, {"resolution": "1s", "keep": "1d"}],
        },
    }


async def test_rollup_is_prompt_complete_and_reported(registry: Registry, tmp_path: Path) -> None:
    apply(registry, site(), model(), sim_device("t1", interval="100ms"), policy())
    # The writer holds readings up to 2 s, longer than the lateness: without the flush
    # barrier the rollup would see windows with readings still in the writer's buffer.
    service = TimeSeriesService(
        flush_interval=2.0,
        rollup_lateness=1.0,
        retention_interval=3600,  # expiry/compaction out of the way: the rollup loop alone
        monitor_interval=3600,
    )
    async with running_engine(
        registry, fast_config(state_dir=tmp_path / "state"), [service]
    ) as engine:
        store = service.store
        assert store is not None

        def watermark() -> float:
            (lag,) = service.rollup_lags()
            return float(lag["watermark"] or 0)

        first = await _first_watermark(watermark)
        await eventually(lambda: watermark() >= first + 5)  # five windows rolled up since
        wm = watermark()
        # every reading stamped before the watermark is in the tier, exactly once
        tier = store.aggregate("agg_1s", Selector.of(devices="t1"), 0, wm, 1.0)
        raw = store.read_raw(Selector.of(devices="t1"), 0, wm)
        assert raw.num_rows > 0
        assert sum(tier.column("count").to_pylist()) == raw.num_rows
        # the rollup did it: the slow retention pass ran once at start-up, before any window
        assert service.last_rollup is not None
        # lag on the storage stats API payload and on /metrics
        stats = await service.refresh_stats()
        (entry,) = stats["rollup"]["tiers"]
        assert entry["policy"] == "fast" and entry["tier"] == "agg_1s"
        assert entry["watermark"] >= wm and entry["lag_s"] >= 0
        # the age includes the open window; the lag counts only closed windows
        assert entry["lag_s"] == pytest.approx(max(0.0, entry["watermark_age_s"] - 1.0))
        assert stats["rollup"]["lateness_s"] == 1.0 and stats["skipped_policies"] == {}
        text = generate_latest(engine.prom.registry).decode()
        assert 'twin_timeseries_rollup_lag_seconds{policy="fast",tier="agg_1s"}' in text
        assert 'twin_timeseries_rollup_watermark_age_seconds{policy="fast",tier="agg_1s"}' in text
        assert 'twin_timeseries_rollups_total{result="ok"}' in text


async def _first_watermark(watermark: Any) -> float:
    await eventually(lambda: watermark() > 0)
    return float(watermark())


async def test_a_full_disk_pauses_the_rollup_without_holes_then_it_catches_up(
    registry: Registry, tmp_path: Path
) -> None:
    from twin.timeseries.lance import LanceStore

    apply(registry, site(), model(), sim_device("t1", interval="100ms"), policy())
    store = LanceStore(tmp_path / "ts", min_free_bytes=1024)
    service = TimeSeriesService(
        store=store,
        flush_interval=0.1,
        rollup_lateness=1.0,
        rollup_retry=0.2,
        retention_interval=3600,
        monitor_interval=3600,
    )

    def watermark() -> float:
        (lag,) = service.rollup_lags()
        return float(lag["watermark"] or 0)

    def complete() -> bool:
        wm = watermark()
        tier = store.aggregate("agg_1s", Selector.of(devices="t1"), 0, wm, 1.0)
        return (
            sum(tier.column("count").to_pylist())
            == store.read_raw(Selector.of(devices="t1"), 0, wm).num_rows
        )

    try:
        async with running_engine(
            registry, fast_config(state_dir=tmp_path / "state"), [service]
        ) as engine:
            writer = service.writer
            assert writer is not None
            await eventually(lambda: watermark() > 0)
            store.min_free_bytes = 1 << 62  # "the disk is full": writes are refused
            await eventually(lambda: writer.errors >= 3)  # ... loudly, and retried
            assert complete()  # the tier never holds a window with readings missing
            # "run retention now" does not roll up past readings the writer still holds
            report = await service.run_retention(barrier_timeout=0.2)
            assert report is not None and "rollup_skipped" in report
            assert report["rolled_up"] == {} and complete()
            resumed = engine.config.clock()
            store.min_free_bytes = 1024  # space returns
            await eventually(lambda: watermark() >= resumed + 2)
            assert complete()
    finally:
        store.close()
