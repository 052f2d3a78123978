"""The control service inside a real engine (sim bindings, SQLite registry), and the
reconciler against a scripted device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from runtime.helpers import apply, fast_config, model, running_engine, sim_device, site

from twin.control.ledger import SET, CommandStatus
from twin.control.service import ControlService, Reconciler, command_history
from twin.errors import BindingError
from twin.registry import open_registry
from twin.runtime.state import ReportedValue, TwinStore

from .helpers import fan_model, fan_on_when_hot, make_ledger


def fan_site() -> list[dict[str, Any]]:
    scene = fan_on_when_hot(
        {"type": "set_desired", "device": "fan_01", "property": "speed", "value": 80}
    )
    return [
        site(),
        model(),
        fan_model(speed=True),
        sim_device(
            "temp_sensor_01",
            interval="100ms",
            points={"temperature": {"wave": "constant", "value": 31}},
        ),
        sim_device(
            "fan_01",
            model_="fan",
            type_="actuator",
            interval="100ms",
            points={"current": {"wave": "constant", "value": 1}},
            desired={"power": False},
        ),
        scene,
    ]


async def test_fan_scene_end_to_end(tmp_path: Path) -> None:
    reg = open_registry(None, tmp_path / "state")
    apply(reg, *fan_site())
    control = ControlService(reconcile_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control]) as engine:
        assert engine.service_info["control"] is control
        with trio.fail_after(20):
            while True:
                trace = next((t for t in control.scenes.traces if t["status"] != "running"), None)
                if trace is not None:
                    break
                await trio.sleep(0.05)
        assert trace["status"] == "success", trace
        assert trace["trigger"]["value"] == 31
        assert [s["type"] for s in trace["steps"]] == ["command", "set_desired"]
        cmd_id = trace["steps"][0]["result"]["command"]
        cmd = await control.ledger.get(cmd_id)
        assert cmd.status is CommandStatus.SUCCESS and cmd.source == "scene:fan-on-when-hot"
        binding = engine.controller.tasks["fan_01"].binding
        assert ("set_state", {"state": True}) in binding.commands  # type: ignore[union-attr]
        # set_desired → the reconciler issues a `set` through the ledger, the sim converges
        with trio.fail_after(20):
            while True:
                twin = engine.twin("fan_01")
                assert twin is not None
                if "speed" in twin.reported and twin.reported["speed"].value == 80:
                    break
                await trio.sleep(0.05)
        await control.ledger.flushed()
        await engine.writer.flushed()
        history = await trio.to_thread.run_sync(command_history, reg, "fan_01", 10)
        kinds = {(h["type"], h["source"], h["status"]) for h in history}
        assert ("set_state", "scene:fan-on-when-hot", "success") in kinds
        assert (SET, "reconciler", "success") in kinds
        traces = await trio.to_thread.run_sync(lambda: reg.scene_traces("fan-on-when-hot"))
        assert traces and traces[-1].status == "success"
        # the single-mode scene fired once: the temperature stays above 30 (an edge, not a level)
        assert control.scenes.stats("fan-on-when-hot")["runs"] == 1
        # the scene's desired value is a runtime override (who, when), not a revision: the
        # spec set (git's) is untouched, so `twin plan` of the same files stays empty
        head = await trio.to_thread.run_sync(reg.head)
        assert head is not None and head.number == 1 and head.author != "scene:fan-on-when-hot"
        fan_doc = (await trio.to_thread.run_sync(reg.specs))[("Device", "fan_01")]
        assert fan_doc["spec"]["desired"] == {"power": False}
        assert trace["steps"][1]["result"] == {"desired": {"speed": 80}, "override": True}
        twin = engine.twin("fan_01")
        assert twin is not None and twin.desired["speed"] == 80
        assert twin.to_json()["overrides"]["speed"]["set_by"] == "scene:fan-on-when-hot"
        rows = await trio.to_thread.run_sync(reg.overrides, "fan_01")
        assert [(o.prop, o.value, o.set_by) for o in rows if o.prop == "speed"] == [
            ("speed", 80, "scene:fan-on-when-hot")
        ]
    reg.close()


class _Engine:
    def __init__(self, twins: TwinStore) -> None:
        self.twins = twins
        self.controller = type("C", (), {"tasks": {}})()


async def test_reconciler_converges_retries_and_marks_drift(autojump_clock: trio.abc.Clock) -> None:
    ledger, _, transport = make_ledger()
    twins = TwinStore()
    fan = twins.ensure("fan_01")
    fan.desired = {"power": True, "speed": 40}
    fan.reported = {"speed": ReportedValue(40, 0.0)}
    rec = Reconciler(_Engine(twins), ledger, interval=1.0, settle=5.0, max_attempts=3)
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        await n.start(rec.run)
        await trio.sleep(0.5)
        # one set command for the differing property, none for the converged one
        sets = [c for c in ledger.commands.values() if c.type == SET]
        assert [c.params for c in sets] == [{"property": "power", "value": True}]
        # the device never reports power: retries with backoff, then drifted with a reason
        await trio.sleep(200)
        reason = rec.drift("fan_01").get("power")
        assert reason is not None and "not converged after 3 attempts" in reason
        assert "has not reported it" in reason
        n_sets = len([c for c in ledger.commands.values() if c.type == SET])
        assert n_sets >= 3
        # it converges: drift clears
        fan.reported["power"] = ReportedValue(True, 1.0)
        await trio.sleep(2)
        assert rec.drift("fan_01") == {}
        # transport failures count as attempts too
        transport.failures.extend(BindingError("nope") for _ in range(10))
        fan.desired["speed"] = 60
        rec.poke()
        await trio.sleep(500)
        assert "nope" in rec.drift("fan_01")["speed"]
        n.cancel_scope.cancel()
