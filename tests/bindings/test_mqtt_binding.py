"""The MQTT binding inside a running engine with the embedded broker (port 0), devices driven
by paho-mqtt: telemetry → reported state, Last Will → offline at once, commands (MQTT 5
request/response and the 3.1.1 convention), device keys, ACLs and their metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.mqtt.conftest import WAIT, Client, run_sync
from tests.runtime.helpers import apply, eventually, fast_config, model, site
from twin.api.auth import create_device_key, make_user
from twin.bindings.mqtt import MqttBinding, device_topics
from twin.errors import CommandError, PortInUseError
from twin.mqtt.hub import InMessage
from twin.registry.base import Registry
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig, bind_listener
from twin.runtime.state import Status


def mqtt_device(name: str, site_: str = "plant-a", **opts: Any) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": {"name": name, "site": site_},
        "spec": {
            "type": "sensor",
            "model": "th-sensor",
            "binding": {"mqtt": opts},
            "heartbeat": {"interval": "60s", "timeout": "300s"},  # only the will can be fast
        },
    }


@pytest.fixture
async def engine(
    registry: Registry, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Engine]:
    apply(
        registry,
        site(),
        model(),
        mqtt_device("d1"),
        mqtt_device("d2", command_timeout="5s"),
    )
    svc = MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0))
    eng = Engine(registry, fast_config(state_dir=tmp_path / "state"), [svc])
    await nursery.start(eng.run)
    yield eng


def port(engine: Engine) -> int:
    return int(engine.service_info["mqtt"]["addresses"][0].rsplit(":", 1)[1])


def topics(name: str) -> dict[str, str]:
    return device_topics(name, "plant-a", {})


async def device_client(engine: Engine, name: str, key: str, **kw: Any) -> Client:
    return await run_sync(lambda: Client(port(engine), name, username=name, password=key, **kw))


async def test_telemetry_heartbeat_will_and_metrics(engine: Engine, registry: Registry) -> None:
    _, key = create_device_key(registry, "d1")
    t = topics("d1")
    await subscribed(engine, "d1")  # the engine listens: a single publish is enough
    dev = await device_client(engine, "d1", key, will=(t["status"], b"offline", 1, True))
    assert dev.connack is not None and not dev.connack[1].is_failure
    twin = engine.twin("d1")
    assert twin is not None
    await run_sync(dev.publish, t["telemetry"], json.dumps({"temperature": 21.5, "ts": 1.7e9}), 1)
    await eventually(lambda: "temperature" in twin.reported)
    assert twin.reported["temperature"].value == 21.5
    assert twin.reported["temperature"].ts == 1.7e9
    await eventually(lambda: twin.status == Status.ONLINE)
    # the will marks it offline at once (the heartbeat timeout is 300 s)
    await run_sync(dev.kill)
    await eventually(lambda: twin.status == Status.OFFLINE, within=WAIT)
    # any message brings it back
    dev2 = await device_client(engine, "d1", key)
    await run_sync(dev2.publish, t["state"], b"", 1)
    await eventually(lambda: twin.status == Status.ONLINE, within=WAIT)
    await run_sync(dev2.close)
    text = engine.prom.render().decode()
    assert "twin_mqtt_hub_messages_total" in text
    assert "twin_mqtt_offline_events_total 1.0" in text


def _responder(dev: Client, flavour: str, stop: threading.Event) -> None:
    """A device answering commands: executing, then success (or failure for 'fail')."""
    while not stop.is_set():
        try:
            m = dev.messages.get(timeout=0.2)
        except Exception:
            continue
        req = json.loads(m.payload)
        rt = req["response_topic"]
        if flavour == "v5":
            from tests.mqtt.conftest import props

            mp: Any = m.properties
            rt = mp.ResponseTopic
            cd = mp.CorrelationData
            p = props(CorrelationData=cd)
            dev.publish(rt, json.dumps({"status": "executing"}), 1, props=p)
            final = (
                {"status": "failure", "error": "no"}
                if req["name"] == "fail"
                else {
                    "status": "success",
                    "result": {"echo": req["params"]},
                }
            )
            dev.publish(rt, json.dumps(final), 1, props=p)
        else:
            dev.publish(rt, json.dumps({"id": req["id"], "status": "executing"}), 1)
            status = "failure" if req["name"] == "fail" else "success"
            dev.publish(
                rt, json.dumps({"id": req["id"], "status": status, "result": req["params"]}), 1
            )


@pytest.mark.parametrize("flavour", ["v5", "v311"])
async def test_commands(engine: Engine, registry: Registry, flavour: str) -> None:
    _, key = create_device_key(registry, "d2")
    t = topics("d2")
    dev = await device_client(engine, "d2", key, v5=flavour == "v5")
    assert rcs(await run_sync(dev.subscribe, t["command"], 1)) == [1]
    stop = threading.Event()
    th = threading.Thread(target=_responder, args=(dev, flavour, stop), daemon=True)
    th.start()
    try:
        binding = await subscribed(engine, "d2")
        seen: list[str] = []
        result = await binding.send_command(
            "set_mode", {"mode": "eco"}, progress=lambda s, d: seen.append(s)
        )
        assert seen == ["executing"]
        assert result == ({"echo": {"mode": "eco"}} if flavour == "v5" else {"mode": "eco"})
        with pytest.raises(CommandError, match="failure"):
            await binding.send_command("fail", {})
    finally:
        stop.set()
        await run_sync(th.join)
    # writes go to the desired topic
    await run_sync(dev.subscribe, t["desired"], 1)
    await binding.write("setpoint", 22)
    m = await run_sync(dev.get)
    assert m.topic == t["desired"] and json.loads(m.payload) == {"setpoint": 22}
    await run_sync(dev.close)


async def subscribed(engine: Engine, name: str) -> MqttBinding:
    def ready() -> bool:
        b = engine.controller.tasks[name].binding
        return isinstance(b, MqttBinding) and b.subscribed

    await eventually(ready)
    binding = engine.controller.tasks[name].binding
    assert isinstance(binding, MqttBinding)
    return binding


def rcs(codes: list[Any]) -> list[int]:
    return [int(getattr(r, "value", r)) for r in codes]


async def test_command_timeout(engine: Engine) -> None:
    binding = await subscribed(engine, "d2")
    binding.command_timeout = 0.2
    with pytest.raises(CommandError, match="no answer"):
        await binding.send_command("reboot", {})


async def test_auth_and_acls(engine: Engine, registry: Registry) -> None:
    _, key1 = create_device_key(registry, "d1")
    _, key2 = create_device_key(registry, "d2")
    registry.put_user(make_user("ops", "password123", "operator"))
    registry.put_user(make_user("viewer", "password123", "viewer"))
    p = port(engine)
    # wrong key, key of another device, unknown user: refused
    for user, pw in [("d1", key2), ("d1", "dk_nope_nope"), ("nobody", "x"), ("ops", "wrong")]:
        bad = await run_sync(lambda u=user, w=pw: Client(p, "", username=u, password=w))
        assert bad.connack is not None and bad.connack[1].is_failure
        await run_sync(bad.close)
    anon = await run_sync(lambda: Client(p, "anon", v5=True))
    assert anon.connack is not None and anon.connack[1].is_failure
    await run_sync(anon.close)
    # a device: its own topics only
    dev = await device_client(engine, "d1", key1, v5=True)
    t1, t2 = topics("d1"), topics("d2")
    assert rcs(await run_sync(dev.subscribe, t1["command"], 1)) == [1]
    assert rcs(await run_sync(dev.subscribe, t2["command"], 1)) == [0x87]
    assert rcs(await run_sync(dev.subscribe, "flux/#", 1)) == [0x87]
    ops = await run_sync(lambda: Client(p, "ops", username="ops", password="password123", v5=True))
    assert rcs(await run_sync(ops.subscribe, "flux/#", 1)) == [1]
    await run_sync(dev.publish, t2["telemetry"], b'{"temperature": 1}', 1)  # denied: dropped
    await run_sync(dev.publish, t1["telemetry"], b'{"temperature": 2}', 1)
    m = await run_sync(ops.get)
    assert m.topic == t1["telemetry"]
    # operators may command devices but not impersonate them
    await run_sync(ops.publish, t1["command"], b"{}", 1)
    await run_sync(ops.publish, t1["telemetry"], b"{}", 1)
    viewer = await run_sync(
        lambda: Client(p, "v", username="viewer", password="password123", v5=True)
    )
    assert rcs(await run_sync(viewer.subscribe, "flux/plant-a/#", 1)) == [1]
    for cl in (dev, ops, viewer):
        await run_sync(cl.close)
    text = engine.prom.render().decode()
    assert "twin_mqtt_auth_failures_total 5.0" in text
    assert 'twin_mqtt_denied_total{action="publish"} 2.0' in text
    assert 'twin_mqtt_denied_total{action="subscribe"} 2.0' in text


async def test_revoked_credentials_close_open_connections(
    engine: Engine, registry: Registry
) -> None:
    """A key revoked (or a user disabled / demoted) after the client connected: the next
    revalidation closes that connection with 0x87 and leaves the others alone."""
    rec1, key1 = create_device_key(registry, "d1")
    _, key2 = create_device_key(registry, "d2")
    registry.put_user(make_user("ops", "password123", "operator"))
    registry.put_user(make_user("viewer", "password123", "viewer"))
    p = port(engine)
    svc = next(s for s in engine.services if isinstance(s, MqttService))
    d1 = await device_client(engine, "d1", key1, v5=True)
    d2 = await device_client(engine, "d2", key2, v5=True)
    ops = await run_sync(lambda: Client(p, "ops", username="ops", password="password123", v5=True))
    viewer = await run_sync(
        lambda: Client(p, "v", username="viewer", password="password123", v5=True)
    )
    assert await svc.auth.revalidate_once(svc.broker) == 0  # nothing revoked yet
    registry.revoke_device_key(rec1.id, time.time())  # as the CLI would: no event to us
    registry.put_user(make_user("ops", "password123", "viewer"))  # demoted
    assert await svc.auth.revalidate_once(svc.broker) == 2
    for cl in (d1, ops):
        rc, _props = await run_sync(lambda c=cl: c.disconnects.get(timeout=WAIT))
        assert int(getattr(rc, "value", rc)) == 0x87
    # the others still work
    assert rcs(await run_sync(viewer.subscribe, "flux/plant-a/#", 1)) == [1]
    await run_sync(d2.publish, topics("d2")["telemetry"], b'{"temperature": 3}', 1)
    assert (await run_sync(viewer.get)).topic == topics("d2")["telemetry"]
    assert d2.disconnects.empty() and viewer.disconnects.empty()
    # the revoked key cannot come back
    again = await run_sync(lambda: Client(p, "", username="d1", password=key1))
    assert again.connack is not None and again.connack[1].is_failure
    for cl in (d1, d2, ops, viewer, again):
        await run_sync(cl.close)
    assert "twin_mqtt_revoked_disconnects_total 2.0" in engine.prom.render().decode()


async def test_taken_port_is_one_line_with_a_hint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            bind_listener("127.0.0.1", taken)
    assert str(info.value) == f"mqtt: address 127.0.0.1:{taken} is already in use"
    assert info.value.hint is not None and "--mqtt-listen" in info.value.hint


# -- payload formats (no broker) --------------------------------------------------------------
def _binding(**opts: Any) -> MqttBinding:
    doc = {"metadata": {"name": "d", "site": "s"}}
    return MqttBinding("d", opts, doc, None, hub=object())  # type: ignore[arg-type]


def _values(b: MqttBinding, topic: str, payload: bytes) -> dict[str, Any]:
    return {r.point: r.value for r in b._readings(InMessage(topic, payload))}


def test_payload_formats() -> None:
    b = _binding()
    assert b.topics["telemetry"] == "flux/s/d/telemetry"
    assert b.topics["response"] == "flux/s/d/command/response"
    assert _values(b, "x", b'{"t": 1, "nested": {"h": 2}, "ts": 5}') == {"t": 1, "nested.h": 2}
    assert _values(b, "x", b"3.5") == {"value": 3.5}
    b = _binding(fields={"temperature": "data.t"})
    assert _values(b, "x", b'{"data": {"t": 20}, "other": 1}') == {"temperature": 20}
    b = _binding(format="raw", topics={"telemetry": "sensors/{device}/+"})
    assert b.topics["telemetry"] == "sensors/d/+"
    assert _values(b, "sensors/d/temperature", b"21.5") == {"temperature": 21.5}
    assert _values(b, "sensors/d/on", b"true") == {"on": True}
    bad = b._readings(InMessage("sensors/d/t", b"abc"))
    assert bad[0].quality == "bad"
    b = _binding(format="string", point="label")
    assert _values(b, "x", "héllo".encode()) == {"label": "héllo"}
