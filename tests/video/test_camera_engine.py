"""Cameras in a running engine (real time, real ffmpeg): live outputs, health telemetry,
commands through the ledger, and a dark camera that never hurts the others."""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tests.runtime.helpers import apply, eventually, fast_config, running_engine, site
from twin.control.service import ControlService
from twin.registry.base import Registry
from twin.runtime.state import Status

from .helpers import camera, camera_model, free_port, sim_camera


def alarms(registry: Registry, device: str) -> list[Any]:
    return [a for a in registry.alarms(device=device, states=["active"])]


async def test_sim_camera_is_live_and_a_refused_camera_is_dark(
    registry: Registry, tmp_path: Path
) -> None:
    refused = free_port()  # nothing listens there
    # a real HLS peer: cam_ok's own HLS output over plain HTTP, pulled by an `hls` camera
    hls_dir = tmp_path / "state" / "video" / "cam_ok" / "hls"
    hls_dir.mkdir(parents=True)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(hls_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hls_url = f"http://127.0.0.1:{httpd.server_address[1]}/index.m3u8"
    apply(registry, site(), camera_model(), sim_camera("cam_ok"),
          camera("cam_refused", {"rtsp": {"url": f"rtsp://127.0.0.1:{refused}/live",
                                          "stall_timeout": "4s", "health_interval": "0.5s"}}),
          camera("cam_hls", {"hls": {"url": hls_url, "stall_timeout": "6s",
                                     "health_interval": "0.5s"}}))
    try:
        await _run(registry, tmp_path)
    finally:
        httpd.shutdown()
        httpd.server_close()


async def _run(registry: Registry, tmp_path: Path) -> None:
    control = ControlService(reconcile_interval=0.5)
    config = fast_config(state_dir=tmp_path / "state")
    async with running_engine(registry, config, services=[control]) as engine:
        ok = engine.twin("cam_ok")
        bad = engine.twin("cam_refused")
        assert ok is not None and bad is not None
        # the refused camera: a fault naming the cause, an alarm; the other camera is live
        await eventually(lambda: bad.status == Status.FAULT, within=30)
        assert bad.fault is not None and "Connection refused" in bad.fault, bad.fault
        await eventually(lambda: ok.status == Status.ONLINE
                         and (ok.reported.get("fps") is not None
                              and ok.reported["fps"].value > 0), within=30)
        pipeline = engine.video.get("cam_ok")
        assert pipeline is not None
        await eventually(lambda: pipeline.snapshot is not None and pipeline.hub.ready, within=20)
        assert pipeline.snapshot is not None and pipeline.snapshot[:2] == b"\xff\xd8"
        hls = engine.video.camera_dir("cam_ok") / "hls" / "index.m3u8"
        await eventually(hls.exists, within=20)
        assert "#EXTINF" in hls.read_text()

        # commands through the ledger: snapshot (result: the image reference), recording, ptz
        cmd = await control.ledger.submit("cam_ok", "take_snapshot", {})
        done = await control.ledger.wait(cmd.id)
        assert str(done.status) == "success", done.error
        image = engine.video.camera_dir("cam_ok") / done.result["image"]
        assert image.read_bytes()[:2] == b"\xff\xd8"
        assert done.result["url"].endswith(done.result["image"].split("/")[-1])

        cmd = await control.ledger.submit("cam_ok", "ptz", {"action": "move", "pan": 10})
        done = await control.ledger.wait(cmd.id)
        assert str(done.status) == "success" and done.result["pan"] == 10

        cmd = await control.ledger.submit("cam_refused", "ptz", {"action": "stop"})
        done = await control.ledger.wait(cmd.id)
        assert str(done.status) == "failed" and "camera has no PTZ" in (done.error or "")

        cmd = await control.ledger.submit("cam_ok", "start_recording", {})
        assert str((await control.ledger.wait(cmd.id)).status) == "success"
        rec = engine.video.camera_dir("cam_ok") / "rec"
        await eventually(lambda: any(s.stat().st_size > 20_000 for s in rec.glob("*.ts")),
                         within=20)
        # a crash mid-segment (SIGKILL): the MPEG-TS segment written so far is readable
        pipeline.kill()
        segment = max(rec.glob("*.ts"))
        probe = await trio.run_process(
            ["ffprobe", "-v", "error", "-count_packets", "-show_entries", "stream=nb_read_packets",
             "-of", "csv=p=0", str(segment)], capture_stdout=True, check=False)
        assert probe.returncode == 0 and int(probe.stdout.split()[0]) > 0, probe
        await eventually(lambda: pipeline.health.restarts >= 1
                         and pipeline.health.state == "live", within=30)
        # the HLS camera pulls cam_ok's playlist like any HLS source
        hls_cam = engine.twin("cam_hls")
        assert hls_cam is not None
        await eventually(lambda: hls_cam.status == Status.ONLINE
                         and engine.video.get("cam_hls") is not None
                         and engine.video.get("cam_hls").health.state == "live",  # type: ignore[union-attr]
                         within=60)

        cmd = await control.ledger.submit("cam_ok", "stop_stream", {})
        assert str((await control.ledger.wait(cmd.id)).status) == "success"
        await eventually(lambda: pipeline.health.state == "stopped", within=10)
        await eventually(lambda: ok.reported["streaming"].value is False, within=10)
        assert ok.status == Status.ONLINE  # stopped on purpose: not dark
        await engine.writer.flushed()
    assert any(a.type == "fault" and "Connection refused" in a.message
               for a in alarms(registry, "cam_refused"))
    assert not alarms(registry, "cam_ok")
    await trio.lowlevel.checkpoint()


async def test_commanded_recording_and_stopped_stream_outlive_an_engine_restart(
    registry: Registry, tmp_path: Path
) -> None:
    """start_recording / stop_stream through the ledger, the engine stops, a new engine on the
    same registry and state dir: the recording goes on (new segments are kept) and the stopped
    stream stays stopped, though the YAML says neither."""
    apply(registry, site(), camera_model(), sim_camera("cam_rec"), sim_camera("cam_off"))
    config = fast_config(state_dir=tmp_path / "state")
    control = ControlService(reconcile_interval=0.5)
    async with running_engine(registry, config, services=[control]) as engine:
        await eventually(lambda: all(
            (p := engine.video.get(c)) is not None and p.health.state == "live"
            for c in ("cam_rec", "cam_off")), within=30)
        for device, name in (("cam_rec", "start_recording"), ("cam_off", "stop_stream")):
            cmd = await control.ledger.submit(device, name, {})
            done = await control.ledger.wait(cmd.id)
            assert str(done.status) == "success", done.error
        await control.ledger.flushed()
    rec = engine.video.camera_dir("cam_rec") / "rec"
    before = {s.name for s in rec.glob("*.ts")}
    assert before  # the segment being written was linked by the command

    control = ControlService(reconcile_interval=0.5)
    async with running_engine(registry, config, services=[control]) as engine:
        await eventually(lambda: (p := engine.video.get("cam_rec")) is not None
                         and p.health.state == "live", within=30)
        cam_rec, cam_off = engine.video.get("cam_rec"), engine.video.get("cam_off")
        assert cam_rec is not None and cam_off is not None
        assert cam_rec.recording and not cam_rec.opts.record  # the command, not the YAML
        # this engine's ffmpeg writes new spool segments, and they are kept in rec/
        await eventually(lambda: {s.name for s in rec.glob("*.ts")} - before != set(),
                         within=30)
        assert not cam_off.streaming
        await eventually(lambda: cam_off.health.state == "stopped", within=10)
        twin = engine.twin("cam_rec")
        assert twin is not None
        await eventually(lambda: twin.reported.get("recording") is not None
                         and twin.reported["recording"].value is True, within=10)
        # stop_recording after the restart is the newest command: it wins from now on
        cmd = await control.ledger.submit("cam_rec", "stop_recording", {})
        assert str((await control.ledger.wait(cmd.id)).status) == "success"
        assert not cam_rec.recording
