"""Cloud and edge engines in one process, the loopback proxy between them: offline autonomy
(a local scene on an ONNX detection raises its alarm with the uplink cut), the outbox drained
after the cut heals, duplicates of a re-sent upload skipped, link state and revision shown."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import trio
from runtime.helpers import fast_config

from twin.api.server import ApiService
from twin.control.service import ControlService
from twin.edge.agent import EdgeAgent
from twin.edge.cloud import EdgeCloud, link_device
from twin.registry import open_registry
from twin.registry.credentials import create_device_key
from twin.runtime.engine import Engine
from twin.runtime.timeseries_service import TimeSeriesService
from twin.spec import load_site
from twin.spec.apply import apply_specs
from twin.timeseries.base import Selector

from .harness import Proxy, until
from .tinymodel import build

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {{name: remote}}
---
apiVersion: flux.iot/v1
kind: DeviceGroup
metadata: {{name: edge-devs, site: remote}}
---
apiVersion: flux.iot/v1
kind: DeviceModel
metadata: {{name: cam-model}}
spec:
  telemetry:
    motion: {{type: boolean}}
    detection: {{type: string}}
    detection_score: {{type: number}}
---
apiVersion: flux.iot/v1
kind: DeviceModel
metadata: {{name: fan-model}}
spec:
  telemetry: {{current: {{type: number}}}}
  properties: {{power: {{type: boolean, access: readwrite, default: false}}}}
  commands:
    set_state:
      params: {{type: object, required: [state], properties: {{state: {{type: boolean}}}}}}
      sets: {{power: {{param: state}}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {{name: fan, site: remote, group: edge-devs}}
spec:
  type: actuator
  model: fan-model
  binding: {{sim: {{interval: 1s, points: {{current: {{wave: random_walk, min: 0, max: 1}}}}}}}}
---
apiVersion: flux.iot/v1
kind: Model
metadata: {{name: brightness}}
spec:
  file: {model}
  input: {{shape: [1, 3, 18, 32]}}
  labels: [dark, bright]
  threshold: 0.6
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {{name: gw-t, site: remote}}
spec:
  devices: {{group: edge-devs}}
  models: [brightness]
  uplink: {{url: "http://127.0.0.1:1", interval: 50ms, timeout: 2s,
            backoff: {{initial: 100ms, max: 500ms}}, sync: 500ms}}
  vision:
    - {{camera: cam, model: brightness, input: "lavfi:color=c=white", fps: 5, size: 64x36}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {{name: meter, site: remote, group: edge-devs}}
spec:
  type: sensor
  binding: {{sim: {{interval: 100ms, points: {{level: {{wave: random_walk, min: 0, max: 10}}}}}}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {{name: cam, site: remote, group: edge-devs}}
spec:
  type: camera
  model: cam-model
  binding: {{http: {{}}}}
---
apiVersion: flux.iot/v1
kind: Scene
metadata: {{name: bright-alarm, site: remote}}
spec:
  triggers:
    - {{type: device_data, device: cam, point: detection, operator: "==", value: bright}}
  actions:
    - {{type: alarm, action: raise, device: cam, alarm: light_on, severity: major,
       message: "the camera sees light"}}
"""


