"""Runtime desired-state overrides in the registry, both backends: they persist, re-applying the
same specs keeps them, and an apply that changes the overridden spec value drops them."""

from __future__ import annotations

import copy

from twin.registry import DesiredOverride
from twin.registry._sql import SQLRegistry
from twin.registry.overrides import spec_json

from .conftest import Opener
from .docs import device, group, model, specset


def _specs(speed: int = 40, power: bool = False) -> dict[tuple[str, str], dict]:
    return specset(
        group("line-1"),
        model("th-sensor-v2"),
        device("fan_01", desired={"power": power, "speed": speed}),
        device("fan_02", desired={"speed": 70}),
    )


def _override(specs: dict, dev: str, prop: str, value: object, by: str) -> DesiredOverride:
    return DesiredOverride(dev, prop, value, by, 1700000000.5, spec_json(specs[("Device", dev)], prop))


def test_overrides_persist_and_survive_reopening(open_reg: Opener) -> None:
    reg = open_reg()
    specs = _specs()
    reg.apply(specs, base=0, author="t")
    reg.set_override(_override(specs, "fan_01", "speed", 80, "scene:fan-on-when-hot"))
    reg.set_override(_override(specs, "fan_01", "power", True, "command:cmd_1 by alice"))
    reg.set_override(_override(specs, "fan_02", "mode", "eco", "api:bob"))  # not in the spec
    again = open_reg()  # another connection, as after an engine restart
    got = again.overrides("fan_01")
    assert [(o.prop, o.value, o.set_by, o.set_at) for o in got] == [
        ("power", True, "command:cmd_1 by alice", 1700000000.5),
        ("speed", 80, "scene:fan-on-when-hot", 1700000000.5),
    ]
    assert got[1].spec_value == 40 and got[1].to_json()["spec_value"] == 40
    assert [o.device for o in again.overrides()] == ["fan_01", "fan_01", "fan_02"]
    # replace, then clear
    reg.set_override(_override(specs, "fan_01", "speed", 100, "scene:all-fans-max"))
    assert [o.value for o in again.overrides("fan_01") if o.prop == "speed"] == [100]
    assert reg.clear_override("fan_01", "speed") is True
    assert reg.clear_override("fan_01", "speed") is False
    assert [o.prop for o in again.overrides("fan_01")] == ["power"]


def test_reapplying_unchanged_specs_keeps_overrides(registry: SQLRegistry) -> None:
    specs = _specs()
    registry.apply(specs, base=0, author="t")
    registry.set_override(_override(specs, "fan_01", "speed", 80, "scene:s"))
    assert registry.apply(copy.deepcopy(specs), base=1, author="t") is None  # a no-op
    # an unrelated change (another device, another field of this one) keeps it too
    changed = copy.deepcopy(specs)
    changed[("Device", "fan_01")]["metadata"]["tags"] = ["hvac", "new"]
    changed[("Device", "fan_02")]["spec"]["desired"] = {"speed": 75}
    assert registry.apply(changed, base=1, author="t") is not None
    assert [(o.device, o.prop, o.value) for o in registry.overrides()] == [("fan_01", "speed", 80)]


def test_a_changed_spec_value_wins_and_drops_the_override(registry: SQLRegistry) -> None:
    specs = _specs()
    registry.apply(specs, base=0, author="t")
    registry.set_override(_override(specs, "fan_01", "speed", 80, "scene:s"))
    registry.set_override(_override(specs, "fan_01", "power", True, "api:a"))
    registry.set_override(_override(specs, "fan_02", "mode", "eco", "api:b"))
    new = _specs(speed=55)  # speed changes in git, power does not
    new[("Device", "fan_02")]["spec"]["desired"] = {"speed": 70, "mode": "auto"}  # now declared
    assert registry.apply(new, base=1, author="t") is not None
    assert [(o.device, o.prop) for o in registry.overrides()] == [("fan_01", "power")]
    # deleting the device drops its overrides
    del new[("Device", "fan_01")]
    assert registry.apply(new, base=2, author="t") is not None
    assert registry.overrides() == []
