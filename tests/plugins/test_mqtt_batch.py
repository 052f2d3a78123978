"""MQTT messages that arrive together are decoded together: the embedded broker's delivery
queue, drained in one turn, reaches the codec in one plugin call for all devices sharing it;
a payload that breaks the call does not spoil the other devices' readings (they are decoded
one by one then); a lone message is decoded alone, at once."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tests.plugins.modules import ACME_WAT, acme_wasm, plugin, wat
from twin.bindings.base import BindingContext, Message, Quality, Reading
from twin.bindings.mqtt import MqttBinding
from twin.mqtt.broker import Broker, BrokerConfig
from twin.mqtt.hub import EmbeddedTransport, MqttHub
from twin.plugins import registry

# the demo's codec, made to trap on a frame that starts with 0xFF
POISON_WAT = ACME_WAT.read_text().replace(
    "(local.set $pl (i32.add (local.get $in) (i32.const 4)))",
    "(local.set $pl (i32.add (local.get $in) (i32.const 4)))\n"
    "        (if (i32.eq (i32.load8_u (local.get $pl)) (i32.const 0xff)) (then unreachable))")


def frame(i: int) -> bytes:
    return b"\xa5\x01" + struct.pack(">hHH", 2000 + i, 5000, 3000)


class Rig:
    def __init__(self, broker: Broker, hub: MqttHub, transport: EmbeddedTransport) -> None:
        self.broker, self.hub, self.transport = broker, hub, transport
        self.got: dict[str, list[Reading]] = {}

    async def device(self, nursery: trio.Nursery, name: str, codec: str) -> MqttBinding:
        b = MqttBinding(name, {"codec": codec}, {"metadata": {"name": name, "site": "s"}},
                        BindingContext(), hub=self.hub)
        send, recv = trio.open_memory_channel[Message](10_000)
        got = self.got.setdefault(name, [])

        async def consume() -> None:
            async for m in recv:
                if isinstance(m, Reading):
                    got.append(m)

        nursery.start_soon(b.subscribe, send)
        nursery.start_soon(consume)
        with trio.fail_after(10):
            while not b.subscribed:  # noqa: ASYNC110
                await trio.sleep(0.01)
        return b

    def publish(self, device: str, payload: bytes) -> None:
        self.transport.client.publish(f"flux/s/{device}/telemetry", payload, 0)

    async def wait(self, device: str, n: int) -> None:
        with trio.fail_after(10):
            while len(self.got.get(device, [])) < n:  # noqa: ASYNC110
                await trio.sleep(0.01)


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    host = registry.host()
    host.sync({})
    host.stats.clear()
    assert host.sync({("Plugin", "acme"): plugin("acme", acme_wasm()),
                      ("Plugin", "poison"): plugin("poison", wat(POISON_WAT),
                                                   failures={"alarm_after": 1000})}) == {}
    broker = Broker(BrokerConfig(listen=[]))
    await nursery.start(broker.run)
    transport = EmbeddedTransport(broker)
    hub = MqttHub(transport)
    transport.hub = hub
    await nursery.start(transport.run)
    yield Rig(broker, hub, transport)
    host.sync({})
    host.stats.clear()


def values(readings: list[Reading], point: str) -> list[Any]:
    return [r.value for r in readings if r.point == point]


async def test_devices_sharing_a_codec_are_decoded_in_one_call(rig: Rig, nursery: trio.Nursery) -> None:
    for d in ("d1", "d2"):
        await rig.device(nursery, d, "acme")
    stats = registry.host().stats["acme"]
    for i in range(20):  # queued before the delivery task runs: one turn
        rig.publish("d1" if i % 2 == 0 else "d2", frame(i))
    await rig.wait("d1", 30)
    await rig.wait("d2", 30)
    assert stats.calls == 1 and stats.items == 20
    assert values(rig.got["d1"], "temperature") == [(2000 + i) / 100 for i in range(0, 20, 2)]
    assert values(rig.got["d2"], "temperature") == [(2000 + i) / 100 for i in range(1, 20, 2)]
    assert {r.device for r in rig.got["d2"]} == {"d2"}
    # a lone message: decoded alone, delivered without waiting for company
    rig.publish("d1", frame(99))
    await rig.wait("d1", 33)
    assert stats.calls == 2 and values(rig.got["d1"], "temperature")[-1] == 20.99


async def test_a_poisonous_frame_spoils_only_its_own_reading(rig: Rig, nursery: trio.Nursery) -> None:
    for d in ("good", "evil"):
        await rig.device(nursery, d, "poison")
    stats = registry.host().stats["poison"]
    for i in range(10):
        rig.publish("good", frame(i))
        if i == 5:
            rig.publish("evil", b"\xff" * 8)  # traps the module
    await rig.wait("good", 30)
    await rig.wait("evil", 1)
    assert values(rig.got["good"], "temperature") == [(2000 + i) / 100 for i in range(10)]
    assert {r.quality for r in rig.got["good"]} == {Quality.GOOD}
    (bad,) = rig.got["evil"]
    assert bad.point == "payload" and bad.quality is Quality.BAD and bad.value is None
    # the batch call trapped, then each message was decoded alone
    assert stats.failures.get("trap") == 2 and stats.calls == 10
