"""ONVIF end to end against the fake camera (tests/video/onvif_camera.py, answering the WSDL
operations with WS-Security or HTTP digest auth) whose stream is a real RTSP server
(GStreamer's): WS-Discovery → ``twin discover onvif`` YAML → ``twin validate`` → the ``onvif``
resolver → ffmpeg decodes a frame; PTZ; events; wrong credentials; an unreachable camera."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import yaml

from tests.video.onvif_camera import FakeOnvifCamera
from twin.errors import BindingConnectError, CommandError
from twin.video import sources
from twin.video.onvif import OnvifAuthError, OnvifError
from twin.video.wsdiscovery import parse_probe_matches, probe

HERE = Path(__file__).parent
pytestmark = pytest.mark.integration


def _jpeg() -> bytes:
    return subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc=size=64x48", "-frames:v", "1", "-f", "image2pipe", "-c:v", "mjpeg", "-"],
        check=True, capture_output=True, timeout=30).stdout


@pytest.fixture(scope="module")
def rtsp_url() -> Iterator[str]:
    """A real RTSP camera (GStreamer's RTSP server) at rtsp://127.0.0.1:PORT/cam."""
    proc = subprocess.Popen(["/usr/bin/python3", str(HERE / "gst_rtsp_server.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("ready"):
            pytest.fail(f"GStreamer RTSP server did not start: {line} {proc.stderr.read()[:500]}"
                        if proc.stderr else line)
        yield f"rtsp://127.0.0.1:{int(line.split()[1])}/cam"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["wsse", "digest"])
def camera(request: pytest.FixtureRequest, rtsp_url: str) -> Iterator[FakeOnvifCamera]:
    with FakeOnvifCamera(auth=request.param, stream_uri=rtsp_url, snapshot=_jpeg(),
                         name="Gate Cam") as cam:
        yield cam


class _Secrets:
    def __init__(self, **values: str) -> None:
        self.values = values

    def get(self, ref: str) -> str | None:
        return self.values.get(ref)


def _device(cam: FakeOnvifCamera, **extra: object) -> dict[str, object]:
    return {"apiVersion": "flux.iot/v1", "kind": "Device", "metadata": {"name": "gate"},
            "spec": {"type": "camera", "binding": {"onvif": {
                "host": "127.0.0.1", "port": cam.port, "username": "admin",
                "password": {"secret": "cams/gate"}, **extra}}}}


async def test_ws_discovery_unicast_probe(camera: FakeOnvifCamera) -> None:
    found = await probe([("127.0.0.1", camera.discovery_port)], wait=1.0)
    assert len(found) == 1  # two probes (UDP retransmission), one device
    m = found[0]
    assert m.endpoint == camera.endpoint
    assert m.xaddrs == (f"{camera.base}/onvif/device_service",)
    assert m.scope("name") == "Gate Cam" and m.scope("hardware") == "FC-1"
    assert m.host_port == ("127.0.0.1", camera.port, "/onvif/device_service")
    assert camera.probes >= 1


def test_probe_matches_parser_refuses_junk() -> None:
    assert parse_probe_matches(b"<not xml", "uuid:1") == []
    assert parse_probe_matches(b"<a/>", "uuid:1") == []
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><x>&b;</x>')
    assert parse_probe_matches(bomb, None) == []
    assert parse_probe_matches(b"x" * 70_000, None) == []


async def test_resolve_stream_and_snapshot_then_ffmpeg_decodes(camera: FakeOnvifCamera,
                                                                tmp_path: Path) -> None:
    secrets = _Secrets(**{"cams/gate": "secret"})
    src = await sources.resolve_source(_device(camera), "onvif", secrets)
    rtsp = camera.stream_uri.replace("rtsp://", "rtsp://admin:secret@")
    assert src.url == rtsp
    assert src.display == camera.stream_uri  # no password in logs / status
    assert src.options["rtsp_transport"] == "tcp"
    assert src.snapshot_url == f"http://admin:secret@127.0.0.1:{camera.port}/snapshot.jpg"
    assert {"GetCapabilities", "GetProfiles", "GetStreamUri", "GetSnapshotUri"} <= set(
        camera.calls)
    # ffmpeg reads the resolved source with its options: a real decoded frame
    out = tmp_path / "frame.png"
    args = ["ffmpeg", "-hide_banner", "-loglevel", "error"]
    for k, v in src.options.items():
        args += [f"-{k}", str(v)]
    args += ["-i", src.url, "-frames:v", "1", "-y", str(out)]
    proc = await trio.run_process(args, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-500:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the camera's own snapshot URI: credentials in the URL (basic), or digest
    async with httpx.AsyncClient() as client:
        resp = await client.get(src.snapshot_url or "")
        assert resp.status_code == 200 and resp.content[:2] == b"\xff\xd8"
        resp = await client.get(f"http://127.0.0.1:{camera.port}/snapshot.jpg",
                                auth=httpx.DigestAuth("admin", "secret"))
        assert resp.status_code == 200 and resp.content[:2] == b"\xff\xd8"


async def test_profile_by_name_and_unknown_profile(camera: FakeOnvifCamera) -> None:
    secrets = _Secrets(**{"cams/gate": "secret"})
    sub = await sources.resolve_source(_device(camera, profile="subStream"), "onvif", secrets)
    assert sub.display.endswith("/cam_sub")
    with pytest.raises(OnvifError, match="no profile 'nope'") as err:
        await sources.resolve_source(_device(camera, profile="nope"), "onvif", secrets)
    assert err.value.hint == "profiles: main, sub"


async def test_wrong_password_is_a_clear_auth_error(camera: FakeOnvifCamera) -> None:
    with pytest.raises(OnvifAuthError) as err:
        await sources.resolve_source(_device(camera, port=camera.port), "onvif",
                                     _Secrets(**{"cams/gate": "wrong"}))
    assert "127.0.0.1" in str(err.value) and err.value.hint
    assert camera.auth_failures >= 1
    assert "wrong" not in str(err.value)


async def test_unreachable_camera_is_temporary() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    doc = {"metadata": {"name": "gone"}, "spec": {"binding": {"onvif": {
        "host": "127.0.0.1", "port": port, "username": "u", "password": "p"}}}}
    with pytest.raises(BindingConnectError) as err:
        await sources.resolve_source(doc, "onvif", _Secrets())
    assert err.value.temporary


async def test_ptz_move_stop_presets(camera: FakeOnvifCamera) -> None:
    secrets = _Secrets(**{"cams/gate": "secret"})
    device = _device(camera)
    await sources.resolve_source(device, "onvif", secrets)
    got = await sources.ptz(device, "onvif", "move", {"pan": 0.5, "tilt": -0.25, "zoom": 0})
    assert got == {"action": "move", "pan": 0.5, "tilt": -0.25, "zoom": 0.0}
    assert await sources.ptz(device, "onvif", "stop", {}) == {"action": "stop"}
    made = await sources.ptz(device, "onvif", "set_preset", {"name": "door"})
    assert made == {"action": "set_preset", "preset": "2"}
    assert await sources.ptz(device, "onvif", "goto_preset", {"preset": "2"}) == {
        "action": "goto_preset", "preset": "2"}
    listed = await sources.ptz(device, "onvif", "presets", {})
    assert listed["presets"] == [{"token": "1", "name": "home"}, {"token": "2", "name": "door"}]
    assert [op for op, _ in camera.ptz] == ["ContinuousMove", "Stop", "SetPreset", "GotoPreset"]
    assert camera.ptz[0][1] == {"profile": "main", "x": "0.5", "y": "-0.25", "zoom": "0.0",
                                "timeout": ""}
    with pytest.raises(CommandError, match=r"in -1\.\.1"):
        await sources.ptz(device, "onvif", "move", {"pan": 3})
    with pytest.raises(CommandError, match="unknown action"):
        await sources.ptz(device, "onvif", "spin", {})
    with pytest.raises(OnvifError, match="GotoPreset"):
        await sources.ptz(device, "onvif", "goto_preset", {"preset": "99"})


async def test_pullpoint_events(camera: FakeOnvifCamera) -> None:
    from twin.video.onvif import OnvifCamera, in_thread

    cam = OnvifCamera("127.0.0.1", camera.port, "admin", "secret")
    pullpoint = await in_thread(cam.create_pullpoint)
    camera.push_event("tns1:RuleEngine/CellMotionDetector/Motion", {"IsMotion": "true"})
    msgs = await in_thread(cam.pull_messages, pullpoint, 1.0)
    assert msgs and msgs[0]["topic"] == "tns1:RuleEngine/CellMotionDetector/Motion"
    assert msgs[0]["data"] == {"IsMotion": "true"}
    assert msgs[0]["source"] == {"VideoSourceConfigurationToken": "vsc0"}


def test_cli_discover_writes_valid_device_yaml(camera: FakeOnvifCamera, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    out = site / "cameras.yaml"
    env = {**os.environ, "TWIN_SECRET_CAMS_GATE": "secret", "PYTHONPATH": str(HERE.parents[1])}
    cli = [sys.executable, "-m", "twin.cli"]
    proc = subprocess.run(
        [*cli, "discover", "onvif", "--target", f"127.0.0.1:{camera.discovery_port}",
         "--timeout", "1", "--username", "admin", "--password-secret", "cams/gate",
         "--out", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (doc,) = list(yaml.safe_load_all(out.read_text()))
    assert doc["metadata"]["name"] == "gate_cam"
    assert doc["metadata"]["labels"]["manufacturer"] == "FLUX"
    assert doc["metadata"]["labels"]["ptz"] == "yes"
    assert doc["spec"]["binding"] == {"onvif": {
        "host": "127.0.0.1", "port": camera.port, "username": "admin",
        "password": {"secret": "cams/gate"}, "profile": "main"}}
    assert "secret\n" not in out.read_text().replace("secret: cams/gate", "")
    proc = subprocess.run([*cli, "validate", str(site)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # nobody answers: one readable line and a hint, exit 1
    proc = subprocess.run([*cli, "discover", "onvif", "--target", "127.0.0.1:9",
                           "--timeout", "0.3"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "no ONVIF camera answered" in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_ws_security_in_the_camera_clock(rtsp_url: str) -> None:
    """A camera whose clock is 2 h ahead refuses tokens stamped in ours: the client asks its
    time first (GetSystemDateAndTime) and stamps in the camera's clock."""
    with FakeOnvifCamera(auth="wsse", stream_uri=rtsp_url, clock_offset=7200.0) as cam:
        src = await sources.resolve_source(_device(cam), "onvif",
                                           _Secrets(**{"cams/gate": "secret"}))
        assert src.display == rtsp_url
        assert cam.calls[0] == "GetSystemDateAndTime" and cam.auth_failures == 0

