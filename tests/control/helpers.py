"""Shared helpers for the control tests: a small spec set and a scriptable transport."""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from tests.runtime.helpers import model
from twin.control.ledger import SENT, Catalog, DeviceCommand, Ledger, MemoryStore


def fan_model(*, speed: bool = False, sets: bool = False, **commands: Any) -> dict[str, Any]:
    """The fan DeviceModel of the engine tests: ``current`` telemetry, a ``power`` property
    (and ``speed`` 0-100 when asked), a ``set_state {state: boolean}`` command (declaring that
    it sets ``power`` when ``sets``), then ``commands``."""
    properties: dict[str, Any] = {"power": {"type": "boolean", "access": "readwrite"}}
    if speed:
        properties["speed"] = {"type": "integer", "min": 0, "max": 100, "access": "readwrite"}
    set_state: dict[str, Any] = {
        "params": {
            "type": "object",
            "required": ["state"],
            "properties": {"state": {"type": "boolean"}},
        }
    }
    if sets:
        set_state["sets"] = {"power": {"param": "state"}}
    return model(
        "fan",
        telemetry={"current": {"type": "number"}},
        properties=properties,
        commands={"set_state": set_state, **commands},
    )


def fan_on() -> dict[str, Any]:
    """The scene action that commands fan_01 on (``set_state``) and waits for the device."""
    return {
        "type": "command",
        "device": "fan_01",
        "command": "set_state",
        "params": {"state": True},
        "wait": True,
    }


def fan_on_when_hot(*more_actions: dict[str, Any]) -> dict[str, Any]:
    """The Scene that turns fan_01 on (``set_state``, waiting for the device) when
    temp_sensor_01 reads above 30, then runs ``more_actions``."""
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Scene",
        "metadata": {"name": "fan-on-when-hot", "site": "plant-a"},
        "spec": {
            "triggers": [
                {
                    "type": "device_data",
                    "device": "temp_sensor_01",
                    "point": "temperature",
                    "operator": ">",
                    "value": 30,
                }
            ],
            "actions": [fan_on(), *more_actions],
        },
    }


def docs() -> dict[tuple[str, str], dict[str, Any]]:
    def dev(name: str, model: str, binding: dict[str, Any], **meta: Any) -> dict[str, Any]:
        return {
            "apiVersion": "flux.iot/v1",
            "kind": "Device",
            "metadata": {"name": name, "site": "plant-a", **meta},
            "spec": {"type": "actuator", "model": model, "binding": binding},
        }

    fan_model = {
        "apiVersion": "flux.iot/v1",
        "kind": "DeviceModel",
        "metadata": {"name": "fan"},
        "spec": {
            "telemetry": {"current": {"type": "number"}},
            "properties": {
                "power": {"type": "boolean", "access": "readwrite"},
                "speed": {"type": "integer", "min": 0, "max": 100, "access": "readwrite"},
                "firmware": {"type": "string", "access": "read"},
            },
            "commands": {
                "set_state": {
                    "params": {
                        "type": "object",
                        "required": ["state"],
                        "properties": {"state": {"type": "boolean"}},
                    }
                },
                "reboot": {"timeout": "10s"},
            },
        },
    }
    sensor_model = {
        "apiVersion": "flux.iot/v1",
        "kind": "DeviceModel",
        "metadata": {"name": "sensor"},
        "spec": {"telemetry": {"temperature": {"type": "number"}}},
    }
    out = {
        ("Site", "plant-a"): {
            "apiVersion": "flux.iot/v1",
            "kind": "Site",
            "metadata": {"name": "plant-a"},
            "spec": {"timezone": "Europe/Berlin"},
        },
        ("DeviceModel", "fan"): fan_model,
        ("DeviceModel", "sensor"): sensor_model,
    }
    for d in (  # "legacy" has no model: the seed's command types apply
        dev("fan_01", "fan", {"sim": {}}, tags=["hvac"]),
        dev("fan_02", "fan", {"sim": {}}, tags=["hvac"]),
        dev("fan_03", "fan", {"sim": {}}),
        dev("door", "fan", {"http": {}}),
        dev("temp_01", "sensor", {"sim": {}}, tags=["hvac"]),
        dev("legacy", "", {"sim": {}}),
    ):
        if not d["spec"]["model"]:
            del d["spec"]["model"]
        out[("Device", d["metadata"]["name"])] = d
    return out


class FakeTransport:
    def __init__(self, *, reply: Any = None, poll: set[str] | None = None) -> None:
        self.sent: list[str] = []
        self.failures: deque[BaseException] = deque()
        self.reply = {"ok": True} if reply is None else reply
        self.poll = poll if poll is not None else {"door"}
        self.cancel_confirms = False
        self.cancels: list[str] = []

    def mode(self, device: str) -> str:
        return "poll" if device in self.poll else "push"

    async def send(self, command: DeviceCommand) -> Any:
        await trio.lowlevel.checkpoint()
        if self.failures:
            raise self.failures.popleft()
        self.sent.append(command.id)
        return self.reply

    async def cancel(self, command: DeviceCommand) -> bool:
        await trio.lowlevel.checkpoint()
        self.cancels.append(command.id)
        return self.cancel_confirms


def make_ledger(
    store: MemoryStore | None = None, transport: FakeTransport | None = None
) -> tuple[Ledger, MemoryStore, FakeTransport]:
    store = store or MemoryStore()
    transport = transport or FakeTransport()
    ledger = Ledger(store, transport, Catalog(docs()), clock=trio.current_time, threaded=False)
    return ledger, store, transport


__all__ = ["SENT", "FakeTransport", "docs", "fan_model", "fan_on", "fan_on_when_hot", "make_ledger"]
