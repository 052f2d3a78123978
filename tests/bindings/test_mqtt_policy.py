"""MQTT ACLs for users come from the authorization policy (twin/policy.py), with real paho
clients against the embedded broker: a scoped admin reads and commands only its own site's
devices (it could subscribe to `#` and publish anywhere before); an unscoped admin still can."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.bindings.test_mqtt_binding import mqtt_device, rcs
from tests.mqtt.conftest import Client, run_sync
from tests.runtime.helpers import apply, fast_config, model, site
from twin.api.auth import create_device_key, make_user
from twin.bindings.mqtt import device_topics
from twin.registry.base import Registry
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig

PASSWORD = "password123"


@pytest.fixture
async def engine(
    registry: Registry, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Engine]:
    apply(
        registry,
        site("plant-a"),
        site("plant-b"),
        model(),
        mqtt_device("d1"),
        mqtt_device("e1", site_="plant-b"),
    )
    for name, role, sites in [
        ("admin", "admin", ()),
        ("admin_a", "admin", ("plant-a",)),
        ("oper_a", "operator", ("plant-a",)),
    ]:
        registry.put_user(make_user(name, PASSWORD, role, sites))
    svc = MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0))
    eng = Engine(registry, fast_config(state_dir=tmp_path / "state"), [svc])
    await nursery.start(eng.run)
    yield eng


async def connect(engine: Engine, user: str, password: str = PASSWORD) -> Client:
    port = int(engine.service_info["mqtt"]["addresses"][0].rsplit(":", 1)[1])
    return await run_sync(lambda: Client(port, user, username=user, password=password, v5=True))


async def test_scoped_admin_reads_and_commands_only_its_site(
    engine: Engine, registry: Registry
) -> None:
    _, key_d1 = create_device_key(registry, "d1")
    _, key_e1 = create_device_key(registry, "e1")
    d1, e1 = await connect(engine, "d1", key_d1), await connect(engine, "e1", key_e1)
    t_d1, t_e1 = device_topics("d1", "plant-a", {}), device_topics("e1", "plant-b", {})
    assert rcs(await run_sync(d1.subscribe, t_d1["command"], 1)) == [1]
    assert rcs(await run_sync(e1.subscribe, t_e1["command"], 1)) == [1]
    admin_a = await connect(engine, "admin_a")
    admin = await connect(engine, "admin")
    oper_a = await connect(engine, "oper_a")
    try:
        assert rcs(await run_sync(admin_a.subscribe, "flux/#", 1)) == [0x87]
        assert rcs(await run_sync(admin_a.subscribe, "#", 1)) == [0x87]
        assert rcs(await run_sync(admin_a.subscribe, t_e1["telemetry"], 1)) == [0x87]
        assert rcs(await run_sync(admin_a.subscribe, "flux/plant-a/#", 1)) == [1]
        assert rcs(await run_sync(oper_a.subscribe, "flux/plant-b/#", 1)) == [0x87]
        assert rcs(await run_sync(admin.subscribe, "flux/#", 1)) == [1]
        # commands: to its own site's device, delivered; to another site's, dropped
        await run_sync(admin_a.publish, t_e1["command"], b'{"from": "admin_a"}', 1)
        await run_sync(admin_a.publish, t_d1["command"], b'{"from": "admin_a"}', 1)
        assert (await run_sync(d1.get)).payload == b'{"from": "admin_a"}'
        await run_sync(oper_a.publish, t_e1["command"], b'{"from": "oper_a"}', 1)
        await run_sync(admin.publish, t_e1["command"], b'{"from": "admin"}', 1)
        # the first command e1 sees is the unscoped admin's: both scoped ones were dropped
        assert (await run_sync(e1.get)).payload == b'{"from": "admin"}'
        # a scoped admin cannot publish outside device topics either (an unscoped one can)
        assert rcs(await run_sync(admin.subscribe, "elsewhere/x", 1)) == [1]
        await run_sync(admin_a.publish, "elsewhere/x", b"scoped", 1)
        await run_sync(admin.publish, "elsewhere/x", b"unscoped", 1)
        got = [m.payload for m in await run_sync(admin.sync)]
        assert b"scoped" not in got and b"unscoped" in got
    finally:
        for cl in (d1, e1, admin_a, admin, oper_a):
            await run_sync(cl.close)
    text = engine.prom.render().decode()
    assert 'twin_mqtt_denied_total{action="publish"} 3.0' in text
