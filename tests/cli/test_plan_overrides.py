"""`twin plan` / `twin describe` and runtime overrides: a plan of unchanged files is empty
whatever scenes and operators did, and a plan that changes an overridden spec value says which
runtime values the apply replaces (the registry drops them in the apply's transaction)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.cli.test_cli import DEMO, twin
from twin.registry import DesiredOverride, open_registry
from twin.registry.overrides import spec_json


def test_plan_lists_the_runtime_values_an_apply_replaces(tmp_path: Path) -> None:
    env = {**os.environ, "TWIN_STATE_DIR": str(tmp_path / "state"), "TWIN_AUTHOR": "tester",
           "COLUMNS": "200"}
    env.pop("TWIN_REGISTRY", None)
    site = tmp_path / "site"
    shutil.copytree(DEMO, site)
    twin(env, "apply", str(site))
    reg = open_registry(None, tmp_path / "state")
    fan = reg.specs()[("Device", "fan_01")]
    reg.set_override(DesiredOverride("fan_01", "speed", 80, "scene:fan-on-when-hot", 1.7e9,
                                     spec_json(fan, "speed")))
    # unchanged files: nothing to do, nothing replaced; describe shows the runtime value
    plan = json.loads(twin(env, "plan", str(site), "-o", "json").stdout)
    assert plan["counts"]["update"] == 0 and "overrides_replaced" not in plan
    text = twin(env, "describe", "device", "fan_01").stdout
    assert "speed = 80 (spec 40)  set by scene:fan-on-when-hot" in text
    # the speed changes in git: the plan says the scene's 80 gives way to the new spec value
    devices = site / "devices.yaml"
    devices.write_text(devices.read_text().replace("desired: {power: false, speed: 40}",
                                                   "desired: {power: false, speed: 55}", 1))
    plan = json.loads(twin(env, "plan", str(site), "-o", "json").stdout)
    assert [(r["device"], r["property"], r["value"], r["spec"], r["set_by"])
            for r in plan["overrides_replaced"]] == [
        ("fan_01", "speed", 80, 55, "scene:fan-on-when-hot")]
    text = twin(env, "plan", str(site)).stdout
    assert "fan_01.speed: 80 (set by scene:fan-on-when-hot) → spec 55" in text
    twin(env, "apply", str(site))
    assert reg.overrides() == []
    assert "runtime desired values" not in twin(env, "describe", "device", "fan_01").stdout
    reg.close()
