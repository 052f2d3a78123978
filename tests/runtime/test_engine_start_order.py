"""Services start before devices: the first reading of a device reaches the time-series store
(and every later one), and services see the revision's documents when they start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from runtime.helpers import apply, eventually, fast_config, model, sim_device, site
from twin.registry.base import Registry
from twin.runtime.engine import Engine
from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.base import Selector
from twin.timeseries.factory import open_store


async def test_the_first_reading_of_a_sim_device_is_stored(
    registry: Registry, tmp_path: Path
) -> None:
    apply(registry, site(), model(), sim_device("t1", interval="100ms"), sim_device("t2"))
    state = tmp_path / "state"
    service = TimeSeriesService(flush_interval=0.1, monitor_interval=3600)
    seen_at_start: list[int] = []

    async def slow_start(engine: Engine, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # a service that takes a while to start (binding a port, opening a store) and sees
        # the revision loaded and no device task yet
        seen_at_start.extend([engine.revision_number, len(engine.controller.tasks)])
        await trio.sleep(0.5)
        task_status.started()
        await trio.sleep_forever()

    slow_start.name = "slow"  # type: ignore[attr-defined]
    # the slow service first, as in ``twin up`` (control, then time series, api, mqtt)
    engine = Engine(registry, fast_config(state_dir=state), [slow_start, service])
    readings: list[dict[str, Any]] = []
    publish = engine.bus.publish

    def recording(event: dict[str, Any]) -> Any:
        if event.get("kind") == "reading" and event.get("value") is not None:
            readings.append(event)
        return publish(event)

    engine.bus.publish = recording  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await eventually(lambda: {e["device"] for e in readings} == {"t1", "t2"})
        nursery.cancel_scope.cancel()
    assert seen_at_start == [1, 0]
    # clean shutdown: every reading published since start-up is on disk, the first ones too
    store = open_store(None, state)
    try:
        rows = store.read_raw(Selector(), 0, 2e9).to_pylist()
        stored = {(r["device"], r["metric"], r["ts"].timestamp()) for r in rows}
        for dev in ("t1", "t2"):
            first = next(e for e in readings if e["device"] == dev)
            key = (dev, first["point"], first["ts"])
            assert any(k[:2] == key[:2] and abs(k[2] - key[2]) < 1e-3 for k in stored), key
        assert len(rows) == len(readings)
    finally:
        store.close()
