"""The embedded broker's publish ACL answers from a cache per (device, topic) — and a new
revision of the specs (a device's topics changed or it was removed) is honoured at once."""

from __future__ import annotations

from typing import Any

from twin.runtime.mqtt_auth import MqttPrincipal, RegistryAuth


def _specs(telemetry: str | None) -> dict[tuple[str, str], Any]:
    if telemetry is None:
        return {}
    binding = {"mqtt": {"topics": {"telemetry": telemetry}}}
    return {("Device", "d1"): {"metadata": {"site": "s1"}, "spec": {"binding": binding}}}


def test_publish_acl_follows_the_running_specs() -> None:
    current = {"specs": _specs("a/d1/telemetry")}
    auth = RegistryAuth(None, lambda: current["specs"], verifier=object())
    dev = MqttPrincipal("device", "d1")
    for _ in range(2):  # the second answer comes from the cache: the same
        assert auth.authorize(dev, "publish", "a/d1/telemetry")
        assert not auth.authorize(dev, "publish", "b/d1/telemetry")
    current["specs"] = _specs("b/d1/telemetry")  # a new revision moves the device's topic
    assert not auth.authorize(dev, "publish", "a/d1/telemetry")
    assert auth.authorize(dev, "publish", "b/d1/telemetry")
    current["specs"] = _specs(None)  # the device is gone
    assert not auth.authorize(dev, "publish", "b/d1/telemetry")
    assert auth.stats["denied_publish"] == 4
