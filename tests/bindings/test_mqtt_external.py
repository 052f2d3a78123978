"""External-broker mode against the Mosquitto on 127.0.0.1:1883: paho driven from Trio,
the engine as a client, shared subscriptions between engines, reconnect after a lost link.
Every test uses its own topic prefix so parallel runs do not collide."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.mqtt.conftest import WAIT, Client, run_sync
from tests.runtime.helpers import apply, eventually, fast_config, model, site
from twin.bindings.mqtt import MqttBinding
from twin.mqtt.hub import InMessage, MqttHub
from twin.mqtt.paho_trio import PahoTransport
from twin.registry.base import Registry
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig
from twin.runtime.state import Status

MOSQUITTO = ("127.0.0.1", 1883)


def _mosquitto_up() -> bool:
    try:
        socket.create_connection(MOSQUITTO, timeout=1).close()
        return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(not _mosquitto_up(), reason="no Mosquitto on 127.0.0.1:1883"),
]


def _mosq_client(cid: str, **kw: Any) -> Client:
    return Client(MOSQUITTO[1], cid, **kw)


async def test_engine_against_mosquitto(
    registry: Registry, nursery: trio.Nursery, tmp_path: Path
) -> None:
    prefix = f"flux-test-{uuid.uuid4().hex[:8]}"
    dev_doc = {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": {"name": "m1", "site": "plant-a"},
        "spec": {
            "type": "sensor",
            "model": "th-sensor",
            "binding": {"mqtt": {"broker": "external", "prefix": prefix + "/{device}"}},
            "heartbeat": {"interval": "60s", "timeout": "300s"},
        },
    }
    apply(registry, site(), model(), dev_doc)
    svc = MqttService(
        MqttServiceConfig(
            mode="external",
            broker_host=MOSQUITTO[0],
            broker_port=MOSQUITTO[1],
            client_id=f"{prefix}-engine",
        )
    )
    engine = Engine(registry, fast_config(state_dir=tmp_path / "state"), [svc])
    await nursery.start(engine.run)
    assert engine.service_info["mqtt"]["connected"] is True
    await eventually(
        lambda: getattr(engine.controller.tasks["m1"].binding, "subscribed", False)
    )  # every route subscribed on Mosquitto (SUBACKs awaited)
    binding = engine.controller.tasks["m1"].binding
    assert isinstance(binding, MqttBinding)
    will = (f"{prefix}/m1/status", b"offline", 1, False)  # not retained: leave no litter
    dev = await run_sync(lambda: _mosq_client(f"{prefix}-dev", v5=True, will=will))
    twin = engine.twin("m1")
    assert twin is not None
    await run_sync(dev.publish, f"{prefix}/m1/telemetry", json.dumps({"temperature": 19.5}), 1)
    await eventually(lambda: "temperature" in twin.reported)
    assert twin.reported["temperature"].value == 19.5

    # a command round trip with MQTT 5 request/response through Mosquitto
    await run_sync(dev.subscribe, f"{prefix}/m1/command", 1)

    def answer() -> None:
        m = dev.get()
        mp: Any = m.properties
        from tests.mqtt.conftest import props

        dev.publish(
            mp.ResponseTopic,
            json.dumps({"status": "success", "result": "done"}),
            1,
            props=props(CorrelationData=mp.CorrelationData),
        )

    async with trio.open_nursery() as n:
        n.start_soon(run_sync, answer)
        assert await binding.send_command("reboot", {}) == "done"
    # the Last Will, through Mosquitto, marks the device offline at once (timeout is 300 s)
    await eventually(lambda: twin.status == Status.ONLINE)
    await run_sync(dev.kill)
    await eventually(lambda: twin.status == Status.OFFLINE, within=WAIT)


async def test_shared_subscription_splits_traffic(nursery: trio.Nursery) -> None:
    prefix = f"flux-share-{uuid.uuid4().hex[:8]}"
    got: list[list[InMessage]] = [[], []]
    hubs = []
    for i in range(2):
        t = PahoTransport(*MOSQUITTO, client_id=f"{prefix}-e{i}")
        hub = MqttHub(t, share_group=prefix)
        t.hub = hub
        await nursery.start(t.run)
        assert t.connected
        await hub.route(f"{prefix}/+/telemetry", got[i].append, 1)
        hubs.append(hub)
    pub = await run_sync(lambda: _mosq_client(f"{prefix}-pub"))
    for k in range(40):
        await run_sync(pub.publish, f"{prefix}/d{k}/telemetry", b"1", 1)
    await eventually(lambda: len(got[0]) + len(got[1]) >= 40)
    assert len(got[0]) + len(got[1]) == 40  # each message to exactly one engine
    assert got[0] and got[1]  # both engines got a share
    await run_sync(pub.close)


async def test_reconnects_and_resubscribes(nursery: trio.Nursery) -> None:
    prefix = f"flux-reconn-{uuid.uuid4().hex[:8]}"
    t = PahoTransport(*MOSQUITTO, client_id=f"{prefix}-e", backoff_initial=0.05)
    hub = MqttHub(t)
    t.hub = hub
    got: list[InMessage] = []
    await nursery.start(t.run)
    await hub.route(f"{prefix}/#", got.append, 1)
    # cut the TCP connection under paho's feet
    sock = t.client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    await eventually(lambda: t.disconnects >= 1 and t.connected)
    pub = await run_sync(lambda: _mosq_client(f"{prefix}-pub"))
    await run_sync(pub.publish, f"{prefix}/x", b"after", 1)
    await eventually(lambda: any(m.payload == b"after" for m in got))
    await run_sync(pub.close)
