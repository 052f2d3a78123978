from __future__ import annotations

from twin.runtime.device_config import Heartbeat, device_configs, diff_devices

from .helpers import group, model, sim_device, spec_set


def test_heartbeat_resolution_device_model_group_default() -> None:
    specs = spec_set(
        group("line-1", heartbeat={"interval": "5s", "timeout": "20s"}),
        group("cell-a", parent="line-1"),
        model("m1"),
        model("m2", heartbeat={"interval": "2s"}),
        sim_device("own", heartbeat={"interval": "1s", "timeout": "4s"}),
        sim_device("from_model", model_="m2", group_="cell-a"),
        sim_device("from_group", model_="m1", group_="cell-a"),
        sim_device("default", model_="m1"),
    )
    for n in ("from_model", "from_group", "default"):
        specs[("Device", n)]["spec"].pop("heartbeat")
    cfgs = device_configs(specs, default=Heartbeat(10, 30))
    assert cfgs["own"].heartbeat == Heartbeat(1, 4)
    assert cfgs["from_model"].heartbeat == Heartbeat(2, 6)
    assert cfgs["from_group"].heartbeat == Heartbeat(5, 20)
    assert cfgs["from_group"].groups == ("cell-a", "line-1")
    assert cfgs["default"].heartbeat == Heartbeat(10, 30)
    assert cfgs["from_group"].writable == frozenset({"sampling_rate"})
    assert cfgs["own"].writable is None  # unknown model: no restriction


def test_diff_touches_only_what_changed() -> None:
    base = [model("th-sensor"), sim_device("a"), sim_device("b"), sim_device("c"), sim_device("d")]
    old = device_configs(spec_set(*base))
    b2 = sim_device("b", interval="5s")  # binding change -> restart
    c2 = sim_device("c", desired={"sampling_rate": 3}, tags=["x"])  # in place
    new = device_configs(spec_set(base[0], base[1], b2, c2, sim_device("e")))
    changes = diff_devices(old, new)
    assert changes.start == ("e",)
    assert changes.restart == ("b",)
    assert changes.update == ("c",)
    assert changes.stop == ("d",)
    assert not diff_devices(new, new)


def test_model_change_restarts_its_devices_only() -> None:
    specs = spec_set(
        model("m1"), model("m2"), sim_device("a", model_="m1"), sim_device("b", model_="m2")
    )
    old = device_configs(specs)
    specs[("DeviceModel", "m2")] = model("m2", telemetry={"rpm": {"type": "number"}})
    changes = diff_devices(old, device_configs(specs))
    assert changes.restart == ("b",)
    assert not changes.start and not changes.update and not changes.stop
