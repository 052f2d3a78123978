"""On-demand snapshots of a camera whose stream is off (twin/video/snapshots.py): the warm
snapshot session against a real RTSP camera (GStreamer's RTSP server), the camera's own snapshot
URL with Digest auth (the fake ONVIF camera's HTTP server), and a camera that refuses."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.runtime.helpers import eventually
from twin.video import snapshots
from twin.video.pipeline import CameraPipeline, PipelineError, VideoOptions
from twin.video.sources import StreamSource

from .helpers import free_port
from .onvif_camera import FakeOnvifCamera

HERE = Path(__file__).parent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
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


def _pipeline(tmp_path: Path, url: str, warm: str, snapshot_url: str | None = None
              ) -> CameraPipeline:
    src = StreamSource(url, {"rtsp_transport": "tcp"}, snapshot_url=snapshot_url)
    opts = VideoOptions.parse({"snapshot": {"warm": warm}, "stall_timeout": "4s"})
    return CameraPipeline("c1", src, opts, tmp_path, streaming=False)


async def _supervised(p: CameraPipeline) -> None:
    """Run the pipeline, restarted after a failure as the engine's supervisor does."""
    while True:
        with contextlib.suppress(PipelineError):
            await p.run()
        await trio.sleep(0.25)


async def test_stream_off_a_warm_session_answers_then_ends(tmp_path: Path, rtsp_url: str) -> None:
    p = _pipeline(tmp_path, rtsp_url, "3s")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_supervised, p)
        first = await snapshots.take(p, 10)
        assert first.source == "session" and first.image[:2] == b"\xff\xd8"
        # a keyframe-only ffmpeg: no FLV, HLS or spool output while the stream is off
        assert p.process is not None and p._mode == "snapshot"
        assert "flv" not in p.argv and not any("spool" in a or "hls" in a for a in p.argv)
        assert p.health.state == "stopped" and p.health.restarts == 0
        # the session stays: the next request is the newest keyframe of the same ffmpeg
        pid = p.process.pid
        second = await snapshots.take(p, 10)
        assert second.source == "session" and second.ts >= first.ts
        assert p.process is not None and p.process.pid == pid
        # nobody asks for `warm` seconds: the session ends, no ffmpeg is left
        await eventually(lambda: p.process is None, within=30)
        assert p.health.state == "stopped"
        # the stream turned on takes over from there
        p.set_streaming(True)
        await eventually(lambda: p.health.state == "live", within=30)
        live = await snapshots.take(p, 10)
        assert live.source == "rolling"
        nursery.cancel_scope.cancel()


