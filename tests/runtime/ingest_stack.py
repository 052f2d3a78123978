"""A whole engine as a device sees it, for the ingest-guard and fuzz tests: the REST API
(HTTP ingest) and the embedded MQTT broker on free ports, the time-series store and the
control service (scenes), with HTTP push, MQTT and simulated devices and their device keys."""

from __future__ import annotations

import json
import queue
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion

from tests.runtime.helpers import apply, fast_config, model, sim_device, site
from twin.api.app import ApiSettings
from twin.api.ratelimit import Rate
from twin.api.server import ApiService
from twin.bindings.mqtt import device_topics
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.registry.base import Registry
from twin.registry.credentials import create_device_key
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig
from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.base import Selector

WAIT = 30.0  # failure bound for blocking waits, not a performance threshold
HTTP_DEVICES = ("push1", "push2")
MQTT_DEVICES = ("mq1", "mq2")
HEARTBEAT = {"interval": "60s", "timeout": "600s"}


def _device(name: str, binding: dict[str, Any]) -> dict[str, Any]:
    return sim_device(name, binding=binding, heartbeat=HEARTBEAT)


def scene() -> dict[str, Any]:
    """A scene on push1's temperature, so readings go through the scene engine too."""
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Scene",
        "metadata": {"name": "hot", "site": "plant-a"},
        "spec": {
            "triggers": [
                {
                    "type": "device_data",
                    "device": "push1",
                    "point": "temperature",
                    "operator": ">",
                    "value": 30,
                }
            ],
            "actions": [{"type": "delay", "duration": "10ms"}],
        },
    }


@dataclass
class Stack:
    engine: Engine
    registry: Registry
    api_url: str
    mqtt_port: int
    timeseries: TimeSeriesService
    keys: dict[str, str] = field(default_factory=dict)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api_url, timeout=WAIT)

    async def ingest(self, client: httpx.AsyncClient, device: str, body: bytes) -> httpx.Response:
        return await client.post(
            f"/api/v1/ingest/{device}",
            content=body,
            headers={"X-Device-Key": self.keys[device], "Content-Type": "application/json"},
        )

    def stored(self, device: str, metric: str | None = None) -> list[dict[str, Any]]:
        store = self.timeseries.store
        assert store is not None
        sel = Selector.of(devices=device, metrics=metric)
        return list(store.read_raw(sel, 0, 2e9).to_pylist())

    def telemetry_topic(self, device: str) -> str:
        return device_topics(device, "plant-a", {})["telemetry"]

    def metrics(self) -> str:
        return self.engine.prom.render().decode()


@asynccontextmanager
async def ingest_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    state = tmp_path / "state"
    reg = open_registry(None, state)
    try:
        apply(
            reg,
            site(),
            model(),
            *(_device(n, {"http": {}}) for n in HTTP_DEVICES),
            *(_device(n, {"mqtt": {}}) for n in MQTT_DEVICES),
            sim_device("sim1", interval="200ms", heartbeat=HEARTBEAT),
            scene(),
        )
        keys = {n: create_device_key(reg, n)[1] for n in (*HTTP_DEVICES, *MQTT_DEVICES)}
        settings = ApiSettings(
            state_dir=state,
            rate_per_token=Rate(100_000, 100_000),
            rate_per_client=Rate(100_000, 100_000),
            rate_ingest_per_device=Rate(100_000, 100_000),
        )
        ts = TimeSeriesService(flush_interval=0.1, monitor_interval=5.0)
        engine = Engine(
            reg,
            fast_config(state_dir=state),
            [
                MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0)),
                ts,
                ControlService(reconcile_interval=0.5),
                ApiService("127.0.0.1", 0, settings),
            ],
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            mqtt = engine.service_info["mqtt"]["addresses"][0]
            stack = Stack(
                engine,
                reg,
                engine.service_info["api"]["url"],
                int(mqtt.rsplit(":", 1)[1]),
                ts,
                keys,
            )
            yield stack
            nursery.cancel_scope.cancel()
    finally:
        reg.close()


async def mqtt_ready(engine: Engine, *devices: str) -> None:
    """Wait until each MQTT device's binding has routed its topics (the engine listens)."""
    from twin.bindings.mqtt import MqttBinding

    def ready() -> bool:
        for name in devices:
            task = engine.controller.tasks.get(name)
            b = task.binding if task else None
            if not (isinstance(b, MqttBinding) and b.subscribed):
                return False
        return True

    with trio.fail_after(WAIT):
        while not ready():  # noqa: ASYNC110 - polling a plain predicate
            await trio.sleep(0.05)


class Device:
    """A paho-mqtt device (blocking; use from a worker thread) that records each PUBACK's
    reason code by message id."""

    def __init__(
        self, port: int, name: str, key: str, *, v5: bool, client_id: str | None = None
    ) -> None:
        proto = paho.MQTTv5 if v5 else paho.MQTTv311
        cid = client_id or name
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)
        self.c.username_pw_set(name, key)
        self.acks: dict[int, queue.Queue[int]] = {}
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port, 60)
        self.c.loop_start()
        rc = self.connacks.get(timeout=WAIT)
        assert not rc.is_failure, rc

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _props: Any) -> None:
        self.acks.setdefault(mid, queue.Queue()).put(int(rc.value))

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        """Publish and wait for the acknowledgement; returns its reason code (0 for QoS 0)."""
        info = self.c.publish(topic, payload, qos)
        info.wait_for_publish(WAIT)
        if qos == 0:
            return 0
        return self.acks.setdefault(info.mid, queue.Queue()).get(timeout=WAIT)

    def send(self, topic: str, doc: Any, qos: int = 1) -> int:
        return self.publish(topic, json.dumps(doc), qos)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
