"""One failing scene never stops the others: a run that crashes (a bug in an effect, not a
failed step) is traced as failed, reported once (the engine counts and alarms it) and cleared
by the scene's next good run; the other scenes keep running."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from twin.control.ledger import Catalog
from twin.control.scenes import SceneEngine
from twin.control.simulate import RecordingEffects, SimulationReport

from .helpers import docs


def scene(name: str, device: str) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Scene",
        "metadata": {"name": name, "site": "plant-a"},
        "spec": {
            "triggers": [
                {
                    "type": "device_data",
                    "device": "temp_01",
                    "point": "temperature",
                    "operator": ">",
                    "value": 30,
                }
            ],
            "actions": [
                {
                    "type": "command",
                    "device": device,
                    "command": "set_state",
                    "params": {"state": True},
                }
            ],
        },
    }


class CrashingEffects(RecordingEffects):
    """Commands to fan_02 hit a bug (an exception no step expects) while ``broken``."""

    broken = True

    async def command(self, device: str, command: str, params: Mapping[str, Any], **kw: Any) -> Any:
        if device == "fan_02" and self.broken:
            raise ZeroDivisionError("effect bug")
        return await super().command(device, command, params, **kw)


async def test_a_crashing_scene_run_is_isolated_reported_and_cleared(autojump_clock: Any) -> None:
    specs = docs()
    specs[("Scene", "good")] = scene("good", "fan_01")
    specs[("Scene", "bad")] = scene("bad", "fan_02")
    catalog = Catalog(specs)
    holder: list[SceneEngine] = []
    effects = CrashingEffects(catalog, holder, SimulationReport(), lambda: 1.7e9)
    crashes: list[tuple[str, str | None]] = []
    engine = SceneEngine(
        effects,
        timezone=lambda s: "UTC",
        wall=lambda: 1.7e9,
        on_crash=lambda sc, exc: crashes.append((sc.name, type(exc).__name__ if exc else None)),
    )
    holder.append(engine)
    engine.load(specs)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for value in (35, 20, 36):  # two rising edges: each fires both scenes
            engine.feed(
                {"kind": "reading", "device": "temp_01", "point": "temperature", "value": value}
            )
            await engine.idle()
            if value == 35:
                effects.broken = False  # the bug is gone before the second edge
        nursery.cancel_scope.cancel()
    status = {(t["scene"], i): t["status"] for i, t in enumerate(engine.traces)}
    assert sorted(status.values()) == ["failed", "success", "success", "success"]
    bad = [t for t in engine.traces if t["scene"] == "bad"]
    assert bad[0]["status"] == "failed" and "ZeroDivisionError: effect bug" in bad[0]["error"]
    assert bad[1]["status"] == "success"
    assert [t["status"] for t in engine.traces if t["scene"] == "good"] == ["success", "success"]
    assert crashes == [("bad", "ZeroDivisionError"), ("bad", None)]  # reported, then cleared