async def test_warm_zero_grabs_once_and_a_refusing_camera_fails_clearly(
        tmp_path: Path, rtsp_url: str) -> None:
    p = _pipeline(tmp_path, rtsp_url, "0s")
    shot = await snapshots.take(p, 10)  # no run(): a one-shot ffmpeg
    assert shot.source == "source" and shot.image[:2] == b"\xff\xd8"

    refused = _pipeline(tmp_path / "r", f"rtsp://127.0.0.1:{free_port()}/cam", "60s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(refused.run)
        with pytest.raises(PipelineError, match="Connection refused"):
            await snapshots.take(refused, 10)
        assert refused.process is None  # not retried until someone asks again
        assert refused.health.state == "stopped" and refused.health.last_error is None
        nursery.cancel_scope.cancel()


async def test_the_cameras_snapshot_url_comes_first(tmp_path: Path, rtsp_url: str) -> None:
    jpeg = b"\xff\xd8" + b"\x01" * 64 + b"\xff\xd9"
    with FakeOnvifCamera(auth="digest", stream_uri=rtsp_url, snapshot=jpeg) as cam:
        url = f"http://admin:secret@127.0.0.1:{cam.port}/snapshot.jpg"
        p = _pipeline(tmp_path, rtsp_url, "60s", snapshot_url=url)
        shot = await snapshots.take(p, 10)
        assert shot.source == "camera" and shot.image == jpeg and p.process is None
        # wrong credentials: the snapshot URL answers 401, the warm session answers instead
        bad = _pipeline(tmp_path / "b", rtsp_url, "60s",
                        snapshot_url=url.replace(":secret@", ":wrong@"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bad.run)
            with contextlib.suppress(PipelineError):
                shot = await snapshots.take(bad, 10)
            assert shot.source == "session"
            nursery.cancel_scope.cancel()


async def test_warm_always_keeps_a_copy_only_session_and_decodes_when_asked(
        tmp_path: Path, rtsp_url: str) -> None:
    p = _pipeline(tmp_path, rtsp_url, "always")
    assert p.opts.snapshot_warm == float("inf")
    keyframe = tmp_path / "snapshots" / "keyframe.bin"
    failures: list[str] = []

    async def supervised() -> None:
        while True:
            try:
                await p.run()
            except PipelineError as exc:
                failures.append(str(exc))
            await trio.sleep(0.25)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervised)
        # nobody asked: the session starts by itself, copies keyframes, decodes nothing
        await eventually(lambda: keyframe.exists(), within=30)
        assert p.process is not None and p._mode == "snapshot"
        assert "copy" in p.argv and "mjpeg" not in p.argv and "flv" not in p.argv
        assert any("drop=not(key)" in a for a in p.argv)
        assert not any("spool" in a or "hls" in a for a in p.argv)
        assert p.snapshot is None
        raw = keyframe.read_bytes()
        assert raw.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))  # H.264 Annex B
        first = await snapshots.take(p, 10)
        assert first.source == "session" and first.image[:2] == b"\xff\xd8"
        assert first.image.endswith(b"\xff\xd9")
        # the same keyframe asked again: the JPEG decoded before, not a second decode
        if keyframe.stat().st_mtime == first.ts:
            again = await snapshots.take(p, 10)
            assert again.image is first.image
        # the session never expires: still the same ffmpeg after a quiet spell
        pid = p.process.pid
        await trio.sleep(2)
        assert p.process is not None and p.process.pid == pid
        later = await snapshots.take(p, 10)
        assert later.ts > first.ts  # a newer keyframe (GOP 1 s)
        # the stream turned on takes over; turned off again, the session comes back
        p.set_streaming(True)
        await eventually(lambda: p.health.state == "live", within=30)
        assert (await snapshots.take(p, 10)).source == "rolling"
        p.set_streaming(False)
        await eventually(lambda: p._mode == "snapshot", within=30)
        assert (await snapshots.take(p, 10)).source == "session"
        assert failures == []
        nursery.cancel_scope.cancel()


async def test_warm_always_on_a_refusing_camera_fails_clearly_and_retries(tmp_path: Path) -> None:
    p = _pipeline(tmp_path, f"rtsp://127.0.0.1:{free_port()}/cam", "always")
    # the supervisor's part: an always-on session that fails raises (restarted with backoff)
    with pytest.raises(PipelineError, match=r"snapshot session: .*Connection refused"):
        await p.run()
    runs = p.session.runs

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_supervised, p)
        with pytest.raises(PipelineError, match="Connection refused"):
            await snapshots.take(p, 10)
        await eventually(lambda: p.session.runs > runs + 1, within=30)  # tried again
        nursery.cancel_scope.cancel()


def test_warm_defaults_to_always_unless_snapshots_are_off() -> None:
    inf = float("inf")
    assert VideoOptions.parse({}).snapshot_warm == inf
    assert VideoOptions.parse({"snapshot": {"enabled": True}}).snapshot_warm == inf
    # snapshots off: no copy-only session reading the camera for them while the stream is off
    assert VideoOptions.parse({"snapshot": False}).snapshot_warm == 60.0
    assert VideoOptions.parse({"snapshot": {"enabled": False}}).snapshot_warm == 60.0
    # what the YAML says wins either way
    assert VideoOptions.parse({"snapshot": {"enabled": False, "warm": "always"}}).snapshot_warm == inf
    assert VideoOptions.parse({"snapshot": {"warm": "0"}}).snapshot_warm == 0.0
    assert VideoOptions.parse({"snapshot": {"warm": "90s"}}).snapshot_warm == 90.0
