"""`twin plan --replay`: a changed scene replayed over readings stored in the real time-series
stores (LanceDB, PostgreSQL), and the CLI end to end on the demo site."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.control.test_cli import twin
from tests.timeseries.conftest import store  # noqa: F401  (the two real stores)
from twin.control.replay import format_replay, replay
from twin.spec.load import load_site
from twin.timeseries.base import DataPoint, TimeSeriesStore

ROOT = Path(__file__).resolve().parents[2]

# temp_sensor_01, one reading a minute: 25 → 32 → 25 → 29 → 25 (10 minutes each)
PROFILE = [25.0] * 10 + [32.0] * 10 + [25.0] * 10 + [29.0] * 10 + [25.0] * 10


def _write_profile(st: TimeSeriesStore, start: float) -> None:
    points = [
        DataPoint.from_reading("temp_sensor_01", "temperature", v, start + 60 * i, site="plant-a")
        for i, v in enumerate(PROFILE)
    ]
    # another device's readings are stored too and must not disturb the replay
    points += [
        DataPoint.from_reading("hum_sensor_01", "humidity", 50.0, start + 60 * i, site="plant-a")
        for i in range(len(PROFILE))
    ]
    st.write_batch(points)


def _demo_specs(threshold: float | None = None) -> dict[Any, Any]:
    specs = {k: dict(v) for k, v in load_site([ROOT / "sites/demo"]).specs.items()}
    if threshold is not None:
        doc = json.loads(json.dumps(specs[("Scene", "fan-on-when-hot")]))
        doc["spec"]["triggers"][0]["value"] = threshold
        specs[("Scene", "fan-on-when-hot")] = doc
    return specs


def test_replay_changed_scene_over_stored_readings(store: TimeSeriesStore) -> None:  # noqa: F811
    start = 1_700_000_000.0
    _write_profile(store, start)
    current, desired = _demo_specs(), _demo_specs(threshold=28)
    report = replay(
        current, desired, [("update", "fan-on-when-hot")], store, start - 60, start + 3600
    )
    assert report.readings == len(PROFILE)  # only the scene's device was read
    assert report.series == 1
    (s,) = report.scenes
    assert s.before is not None
    # 30 is crossed once (the 32 plateau); 28 twice (32, then 29)
    assert sum(s.before.fired.values()) == 1
    assert sum(s.after.fired.values()) == 2
    sent = [(w.at, w.device, w.target) for w in s.after.writes]
    assert sent == [
        (start + 600, "fan_01", "command:set_state"),
        (start + 600, "fan_01", "speed"),
        (start + 1800, "fan_01", "command:set_state"),
        (start + 1800, "fan_01", "speed"),
    ]
    text = "\n".join(format_replay(report))
    assert "~ Scene fan-on-when-hot: would have fired 2x (current version: 1x)" in text


def test_replay_new_scene_with_status_trigger_says_what_is_not_replayed(
    store: TimeSeriesStore,  # noqa: F811
) -> None:
    start = 1_700_000_000.0
    _write_profile(store, start)
    specs = _demo_specs()
    report = replay(
        {}, specs, [("create", "packer-fault-response")], store, start, start + 3600
    )
    (s,) = report.scenes
    assert s.before is None and s.after.fired == {}
    assert s.unreplayed_triggers == ["status"]
    assert "status triggers are not replayed" in "\n".join(format_replay(report))


def test_twin_plan_replay_cli(tmp_path: Path) -> None:
    state = tmp_path / "state"
    twin(state, "apply", "sites/demo", "-m", "demo")
    from twin.timeseries.factory import open_store

    st = open_store(None, state)
    start = time.time() - 3 * 3600
    _write_profile(st, start)
    st.close()
    site = tmp_path / "site"
    shutil.copytree(ROOT / "sites/demo", site)
    scenes = site / "scenes.yaml"
    scenes.write_text(
        scenes.read_text().replace(
            'point: temperature, operator: ">", value: 30}',
            'point: temperature, operator: ">", value: 28}',
        )
    )
    out = twin(state, "plan", str(site), "--replay", "4h")
    assert "~ Scene fan-on-when-hot" in out
    assert "would have fired 2x (current version: 1x)" in out
    assert "fan_01.command:set_state = {'state': True}" in out
    doc = json.loads(twin(state, "plan", str(site), "--replay", "4h", "-o", "json"))
    (scene,) = doc["replay"]["scenes"]
    assert scene["scene"] == "fan-on-when-hot" and scene["fired"] == 2
    assert scene["before"]["fired"] == 1
    twin(state, "plan", str(site), "--replay", "soon", code=1)  # one line: not a duration
