"""The time-series service inside a real engine: simulated devices → bus → writer → store."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
import trio

from runtime.helpers import (
    apply,
    eventually,
    fast_config,
    group,
    model,
    running_engine,
    sim_device,
    site,
)
from twin.registry.base import Registry
from twin.runtime.timeseries_service import DISK_ALARM, STORAGE_DEVICE, TimeSeriesService
from twin.timeseries.base import Selector
from twin.timeseries.factory import open_store


def docs(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        site("plant-a"),
        model(),
        group("line-1", "plant-a"),
        sim_device(
            "t1",
            group_="line-1",
            interval="100ms",
            tags=["hvac", "critical"],
            labels={"floor": "2"},
        ),
        sim_device("t2", interval="100ms"),
        *extra,
    ]


def policy(name: str = "fast", tiers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "RetentionPolicy",
        "metadata": {"name": name, "site": "plant-a"},
        "spec": {
            "select": {"site": "plant-a"},
            "tiers": tiers
            or [{"resolution": "raw", "keep": "1h"}, {"resolution": "1s", "keep": "inf"}],
        },
    }


def svc(**kw: Any) -> TimeSeriesService:
    kw.setdefault("flush_interval", 0.1)
    kw.setdefault("retention_interval", 0.3)
    kw.setdefault("monitor_interval", 0.2)
    kw.setdefault("policy_check_interval", 0.05)
    return TimeSeriesService(**kw)


def raw_count(service: TimeSeriesService, device: str | None = None) -> int:
    assert service.store is not None
    sel = Selector.of(devices=device) if device else Selector()
    return int(service.store.read_raw(sel, 0, 2e9).num_rows)


async def test_readings_reach_the_store_with_device_tags(
    registry: Registry, tmp_path: Path
) -> None:
    apply(registry, *docs())
    state = tmp_path / "state"
    service = svc()
    async with running_engine(registry, fast_config(state_dir=state), [service]) as engine:
        assert engine.service_info["timeseries"] is service
        await eventually(lambda: raw_count(service, "t1") >= 5 and raw_count(service, "t2") >= 5)
        assert service.store is not None
        rows = service.store.read_raw(Selector.of(devices="t1"), 0, 2e9)
        row = rows.to_pylist()[0]
        assert row["site"] == "plant-a" and row["grp"] == "line-1"
        assert row["tags"] == ",critical,floor=2,hvac,"
        assert row["metric"] == "temperature" and row["quality"] == 0
        # tag selectors work on what the engine wrote
        hvac = service.store.read_raw(Selector.of(tags="hvac"), 0, 2e9)
        assert set(pc.unique(hvac.column("device")).to_pylist()) == {"t1"}
        seen = engine.bus.published  # readings (and a few status events) so far
    # clean shutdown: every accepted reading is on disk (reopen the store from the state dir)
    store = open_store(None, state)
    try:
        n = int(store.read_raw(Selector(), 0, 2e9).num_rows)
        assert n >= raw_count_floor(seen)
        assert n == service.writer.points_written if service.writer else False
    finally:
        store.close()


def raw_count_floor(published: int) -> int:
    return published - 10  # status events: a handful per device


async def test_retention_policies_hot_reload_and_roll_up(
    registry: Registry, tmp_path: Path
) -> None:
    apply(registry, *docs())
    service = svc()
    async with running_engine(
        registry, fast_config(state_dir=tmp_path / "state"), [service]
    ) as engine:
        assert service.retention is None and service.policies == {}
        await eventually(lambda: raw_count(service) >= 4)
        rev = apply(registry, *docs(policy()))
        await engine.wait_revision(rev.number)
        await eventually(lambda: "fast" in service.policies and service.retention is not None)
        assert service.store is not None
        await eventually(lambda: "agg_1s" in service.store.tiers() if service.store else False)
        await eventually(
            lambda: service.last_rollup is not None and bool(service.last_rollup["rolled_up"])
        )
        tier = service.store.aggregate("agg_1s", Selector.of(devices="t1"), 0, 2e9, 1.0)
        assert tier.num_rows > 0 and all(c > 0 for c in tier.column("count").to_pylist())
        # a new tier list replaces the manager; removing the policy stops retention
        rev = apply(
            registry,
            *docs(
                policy(
                    tiers=[{"resolution": "raw", "keep": "2h"}, {"resolution": "2s", "keep": "1d"}]
                )
            ),
        )
        await engine.wait_revision(rev.number)
        await eventually(
            lambda: (
                service.policies.get("fast", {}).get("spec", {}).get("tiers", [{}])[0].get("keep")
                == "2h"
            )
        )
        await eventually(lambda: "agg_2s" in service.store.tiers() if service.store else False)
        rev = apply(registry, *docs())
        await engine.wait_revision(rev.number)
        await eventually(lambda: service.retention is None)
        assert await service.run_retention() is None


async def test_disk_nearly_full_alarm_and_metrics(registry: Registry, tmp_path: Path) -> None:
    apply(registry, *docs())
    # every disk is "nearly full" at fraction 1.0: the alarm must be raised once
    service = svc(store_options={"nearly_full_fraction": 1.0, "min_free_bytes": 1})
    async with running_engine(
        registry, fast_config(state_dir=tmp_path / "state"), [service]
    ) as engine:
        await eventually(lambda: raw_count(service) >= 2)

        def alarms() -> list[Any]:
            return registry.alarms(device=STORAGE_DEVICE, states=["active"])

        await eventually(lambda: len(alarms()) == 1)
        alarm = alarms()[0]
        assert alarm.type == DISK_ALARM and alarm.severity == "major"
        await eventually(
            lambda: 'twin_timeseries_points{tier="raw"}' in engine.prom.render().decode()
        )
        text = engine.prom.render().decode()
        assert "twin_timeseries_disk_nearly_full 1.0" in text
        assert 'twin_timeseries_bytes{tier="raw"}' in text
        assert "twin_timeseries_points_written_total" in text
        # space returns: the alarm clears
        assert service.store is not None
        service.store.nearly_full_fraction = 0.0  # type: ignore[attr-defined]
        service.store.min_free_bytes = 1  # type: ignore[attr-defined]
        await eventually(lambda: not alarms())
        await trio.sleep(0.3)
        assert "twin_timeseries_disk_nearly_full 0.0" in engine.prom.render().decode()


async def test_store_maintenance_runs_in_the_background(registry: Registry, tmp_path: Path) -> None:
    from twin.timeseries.lance import LanceStore

    apply(registry, *docs())
    # the store's inline safety net out of reach: only the service's task maintains
    store = LanceStore(
        tmp_path / "ts", min_free_bytes=0, compact_every=3, inline_compact_every=10**9
    )
    service = svc(store=store, flush_interval=0.05, monitor_interval=0.1)
    try:
        async with running_engine(registry, fast_config(state_dir=tmp_path / "state"), [service]):
            maintainer = service.maintainer
            writer = service.writer
            assert maintainer is not None and writer is not None
            await eventually(lambda: maintainer.runs >= 3 and writer.flushes >= 30)
            # every append made a fragment; each run merged >= 3 of them into one while the
            # writer went on (without it: one fragment per flush)
            fragments = await trio.to_thread.run_sync(store.fragment_count)
            assert fragments < writer.flushes
            await eventually(
                lambda: bool(
                    service.last_report and (service.last_report["maintenance"] or {}).get("runs")
                )
            )
            assert maintainer.errors == 0
    finally:
        store.close()


@pytest.mark.postgres
async def test_readings_reach_a_postgresql_store(registry: Registry, tmp_path: Path) -> None:
    from timeseries.conftest import PG_URL, pg_reason

    reason = pg_reason()
    if reason:
        pytest.skip(reason)
    apply(registry, *docs(policy()))
    prefix = f"rt{uuid.uuid4().hex[:10]}_"
    service = svc(url=PG_URL, store_options={"prefix": prefix})
    try:
        async with running_engine(
            registry, fast_config(state_dir=tmp_path / "state"), [service]
        ) as engine:
            assert service.description.startswith("postgresql://")
            await eventually(lambda: raw_count(service, "t1") >= 5)
            row = service.store.read_raw(Selector.of(devices="t1"), 0, 2e9).to_pylist()[0]  # type: ignore[union-attr]
            assert row["tags"] == ",critical,floor=2,hvac," and row["grp"] == "line-1"
            await eventually(lambda: "agg_1s" in service.store.tiers() if service.store else False)
            assert engine.service_info["timeseries"] is service
    finally:
        from twin.timeseries.postgres import PostgresStore

        cleanup = PostgresStore(PG_URL, prefix=prefix)
        cleanup.drop_all()
        cleanup.close()
