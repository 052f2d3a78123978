"""The cloud's dedup state per edge stays bounded and exact across restarts: the covered
markers are compacted to the newest one, and a cloud restarted (same state directory) skips
every re-sent record and stores each new one once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from runtime.helpers import fast_config

from twin.edge.cloud import MARKER_POINT, EdgeCloud, marker_device
from twin.registry import open_registry
from twin.runtime.engine import Engine
from twin.runtime.timeseries_service import TimeSeriesService
from twin.spec import load_site
from twin.spec.apply import apply_specs
from twin.timeseries.base import Selector

SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: remote}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: meter, site: remote}
spec:
  type: sensor
  binding: {http: {}}
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {name: gw-c, site: remote}
spec:
  devices: {names: [meter]}
  uplink: {url: "http://127.0.0.1:1"}
"""


def _run(after: int, seqs: list[int]) -> dict[str, Any]:
    return {"after": after,
            "records": [[s, "telemetry", 1000.0 + s,
                         [["meter", "level", float(s), 1000.0 + s, "good"]]] for s in seqs]}  # fmt: skip


async def _stored(engine: Engine, device: str, metric: str, want: int) -> list[Any]:
    """The series' rows once ``want`` are in the store (acknowledged rows reach the store
    through the log's pump a moment later), or what is there after a bounded wait."""
    svc = engine.service_info["timeseries"]
    rows: list[Any] = []
    with trio.move_on_after(30):
        while True:
            await svc.flush_barrier()
            t = await trio.to_thread.run_sync(
                svc.store.read_raw, Selector.of(devices=device, metrics=metric), 0.0, 4e9)
            rows = t.to_pylist()
            if len(rows) >= want:
                break
            await trio.sleep(0.05)
    return rows


async def test_markers_compacted_and_restart_keeps_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "site.yaml").write_text(SITE)
    reg = open_registry(None, tmp_path / "cloud")
    try:
        apply_specs(reg, load_site(folder), author="test")
        # first life: 40 uploads of 5 records, one out of order (a hole, then filled)
        edge = EdgeCloud(compact_interval=3600)
        engine = Engine(reg, fast_config(state_dir=tmp_path / "cloud"),
                        [TimeSeriesService(), edge])
        async with trio.open_nursery() as n:
            await n.start(engine.run)
            await edge.ingest("gw-c", {"runs": [_run(205, [206, 207])]})  # above a hole
            for i in range(40):
                lo = i * 5 + 1
                ack = await edge.ingest("gw-c", {"runs": [_run(lo - 1, list(range(lo, lo + 5)))]})
                assert ack["accepted"] == 5 and ack["duplicates"] == 0
            assert ack["acked"] == 200 and ack["covered"] == [[206, 207]]
            before = await _stored(engine, marker_device("gw-c"), MARKER_POINT, 41)
            assert len(before) == 41
            await edge.compact()
            after = await _stored(engine, marker_device("gw-c"), MARKER_POINT, 1)
            assert len(after) == 1 and after[0]["value_str"] == "0-200,206-207"
            await edge.ingest("gw-c", {"runs": [_run(200, [201, 202])]})  # in the log, unstored
            n.cancel_scope.cancel()

        # second life, same state directory: the log's replay + the one compacted marker
        edge = EdgeCloud(compact_interval=3600)
        engine = Engine(reg, fast_config(state_dir=tmp_path / "cloud"),
                        [TimeSeriesService(), edge])
        async with trio.open_nursery() as n:
            await n.start(engine.run)
            link = edge.link("gw-c")
            assert link.covered.encode() == "0-202,206-207"
            # every earlier record re-sent: all skipped; the hole's records stored once
            ack = await edge.ingest("gw-c", {"runs": [_run(0, list(range(1, 211)))]})
            assert ack["duplicates"] == 204 and ack["accepted"] == 6
            assert ack["acked"] == 210 and ack["covered"] == []
            rows = await _stored(engine, "meter", "level", 210)
            values = [r["value"] for r in rows]
            assert sorted(values) == [float(s) for s in range(1, 211)]  # each once
            markers = await _stored(engine, marker_device("gw-c"), MARKER_POINT, 3)
            assert len(markers) == 3  # the compacted one and the two written since
            await edge.compact()
            markers = await _stored(engine, marker_device("gw-c"), MARKER_POINT, 1)
            assert [m["value_str"] for m in markers] == ["0-210"]
            n.cancel_scope.cancel()
    finally:
        reg.close()
