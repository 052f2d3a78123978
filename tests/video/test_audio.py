"""A camera with audio: the audio stream is copied into HTTP-FLV, HLS and the recordings (a real
ffmpeg testsrc + sine pusher over UDP MPEG-TS); an audio codec FLV cannot carry (Opus) leaves
HTTP-FLV without audio while HLS and the recordings keep it — the camera never goes dark."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from tests.runtime.helpers import eventually
from twin.video.flvhub import TAG_AUDIO
from twin.video.pipeline import CameraPipeline, PipelineError, VideoOptions, build_command
from twin.video.recordings import segments
from twin.video.sources import StreamSource

from .helpers import free_port, stop

pytestmark = pytest.mark.integration


def _pusher(port: int, codec: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
         "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=10",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
         "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
         "-g", "10", "-b:v", "200k", *codec, "-f", "mpegts",
         f"udp://127.0.0.1:{port}?pkt_size=1316"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _streams(path: Path) -> list[str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,codec_name",
                          "-of", "json", str(path)], capture_output=True, check=False).stdout
    return sorted(f"{s['codec_type']}:{s['codec_name']}"
                  for s in json.loads(out or b"{}").get("streams", []))


def test_audio_is_mapped_optionally_and_can_be_turned_off() -> None:
    src = StreamSource("rtsp://127.0.0.1/x")
    argv = build_command(src, VideoOptions(), Path("/d"), jpeg_fd=5)
    assert argv.count("0:a:0?") == 3  # FLV, HLS, spool; never the JPEG output
    argv = build_command(src, VideoOptions(), Path("/d"), jpeg_fd=5, flv_with_audio=False)
    assert argv.count("0:a:0?") == 2
    assert "0:a:0?" not in build_command(src, VideoOptions(audio=False), Path("/d"), jpeg_fd=5)


@pytest.mark.parametrize(("codec", "flv_audio"), [
    (["-c:a", "aac", "-b:a", "64k", "-ar", "44100"], True),
    (["-c:a", "libopus", "-b:a", "32k"], False),  # FLV cannot carry Opus
])
async def test_camera_audio_reaches_flv_hls_and_recordings(
        tmp_path: Path, codec: list[str], flv_audio: bool) -> None:
    port = free_port(socket.SOCK_DGRAM)
    src = StreamSource(f"udp://127.0.0.1:{port}?overrun_nonfatal=1&fifo_size=50000",
                       {"analyzeduration": "1000000", "probesize": "1000000"}, listener=True)
    opts = VideoOptions.parse({"record": {"segment": "2s"}})
    p = CameraPipeline("a1", src, opts, tmp_path)
    pusher = _pusher(port, codec)

    async def supervised() -> None:  # the engine's supervisor restarts it the same way (a
        while True:                  # start mid-stream may fail: "dimensions not set")
            with contextlib.suppress(PipelineError):
                await p.run()
            await trio.sleep(0.25)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervised)
            p.set_recording(True)
            hls = tmp_path / "hls"
            await eventually(lambda: p.hub.ready and len(segments(tmp_path / "rec")) >= 2
                             and len(list(hls.glob("*.ts"))) >= 2, within=60)
            # FLV refusing the audio costs a restart (without it), never a dark camera
            assert p.health.state == "live"
            assert p.flv_audio is flv_audio
            assert (TAG_AUDIO in p.hub.seq or any(t.type == TAG_AUDIO for t in p.hub.gop)) \
                is flv_audio
            audio = "audio:aac" if flv_audio else "audio:opus"
            assert _streams(sorted(hls.glob("*.ts"))[0]) == [audio, "video:h264"]
            assert _streams(segments(tmp_path / "rec")[0].path) == [audio, "video:h264"]
            nursery.cancel_scope.cancel()
    finally:
        stop(pusher)
