"""Issue 11 item 1: one bad reading must not stop the engine.

The audit's reproduction: ``POST /api/v1/ingest/door_sensor_01`` with a valid key and
``{"values":{"x":1`` + 400 zeros + ``}}`` answered 200 and then the whole process exited
(``OverflowError`` from ``float(v)`` in the time-series writer); the same payload over MQTT did
the same. Now the value is refused at the edge (HTTP 422 naming the point; MQTT 5 PUBACK 0x99;
MQTT 3.1.1 logged and counted per device) and the other devices' readings keep arriving.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import trio

from tests.runtime.helpers import apply, eventually, fast_config, model, sim_device, site
from tests.runtime.ingest_stack import WAIT, Device, ingest_stack, mqtt_ready
from twin.bindings.base import Reading
from twin.registry import open_registry
from twin.runtime.bus import Filter
from twin.runtime.engine import Engine

HUGE = b'{"values":{"x":1' + b"0" * 400 + b"}}"
HUGE_MQTT = b'{"x":1' + b"0" * 400 + b"}"


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_http_ingest_refuses_a_huge_integer_and_the_engine_stays_up(tmp_path: Path) -> None:
    async with ingest_stack(tmp_path) as stack, stack.http() as client:
        r = await stack.ingest(client, "push1", HUGE)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "'x'" in detail and "64 bits" in detail
        # NaN / Infinity (Python's json accepts them) and a lone surrogate: refused too
        for body, words in (
            (b'{"values":{"t":NaN}}', "not finite"),
            (b'{"readings":[{"point":"t","value":-Infinity}]}', "not finite"),
            (b'{"values":{"t":"\\ud800"}}', "surrogate"),
            (b'{"values":{"t":' + b"[" * 5000 + b"]" * 5000 + b"}}", "nested too deeply"),
            (b'{"values":{"t":1},"ts":1e300}', "years 1-9999"),
        ):
            r = await stack.ingest(client, "push1", body)
            assert r.status_code == 422 and words in r.json()["detail"], (body[:40], r.text)
        # nothing of a refused body went in
        twin = stack.engine.twin("push1")
        assert twin is not None and "x" not in twin.reported and "t" not in twin.reported
        # the engine is up: another device's reading reaches the twin and the store
        r = await stack.ingest(client, "push2", b'{"values":{"temperature":21.5}}')
        assert r.status_code == 200, r.text
        other = stack.engine.twin("push2")
        assert other is not None
        await eventually(lambda: "temperature" in other.reported, within=WAIT)
        assert other.reported["temperature"].value == 21.5
        await eventually(lambda: len(stack.stored("push2", "temperature")) == 1, within=WAIT)
        text = stack.metrics()
        assert _metric(text, "twin_ingest_refused_total", edge="http", device="push1") == 6.0


async def test_mqtt_refuses_a_huge_integer_and_the_engine_stays_up(tmp_path: Path) -> None:
    async with ingest_stack(tmp_path) as stack:
        await mqtt_ready(stack.engine, "mq1", "mq2")
        port, keys = stack.mqtt_port, stack.keys
        v5 = await trio.to_thread.run_sync(lambda: Device(port, "mq1", keys["mq1"], v5=True))
        v3 = await trio.to_thread.run_sync(lambda: Device(port, "mq2", keys["mq2"], v5=False))
        try:
            t1, t2 = stack.telemetry_topic("mq1"), stack.telemetry_topic("mq2")
            # MQTT 5, QoS 1: PUBACK with reason code 0x99 (payload format invalid)
            rc = await trio.to_thread.run_sync(v5.publish, t1, HUGE_MQTT)
            assert rc == 0x99
            rc = await trio.to_thread.run_sync(v5.publish, t1, b'{"t": NaN}')
            assert rc == 0x99
            # MQTT 3.1.1 has no way to say so: acknowledged, not passed in, counted per device
            rc = await trio.to_thread.run_sync(v3.publish, t2, HUGE_MQTT)
            assert rc == 0
            await eventually(
                lambda: _metric(stack.metrics(), "twin_ingest_refused_total", device="mq2") == 1.0,
                within=WAIT,
            )
            # a QoS 0 publish of MQTT 5 is refused by the binding (nobody to tell)
            await trio.to_thread.run_sync(v5.publish, t1, HUGE_MQTT, 0)
            await eventually(
                lambda: _metric(stack.metrics(), "twin_ingest_refused_total", device="mq1") == 1.0,
                within=WAIT,
            )
            # the engine is up: good readings of both devices arrive, in the twin and the store
            good = json.dumps({"temperature": 19.0})
            assert await trio.to_thread.run_sync(v5.publish, t1, good) == 0
            assert await trio.to_thread.run_sync(v3.publish, t2, good) == 0
            for name in ("mq1", "mq2"):
                twin = stack.engine.twin(name)
                assert twin is not None
                await eventually(lambda t=twin: "temperature" in t.reported, within=WAIT)
                assert "x" not in twin.reported and "t" not in twin.reported
                await eventually(
                    lambda n=name: len(stack.stored(n, "temperature")) == 1, within=WAIT
                )
            assert "twin_mqtt_payload_refused_total 2.0" in stack.metrics()
        finally:
            await trio.to_thread.run_sync(v5.close)
            await trio.to_thread.run_sync(v3.close)


class LeakyBinding:
    """A binding that forgets to check its values (what twin.bindings.values is for): the
    device task must drop what it lets through, and keep the good readings."""

    protocol = "leaky"

    def __init__(self, device: str) -> None:
        self.device = device

    async def connect(self) -> None:
        await trio.lowlevel.checkpoint()

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        await trio.lowlevel.checkpoint()
        return []

    async def subscribe(self, send: trio.MemorySendChannel[Any]) -> None:
        for value, ts in ((math.nan, 1.7e9), (10**400, 1.7e9), ("\ud800", 1.7e9), (1.0, 1e300)):
            await send.send(Reading(self.device, "bad", value, ts))
        await send.send(Reading(self.device, "temperature", 20.5, 1.7e9))
        await trio.sleep_forever()

    async def write(self, point: str, value: Any) -> None:
        await trio.lowlevel.checkpoint()

    async def send_command(self, name: str, params: Any) -> Any:
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_the_device_task_drops_values_a_binding_failed_to_refuse(tmp_path: Path) -> None:
    reg = open_registry(None, tmp_path / "state")
    try:
        apply(reg, site(), model(), sim_device("leaky"))
        engine = Engine(reg, fast_config(state_dir=tmp_path / "state"))
        engine.runtime.binding_factory = lambda cfg, ctx: LeakyBinding(cfg.name)
        sub = engine.bus.open(Filter.of(kinds=["reading"]), buffer=100, name="test")
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            twin = engine.twin("leaky")
            assert twin is not None
            await eventually(lambda: "temperature" in twin.reported, within=WAIT)
            assert "bad" not in twin.reported
            assert engine.controller.tasks["leaky"].bad_values == 4
            first = await sub.receive.receive()
            assert (first["point"], first["value"]) == ("temperature", 20.5)
            dropped = engine.prom.registry.get_sample_value(
                "twin_bad_values_dropped_total", {"layer": "device"}
            )
            assert dropped == 4.0
            nursery.cancel_scope.cancel()
    finally:
        reg.close()
