"""Shared helpers for the control tests: a small spec set and a scriptable transport."""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from twin.control.ledger import SENT, Catalog, DeviceCommand, Ledger, MemoryStore


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


__all__ = ["SENT", "FakeTransport", "docs", "make_ledger"]