async def test_offline_scene_on_detection_then_drain_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "site.yaml").write_text(SITE.format(model=build(tmp_path / "m.onnx")))
    loaded = load_site(folder)
    creg = open_registry(None, tmp_path / "cloud")
    ereg = open_registry(None, tmp_path / "edge")
    try:
        for reg in (creg, ereg):
            apply_specs(reg, loaded, author="test")
        _, key = create_device_key(creg, link_device("gw-t"))
        cloud_edge = EdgeCloud(offline_after=2.0, check_interval=0.2)
        cloud_control = ControlService()
        cloud = Engine(creg, fast_config(state_dir=tmp_path / "cloud"),
                       [cloud_control, TimeSeriesService(), cloud_edge,
                        ApiService("127.0.0.1", 0)])
        async with trio.open_nursery() as n:
            await n.start(cloud.run)
            port = int(cloud.service_info["api"]["url"].rsplit(":", 1)[1])
            proxy = Proxy(port)
            await n.start(proxy.serve)
            proxy.cut()  # the edge starts offline
            agent = EdgeAgent("gw-t", f"http://127.0.0.1:{proxy.port}", key)
            edge = Engine(ereg, fast_config(state_dir=tmp_path / "edge", edge="gw-t"),
                          [ControlService(), TimeSeriesService(), agent])
            await n.start(edge.run)
            assert sorted(edge.controller.tasks) == ["cam", "fan", "meter"]
            assert not cloud.controller.tasks  # the cloud leaves them to the edge

            async def local_alarm() -> bool:
                rows = await edge.rio.call(ereg.alarms, device="cam")
                return any(a.type == "light_on" for a in rows)

            await until(local_alarm, "the local scene's alarm (uplink down)")
            assert agent.uplink is not None and not agent.uplink.online
            assert agent.outbox is not None and len(agent.outbox) > 0
            assert agent.pipelines["cam"].detections >= 1
            link = cloud_edge.link("gw-t").state(0)
            assert not link["online"] and link["uploads"] == 0

            # a command from the cloud while the edge is offline: queued with its ledger state
            cmd = await cloud_control.ledger.submit("fan", "set_state", {"state": True},
                                                    command_timeout=60)
            stale = await cloud_control.ledger.submit("fan", "set_state", {"state": False},
                                                      command_timeout=0.5)
            await trio.sleep(1.0)
            row = await cloud.rio.call(creg.get_command, cmd.id)
            assert row is not None and row.status == "pending"

            proxy.heal()

            async def drained() -> bool:
                box = agent.outbox
                assert box is not None
                return agent.uplink.online and len(box) == 0 and cloud_edge.link("gw-t").online  # type: ignore[union-attr]

            await until(drained, "the outbox drained")

            async def cloud_alarm() -> bool:
                rows = await cloud.rio.call(creg.alarms, device="cam")
                return any(a.type == "light_on" for a in rows)

            await until(cloud_alarm, "the alarm forwarded to the cloud")

            async def command_done() -> bool:
                row = await cloud.rio.call(creg.get_command, cmd.id)
                return row is not None and row.status == "success"

            await until(command_done, "the queued command run by the edge, its result up")
            await cloud_edge.expire_commands()
            old = await cloud.rio.call(creg.get_command, stale.id)
            assert old is not None and old.status == "timeout"  # expired as declared
            ran = [c for c in edge.service_info["control"].ledger.commands.values()
                   if c.idempotency_key == f"cloud:{cmd.id}"]
            assert len(ran) == 1 and str(ran[0].status) == "success"
            state = cloud_edge.link("gw-t").state(0)
            assert state["received"]["telemetry"] > 0 and state["revision"] == 1
            assert state["duplicates"] == 0

            # a re-sent upload (its answer lost) is skipped: nothing stored twice
            box = agent.outbox
            seqs = list(range(1, 6))
            records = [[s, "telemetry", 1.0, [["meter", "level", 1.5, 1000.0 + s, "good"]]]
                       for s in seqs]
            async with httpx.AsyncClient() as c:
                r = await c.post(f"{cloud.service_info['api']['url']}/api/v1/edge-link/gw-t/batch",
                                 json={"runs": [{"after": 0, "records": records}]},
                                 headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert r.json()["duplicates"] == 5 and r.json()["accepted"] == 0
            svc = cloud.service_info["timeseries"]
            await svc.flush_barrier()
            rows = svc.store.read_raw(Selector.of(devices="meter"), 999.0, 1010.0)
            assert rows.num_rows == 0  # the fake re-send's readings were not stored

            async def stored_all() -> bool:
                await svc.flush_barrier()
                t = svc.store.read_raw(Selector.of(devices="meter", metrics="level"), 0, 4e9)
                e = edge.service_info["timeseries"]
                await e.flush_barrier()
                le = e.store.read_raw(Selector.of(devices="meter", metrics="level"), 0, 4e9)
                # every reading the edge had when drained is in the cloud once
                cloud_ts = t.column("ts").to_pylist()
                return len(cloud_ts) == len(set(cloud_ts)) and len(cloud_ts) >= le.num_rows - 50

            await until(stored_all, "the cloud to have the edge's readings")
            del box
            n.cancel_scope.cancel()
    finally:
        creg.close()
        ereg.close()
