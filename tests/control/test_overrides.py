"""Declared vs runtime desired state, through a real engine (sim bindings, SQLite registry).

Scenes, commands that declare ``sets`` and operators write runtime overrides: they act at
once, are never revisions, survive re-applying the same YAML and an engine restart, and give
way when the spec value itself changes (twin/registry/overrides.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import trio
from runtime.helpers import (
    eventually,
    fast_config,
    running_engine,
    sim_device,
    site,
    spec_set,
)

from twin.control.ledger import CommandStatus
from twin.control.service import ControlService, EngineEffects
from twin.registry import open_registry
from twin.registry.base import Registry
from twin.spec.plan import make_plan

from .helpers import fan_model


def fan_docs(speed: int = 40) -> list[dict[str, Any]]:
    fan = sim_device(
        "fan_01",
        model_="fan",
        type_="actuator",
        interval="100ms",
        points={"current": {"wave": "constant", "value": 1}},
        desired={"power": False, "speed": speed},
    )
    return [site(), fan_model(speed=True, sets=True), fan]


def _apply(reg: Registry, docs: list[dict[str, Any]]) -> int | None:
    head = reg.head()
    rev = reg.apply(spec_set(*docs), base=head.number if head else 0, author="git")
    return None if rev is None else rev.number


def _reported(engine: Any, prop: str) -> Any:
    twin = engine.twin("fan_01")
    rv = twin.reported.get(prop) if twin is not None else None
    return None if rv is None else rv.value


async def test_runtime_overrides_vs_the_spec(tmp_path: Path) -> None:
    reg = open_registry(None, tmp_path / "state")
    files = fan_docs()
    assert _apply(reg, files) == 1
    control = ControlService(reconcile_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control]) as engine:
        await eventually(lambda: _reported(engine, "speed") == 40 and _reported(engine, "power") is False)
        # a scene's set_desired and an operator's command: runtime overrides, at once
        out = await EngineEffects(control).set_desired(
            "fan_01", "speed", 80, source="scene:fan-on-when-hot"
        )
        assert out == {"desired": {"speed": 80}, "override": True}
        cmd = await control.ledger.submit(
            "fan_01", "set_state", {"state": True}, source="api:alice"
        )
        cmd = await control.ledger.wait(cmd.id)
        assert cmd.status is CommandStatus.SUCCESS
        twin = engine.twin("fan_01")
        assert twin is not None
        assert twin.desired == {"power": True, "speed": 80}
        ov = twin.to_json()["overrides"]
        assert ov["speed"]["set_by"] == "scene:fan-on-when-hot" and ov["speed"]["spec_value"] == 40
        assert ov["power"]["set_by"] == f"api:alice (command set_state {cmd.id})"
        assert ov["power"]["value"] is True and ov["power"]["set_at"] > 0
        # the reconciler converges the device to them (and does not revert the command)
        await eventually(lambda: _reported(engine, "speed") == 80 and _reported(engine, "power") is True)

        # nothing of this is a revision: the files in git plan to nothing, re-applying is a no-op
        assert reg.head().number == 1  # type: ignore[union-attr]
        assert make_plan(reg.specs(), spec_set(*files)).empty
        assert _apply(reg, files) is None
        # an unrelated change to the device keeps the overrides
        tagged = copy.deepcopy(files)
        tagged[2]["metadata"]["tags"] = ["hvac"]
        rev = _apply(reg, tagged)
        assert rev == 2
        engine.poke()
        await engine.wait_revision(2)
        assert engine.twin("fan_01").desired == {"power": True, "speed": 80}  # type: ignore[union-attr]
        await trio.sleep(0.5)  # a few reconciler rounds: nothing is reverted
        assert _reported(engine, "power") is True and _reported(engine, "speed") == 80

        # the spec value of speed changes in git: the new spec value wins, the override goes
        changed = fan_docs(speed=55)
        changed[2]["metadata"]["tags"] = ["hvac"]
        assert _apply(reg, changed) == 3
        engine.poke()
        await engine.wait_revision(3)
        twin = engine.twin("fan_01")
        assert twin is not None and twin.desired == {"power": True, "speed": 55}
        assert list(twin.to_json()["overrides"]) == ["power"]
        assert [o.prop for o in reg.overrides("fan_01")] == ["power"]
        await eventually(lambda: _reported(engine, "speed") == 55)

        # setting the spec value again clears the override
        await EngineEffects(control).set_desired("fan_01", "speed", 70, source="scene:x")
        assert (await EngineEffects(control).set_desired(
            "fan_01", "speed", 55, source="scene:y"))["override"] is False
        assert "speed" not in engine.twin("fan_01").overrides  # type: ignore[union-attr]
        assert [o.prop for o in reg.overrides("fan_01")] == ["power"]

    # the overrides survive a restart of the engine
    control = ControlService(reconcile_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control]) as engine:
        twin = engine.twin("fan_01")
        assert twin is not None and twin.desired == {"power": True, "speed": 55}
        assert twin.to_json()["overrides"]["power"]["set_by"].startswith("api:alice")
        await eventually(lambda: _reported(engine, "power") is True)
    reg.close()
