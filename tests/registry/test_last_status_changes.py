"""registry.last_status_changes: the newest status row per device in one query (both backends)."""

from __future__ import annotations

from twin.registry._sql import SQLRegistry

from .docs import demo_specs


def test_last_status_changes(registry: SQLRegistry) -> None:
    registry.apply(demo_specs(3), base=0, author="a")
    assert registry.last_status_changes() == {}
    registry.set_device_status("temp_sensor_01", "online", 10.0, {"reason": "connected"})
    registry.set_device_status("temp_sensor_01", "offline", 20.0, {"timeout": 3})
    registry.set_device_status("temp_sensor_02", "fault", 15.0)
    registry.set_device_status("temp_sensor_02", "online", 15.0)  # same timestamp: the later row
    last = registry.last_status_changes()
    assert set(last) == {"temp_sensor_01", "temp_sensor_02"}
    assert (last["temp_sensor_01"].status, last["temp_sensor_01"].timestamp) == ("offline", 20.0)
    assert last["temp_sensor_01"].metadata == {"timeout": 3}
    assert last["temp_sensor_02"].status == "online"
    assert set(registry.last_status_changes(["temp_sensor_02", "temp_sensor_03"])) == {
        "temp_sensor_02"
    }
    assert registry.last_status_changes([]) == {}


def test_revoked_device_keys(registry: SQLRegistry) -> None:
    from twin.registry.base import DeviceKey

    registry.apply(demo_specs(2), base=0, author="a")
    for kid in ("k1", "k2", "k3"):
        registry.add_device_key(DeviceKey(kid, "temp_sensor_01", "h", 1.0))
    registry.revoke_device_key("k1", 100.0)
    registry.revoke_device_key("k3", 200.0)
    assert registry.revoked_device_keys(0.0) == ["k1", "k3"]
    assert registry.revoked_device_keys(150.0) == ["k3"]
    assert registry.revoked_device_keys(300.0) == []
