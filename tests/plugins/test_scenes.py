"""Scene steps backed by plugins: a condition plugin decides with the scene's inputs, an action
plugin returns actions that run like YAML ones; a failing plugin is a false condition or a
failed step (never an exception out of the scene engine); Scene documents referring to unknown
plugins or plugins of another role are refused at validate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.control.test_scenes import Harness, scene, specs_with
from tests.plugins.modules import HOSTILE_STARLARK, plugin
from twin.errors import SpecError
from twin.plugins import registry
from twin.spec import validate_specs

CONDITION = b"""
def condition(items, config):
    return [it["inputs"]["t"] != None and it["inputs"]["t"] > config["limit"] for it in items]
"""
ACTION = b"""
def action(items, config):
    out = []
    for it in items:
        speed = min(100, int((it["inputs"]["t"] - 20) * 10))
        out.append([{"type": "set_desired", "device": "fan_01", "property": "speed", "value": speed},
                    {"type": "command", "device": "fan_02", "command": "reboot"}])
    return out
"""
INPUTS = {"t": {"device": "temp_01", "point": "temperature"}}


def plugin_docs() -> list[dict[str, Any]]:
    return [plugin("too-hot", CONDITION, "condition", starlark=True, config={"limit": 30}),
            plugin("cool-down", ACTION, "action", starlark=True),
            plugin("broken", HOSTILE_STARLARK["star_loop"].replace("transform", "action").encode(),
                   "action", starlark=True, limits={"steps": 10_000})]


@pytest.fixture
def loaded() -> Iterator[None]:
    registry.host().sync({("Plugin", d["metadata"]["name"]): d for d in plugin_docs()})
    yield
    registry.host().sync({})


def flow() -> dict[str, Any]:
    return scene("plugin_flow", [{"type": "manual"}], [
        {"type": "if", "conditions": [{"type": "plugin", "plugin": "too-hot", "inputs": INPUTS}],
         "then": [{"type": "plugin", "plugin": "cool-down", "inputs": INPUTS}]},
        {"type": "plugin", "plugin": "broken", "continue_on_error": True},
    ])


async def test_plugin_condition_and_action(loaded: None, autojump_clock: trio.abc.Clock) -> None:
    h = Harness(specs_with(flow()))
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
        h.reading("temp_01", "temperature", 25)
        await h.engine.execute("plugin_flow", wait=True)  # 25 <= 30: nothing
        h.reading("temp_01", "temperature", 35.5)
        await h.engine.execute("plugin_flow", wait=True)
        n.cancel_scope.cancel()
    sent = [(w.device, w.target, w.value) for w in h.report.writes]
    assert sent == [("fan_01", "speed", 100), ("fan_02", "command:reboot", {})]
    last = h.traces("plugin_flow")[-1]
    broken = next(s for s in last["steps"] if s["path"] == "actions/1")
    assert broken["outcome"] == "error" and "step budget" in broken["error"]
    assert registry.host().stats["broken"].failures == {"steps": 2}


def test_scene_plugin_references_are_checked() -> None:
    from tests.runtime.helpers import model, site

    s = scene("bad", [{"type": "manual"}], [
        {"type": "if", "conditions": [{"type": "plugin", "plugin": "cool-down",
                                       "inputs": {"t": {"device": "temp_01", "point": "nope"}}}],
         "then": [{"type": "plugin", "plugin": "ghost"}]}])
    dev = {"apiVersion": "flux.iot/v1", "kind": "Device", "metadata": {"name": "temp_01", "site": "plant-a"},
           "spec": {"type": "sensor", "model": "th-sensor", "binding": "http"}}
    with pytest.raises(SpecError) as err:
        validate_specs([site(), model(), dev, s, *plugin_docs()])
    text = "\n".join(p.message for p in err.value.problems)
    assert "Plugin 'cool-down' has role 'action', not 'condition'" in text
    assert "unknown Plugin 'ghost'" in text
    assert "device 'temp_01' has no point 'nope'" in text
