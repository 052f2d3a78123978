"""ONVIF and GB28181 cameras in a running engine (real time, real peers): the fake ONVIF
camera (streaming from GStreamer's RTSP server) goes live, its PTZ moves through the command
ledger and its PullPoint events become device events; a sipp GB28181 device registers with the engine's SIP server, its channel goes live
through INVITE + PS over RTP, and the camera bound to it is alarmed when its keepalives stop."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.runtime.helpers import apply, eventually, fast_config, running_engine, site
from tests.video import gb_device
from tests.video.onvif_camera import FakeOnvifCamera
from tests.video.test_gb28181 import CHAN, DEV, Device
from tests.video.test_onvif import HERE, _jpeg
from twin.cli.discover_cmds import discover_onvif
from twin.control.service import ControlService
from twin.registry.base import Registry
from twin.runtime.bus import Filter
from twin.runtime.state import Status
from twin.video.gb28181.server import Gb28181Config
from twin.video.gb28181.service import OFFLINE_ALARM, Gb28181Service
from twin.video.onvif_events import OnvifEventsService

from .helpers import camera, camera_model

pytestmark = pytest.mark.integration


@pytest.fixture
def rtsp_url() -> Iterator[str]:
    proc = subprocess.Popen(["/usr/bin/python3", str(HERE / "gst_rtsp_server.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("ready"), line
        yield f"rtsp://127.0.0.1:{int(line.split()[1])}/cam"
    finally:
        proc.kill()
        proc.wait()


async def test_onvif_camera_live_and_ptz_through_the_ledger(
        registry: Registry, tmp_path: Path, rtsp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWIN_SECRET_CAMS_GATE", "secret")
    with FakeOnvifCamera(auth="digest", stream_uri=rtsp_url, snapshot=_jpeg(),
                         name="gate") as cam:
        # discover (unicast WS-Discovery probe) -> Device YAML -> applied (+ a model, which
        # discovery cannot know, and faster health reports for the test)
        docs, warnings = await discover_onvif([("127.0.0.1", cam.discovery_port)], 1.0,
                                              "admin", "secret", "cams/gate", "plant-a", "")
        assert not warnings and [d["metadata"]["name"] for d in docs] == ["gate"]
        doc = docs[0]
        doc["spec"]["model"] = "cam-model"
        doc["spec"]["binding"]["onvif"].update(health_interval="0.5s", stall_timeout="6s")
        apply(registry, site(), camera_model(), doc)
        control = ControlService(reconcile_interval=0.5)
        events = OnvifEventsService(poll=0.5, wait_s=1.0)
        config = fast_config(state_dir=tmp_path / "state")
        async with running_engine(registry, config, services=[control, events]) as engine:
            gate = engine.twin("gate")
            assert gate is not None
            await eventually(lambda: gate.status == Status.ONLINE
                             and gate.reported.get("fps") is not None
                             and gate.reported["fps"].value > 0, within=60)
            pipeline = engine.video.get("gate")
            assert pipeline is not None and pipeline.source.display == rtsp_url
            for params, want in (
                ({"action": "move", "pan": 0.5, "tilt": -0.5}, "ContinuousMove"),
                ({"action": "stop"}, "Stop"),
                ({"action": "set_preset", "name": "door"}, "SetPreset"),
                ({"action": "goto_preset", "preset": "1"}, "GotoPreset"),
            ):
                cmd = await control.ledger.submit("gate", "ptz", params)
                done = await control.ledger.wait(cmd.id)
                assert str(done.status) == "success", done.error
                assert cam.ptz[-1][0] == want
            assert cam.ptz[0][1]["x"] == "0.5" and cam.ptz[0][1]["y"] == "-0.5"
            cmd = await control.ledger.submit("gate", "ptz", {"action": "goto_preset",
                                                              "preset": "42"})
            done = await control.ledger.wait(cmd.id)
            assert str(done.status) == "failed" and "GotoPreset" in (done.error or "")
            # the camera's events (PullPoint) become the device's events on the bus
            with engine.bus.subscribe(Filter.of(devices=["gate"], kinds=["event"])) as sub:
                await eventually(lambda: "gate" in events.pullpoints, within=30)
                cam.push_event("tns1:RuleEngine/CellMotionDetector/Motion", {"IsMotion": "true"})
                with trio.fail_after(30):
                    event = await sub.receive.receive()
            assert event["site"] == "plant-a" and event["type"] == "event"
            assert event["data"]["topic"] == "tns1:RuleEngine/CellMotionDetector/Motion"
            assert event["data"]["data"] == {"IsMotion": "true"}
            await engine.writer.flushed()


async def test_gb28181_channel_live_then_offline_alarm(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWIN_SECRET_GB28181", "pw-28181")
    pcap = gb_device.write_pcap(gb_device.rtp_packets(gb_device.make_ps(12.0)),
                                tmp_path / "ps.pcap")
    apply(registry, site(), camera_model(), camera("gb_gate", {"gb28181": {
        "device_id": DEV, "channel": CHAN, "health_interval": "0.5s", "stall_timeout": "6s"}}))
    service = Gb28181Service(Gb28181Config(port=0, keepalive_timeout=4.0, linger=0.5))
    control = ControlService(reconcile_interval=0.5)
    config = fast_config(state_dir=tmp_path / "state")
    async with running_engine(registry, config, services=[control, service]) as engine:
        server = service.server
        assert server is not None
        cam = engine.twin("gb_gate")
        assert cam is not None
        async with Device(server, tmp_path, pcap, keepalives=600):
            await eventually(lambda: DEV in server.devices, within=30)
            # the camera connects once the device is registered: INVITE, PS over RTP, live
            await eventually(lambda: cam.status == Status.ONLINE
                             and cam.reported.get("fps") is not None
                             and cam.reported["fps"].value > 0, within=60)
            assert server.stats.invites >= 1
            cmd = await control.ledger.submit("gb_gate", "ptz", {"action": "goto_preset",
                                                                 "preset": 2})
            done = await control.ledger.wait(cmd.id)  # DeviceControl, answered 200 by sipp
            assert str(done.status) == "success", done.error
            assert done.result["ptz_cmd"] == "A50F018200020039"
            assert (tmp_path / "state" / "gb28181" / "discovered.yaml").exists()
        # the device is gone (sipp killed): no more keepalives -> offline -> camera alarmed
        await eventually(lambda: not server.devices[DEV].online, within=60)
        await engine.writer.flushed()
        await eventually(lambda: any(
            a.type == OFFLINE_ALARM for a in registry.alarms(device="gb_gate",
                                                              states=["active"])),
            within=10)
    await trio.lowlevel.checkpoint()
