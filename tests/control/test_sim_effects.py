"""Simulated devices act on their commands and desired state, through a real engine: a scene
turns the fan on when it is hot, the fan's power and current rise, the room cools; commands
declared with ``sets`` in the model move the sim's properties; a setpoint moves the rpm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.helpers import apply, eventually, fast_config, model, running_engine, sim_device, site

from twin.control.ledger import CommandStatus
from twin.control.service import ControlService, EngineEffects
from twin.registry import open_registry
from twin.sim.effects import Response, make_effects

from .helpers import fan_model


def plant() -> list[dict[str, Any]]:
    fan_ = fan_model(
        speed=True,
        sets=True,
        set_value={
            "params": {"type": "object", "required": ["value"],
                       "properties": {"value": {"type": "integer"}}},
            "sets": {"speed": {"param": "value"}},
        },
    )
    plc_model = model(
        "plc",
        telemetry={"motor_rpm": {"type": "number"}},
        properties={
            "setpoint_rpm": {"type": "number", "access": "readwrite"},
            "mode": {"type": "string", "access": "readwrite", "enum": ["auto", "stop"]},
        },
    )
    fan = sim_device(
        "fan_01", model_="fan", type_="actuator", interval="100ms",
        points={"current": {"wave": "constant", "value": 0.2, "response": "300ms",
                            "effects": [{"when": "power", "is": True, "add": "speed",
                                         "times": 0.04}]}},
        desired={"power": False, "speed": 60},
    )
    room = sim_device(
        "temp_sensor_01", interval="100ms",
        points={"temperature": {"wave": "constant", "value": 31, "response": "300ms",
                                "effects": [{"when": "fan_01.power", "is": True, "add": -6}]}},
    )
    plc = sim_device(
        "plc_01", model_="plc", type_="industrial", interval="100ms",
        points={"motor_rpm": {"wave": "sine", "min": 1400, "max": 1500, "period": "1h",
                              "effects": [{"follow": "setpoint_rpm"},
                                          {"when": "mode", "is": "stop", "set": 0}]}},
        desired={"setpoint_rpm": 1450, "mode": "auto"},
    )
    scene = {
        "apiVersion": "flux.iot/v1",
        "kind": "Scene",
        "metadata": {"name": "fan-on-when-hot", "site": "plant-a"},
        "spec": {
            "mode": "single",
            "triggers": [{"type": "device_data", "device": "temp_sensor_01",
                          "point": "temperature", "operator": ">", "value": 30}],
            "actions": [{"type": "command", "device": "fan_01", "command": "set_state",
                         "params": {"state": True}}],
        },
    }
    return [site(), model(), fan_, plc_model, fan, room, plc, scene]


def value(engine: Any, device: str, point: str) -> Any:
    twin = engine.twin(device)
    rv = twin.reported.get(point) if twin is not None else None
    return None if rv is None else rv.value


async def test_a_scene_turns_the_fan_on_and_the_room_cools(tmp_path: Path) -> None:
    reg = open_registry(None, tmp_path / "state")
    apply(reg, *plant())
    control = ControlService(reconcile_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control]) as engine:
        v = lambda d, p: value(engine, d, p)  # noqa: E731
        # hot room → the scene sends set_state {state: true} → the fan's power is on, its
        # current rises to 0.2 + 60 * 0.04 and the room falls 6 °C
        await eventually(lambda: v("fan_01", "power") is True)
        runs = [t for t in control.scenes.traces if t["scene"] == "fan-on-when-hot"]
        assert runs and runs[0]["steps"][0]["type"] == "command"
        await eventually(lambda: (v("fan_01", "current") or 0) > 2.5)
        await eventually(lambda: (v("temp_sensor_01", "temperature") or 99) < 25.2)
        # the command's effect is runtime desired state: the reconciler keeps the fan on
        assert engine.twin("fan_01").desired["power"] is True  # type: ignore[union-attr]

        # an operator's command: set_value sets speed (the model's `sets`), the current follows
        cmd = await control.ledger.submit("fan_01", "set_value", {"value": 100}, source="api:op")
        assert (await control.ledger.wait(cmd.id)).status is CommandStatus.SUCCESS
        await eventually(lambda: v("fan_01", "speed") == 100 and (v("fan_01", "current") or 0) > 4.1)
        # off again: the room warms up past 30 °C, and the scene turns the fan on once more
        assert control.scenes.stats("fan-on-when-hot")["runs"] == 1
        cmd = await control.ledger.submit("fan_01", "set_state", {"state": False}, source="api:op")
        assert (await control.ledger.wait(cmd.id)).status is CommandStatus.SUCCESS
        await eventually(lambda: control.scenes.stats("fan-on-when-hot")["runs"] == 2)
        await eventually(lambda: v("fan_01", "power") is True)

        # a desired setpoint moves the rpm; mode stop stops the motor
        await eventually(lambda: abs((v("plc_01", "motor_rpm") or 0) - 1450) < 5)
        effects = EngineEffects(control)
        await effects.set_desired("plc_01", "setpoint_rpm", 900, source="scene:slow-down")
        await eventually(lambda: abs((v("plc_01", "motor_rpm") or 0) - 900) < 5)
        await effects.set_desired("plc_01", "mode", "stop", source="scene:stop")
        await eventually(lambda: v("plc_01", "motor_rpm") == 0)
    reg.close()


def test_effects_and_response_are_pure() -> None:
    state = {"power": True, "speed": 50, "fan.power": False, "sp": 900}
    look = state.get
    on = make_effects([{"when": "power", "is": True, "add": "speed", "times": 0.1}])
    assert on[0].apply(1.0, 0.5, look) == 6.0
    assert make_effects([{"when": "fan.power", "add": -6}])[0].apply(30.0, 0, look) == 30.0
    assert make_effects([{"follow": "sp"}])[0].apply(1460.0, 1450.0, look) == 910.0
    assert make_effects([{"follow": "missing"}])[0].apply(1460.0, 1450.0, look) == 1460.0
    assert make_effects([{"when": "power", "set": 0}])[0].apply(5.0, 0, look) == 0
    r = Response(tau=10.0)
    assert r.step(0.0, 0.0) == 0.0
    assert 6.0 < r.step(10.0, 10.0) < 6.5  # 1 - e^-1 of the way
    assert r.step(10.0, 1000.0) == 10.0
    # an integer target is approached through float state (rounding each step would stall)
    r = Response(tau=1.0, value=30, t=0.0)
    outs = [r.step(31, 0.1 * i) for i in range(1, 60)]
    assert outs[0] == 30 and outs[-1] == 31
