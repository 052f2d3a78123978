"""End to end over MQTT: a real paho device publishes telemetry to the embedded broker, the fan
scene fires, the ledger delivers the command through the MQTT binding, and a paho fan device
executes it and answers (executing, then success) — on MQTT 3.1.1 and 5.0."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.control.helpers import fan_model, fan_on_when_hot
from tests.mqtt.conftest import Client, run_sync
from tests.runtime.helpers import apply, eventually, fast_config, model, site
from twin.api.auth import create_device_key
from twin.bindings.mqtt import device_topics
from twin.control.ledger import CommandStatus
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig


def mqtt_device(name: str, model_: str, type_: str) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": {"name": name, "site": "plant-a"},
        "spec": {
            "type": type_,
            "model": model_,
            "binding": {"mqtt": {"command_timeout": "20s"}},
            "heartbeat": {"interval": "60s", "timeout": "300s"},
        },
    }


FAN = fan_model()
SCENE = fan_on_when_hot()


def fan_firmware(dev: Client, v5: bool, stop: threading.Event, executed: list[Any]) -> None:
    """The fan: runs each command, reports executing then success with its new state."""
    while not stop.is_set():
        try:
            m = dev.messages.get(timeout=0.2)
        except Exception:
            continue
        req = json.loads(m.payload)
        topic = req["response_topic"]
        props = None
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            mp: Any = m.properties
            topic = mp.ResponseTopic
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = mp.CorrelationData
        executed.append((req["name"], req["params"]))
        for status, extra in (
            ("executing", {}),
            ("success", {"result": {"power": req["params"]["state"]}}),
        ):
            body = {"status": status, **extra}
            if not v5:
                body["id"] = req["id"]
            dev.publish(topic, json.dumps(body), 1, props=props)


@pytest.mark.parametrize("v5", [False, True], ids=["mqtt311", "mqtt5"])
async def test_fan_scene_over_mqtt(tmp_path: Path, nursery: trio.Nursery, v5: bool) -> None:
    reg = open_registry(None, tmp_path / "state")
    apply(
        reg,
        site(),
        model(),
        FAN,
        mqtt_device("temp_sensor_01", "th-sensor", "sensor"),
        mqtt_device("fan_01", "fan", "actuator"),
        SCENE,
    )
    control = ControlService()
    mqtt = MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0))
    engine = Engine(reg, fast_config(state_dir=tmp_path / "state"), [mqtt, control])
    await nursery.start(engine.run)
    port = int(engine.service_info["mqtt"]["addresses"][0].rsplit(":", 1)[1])
    _, fan_key = create_device_key(reg, "fan_01")
    _, sensor_key = create_device_key(reg, "temp_sensor_01")
    fan = await run_sync(lambda: Client(port, "fan_01", username="fan_01", password=fan_key, v5=v5))
    sensor = await run_sync(
        lambda: Client(port, "temp_sensor_01", username="temp_sensor_01", password=sensor_key)
    )
    ft = device_topics("fan_01", "plant-a", {})
    st = device_topics("temp_sensor_01", "plant-a", {})
    await run_sync(fan.subscribe, ft["command"], 1)
    stop, executed = threading.Event(), []
    th = threading.Thread(target=fan_firmware, args=(fan, v5, stop, executed), daemon=True)
    th.start()
    try:
        await eventually(lambda: engine.controller.tasks["fan_01"].connected)
        await eventually(lambda: engine.controller.tasks["temp_sensor_01"].connected)
        await run_sync(sensor.publish, st["telemetry"], json.dumps({"temperature": 31.5}), 1)
        await eventually(lambda: any(t["status"] != "running" for t in control.scenes.traces))
        trace = control.scenes.traces[0]
        assert trace["status"] == "success", trace
        cmd = await control.ledger.get(trace["steps"][0]["result"]["command"])
        assert cmd.status is CommandStatus.SUCCESS
        assert [s for s, _ in cmd.transitions] == ["pending", "sent", "executing", "success"]
        assert cmd.result == {"power": True}
        assert executed == [("set_state", {"state": True})]
    finally:
        stop.set()
        await run_sync(th.join)
        for c in (fan, sensor):
            await run_sync(c.close)
