"""A site's simulated MQTT device, run next to a real engine: it logs in to the embedded broker
with a device key provisioned for it, its readings arrive in the twin, it answers commands, and
a revoked key shuts it out."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

from runtime.helpers import apply, eventually, fast_config, model, running_engine, site
from twin.control.ledger import CommandStatus
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig
from twin.runtime.simulators import SimulatorService, load_simulators
from twin.runtime.state import Status

SIMULATORS = """\
mqtt:
  aq_01:
    interval: 100ms
    points:
      co2: {wave: constant, value: 612}
      pm25: {wave: random_walk, min: 3, max: 25}
"""


def docs() -> list[dict[str, Any]]:
    aq = model(
        "air-quality",
        telemetry={"co2": {"type": "number"}, "pm25": {"type": "number"}},
        properties={"led": {"type": "boolean", "access": "readwrite"}},
        commands={
            "set_led": {
                "params": {"type": "object", "required": ["state"],
                           "properties": {"state": {"type": "boolean"}}},
                "sets": {"led": {"param": "state"}},
            }
        },
    )
    device = {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": {"name": "aq_01", "site": "plant-a"},
        "spec": {"type": "sensor", "model": "air-quality", "binding": {"mqtt": {}},
                 "heartbeat": {"interval": "1s", "timeout": "30s"}, "desired": {"led": True}},
    }
    return [site(), aq, device]


async def test_simulated_mqtt_device_logs_in_with_its_key(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    (site_dir / "simulators").mkdir(parents=True)
    (site_dir / "simulators" / "mqtt.yaml").write_text(SIMULATORS, encoding="utf-8")
    assert load_simulators(site_dir) == {
        "aq_01": {"interval": "100ms", "points": {"co2": {"wave": "constant", "value": 612},
                                                  "pm25": {"wave": "random_walk", "min": 3,
                                                           "max": 25}}}
    }
    reg = open_registry(None, tmp_path / "state")
    apply(reg, *docs())
    control = ControlService(reconcile_interval=0.1)
    mqtt = MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0,
                                         revalidate_interval=0.5))
    sims = SimulatorService(site_dir)
    async with running_engine(reg, fast_config(state_dir=tmp_path / "state"),
                              [control, mqtt, sims]) as engine:
        info = engine.service_info["simulators"]
        assert info["devices"] == ["aq_01"]
        # the key was provisioned like `twin device-key create aq_01`, kept 0600 in the state dir
        key_file = tmp_path / "state" / "simulators" / "aq_01.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        keys = reg.device_keys("aq_01")
        assert len(keys) == 1 and key.startswith(f"dk_{keys[0].id}_")
        # it connected through the broker's TCP listener as user aq_01 (not in-process)
        broker = mqtt.broker
        assert broker is not None
        def logged_in() -> bool:
            conn = getattr(broker.sessions.get("sim-aq_01"), "conn", None)
            p = getattr(conn, "principal", None)
            return p is not None and (p.kind, p.name) == ("device", "aq_01")

        await eventually(logged_in)
        # its readings arrive in the twin
        twin = engine.twin("aq_01")
        assert twin is not None
        await eventually(lambda: "co2" in twin.reported and "pm25" in twin.reported)
        assert twin.reported["co2"].value == 612
        assert 3 <= twin.reported["pm25"].value <= 25
        await eventually(lambda: twin.status == Status.ONLINE)
        # it answers commands over MQTT, and acts on them (the model's `sets`)
        await eventually(lambda: twin.reported.get("led") is not None and twin.reported["led"].value is True)
        cmd = await control.ledger.submit("aq_01", "set_led", {"state": False}, source="api:op")
        cmd = await control.ledger.wait(cmd.id)
        assert cmd.status is CommandStatus.SUCCESS, cmd.error
        assert sims.sims["aq_01"].commands[-1] == ("set_led", {"state": False})
        await eventually(lambda: twin.reported["led"].value is False)
        # revoking its key shuts it out: the broker closes its connection, readings stop
        reg.revoke_device_key(keys[0].id, time.time())
        sim = sims.sims["aq_01"]
        await eventually(lambda: not sim.connected, within=30)
        published = sim.published
        await eventually(lambda: sim.transport.disconnects >= 2, within=30)  # refused again
        assert sim.published == published
    reg.close()

