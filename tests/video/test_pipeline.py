"""The camera's ffmpeg command line (ffmpeg-python) and a real run with a sub-stream."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import trio

from twin.video.pipeline import CameraPipeline, VideoOptions, build_command, explain, run_pusher
from twin.video.sources import StreamSource, resolve_source

from .helpers import free_port


def test_copy_by_default_four_outputs() -> None:
    src = StreamSource("rtsp://u:pw@127.0.0.1/x", {"rtsp_transport": "tcp"})
    argv = build_command(src, VideoOptions(segment=30), Path("/d"), jpeg_fd=5, progress_fd=6)
    # FLV + HLS + spool copy, JPEG mjpeg
    vcodecs = [argv[i + 1] for i, a in enumerate(argv) if a == "-c:v"]
    assert sorted(vcodecs) == ["copy", "copy", "copy", "mjpeg"]
    assert "libx264" not in argv and "-skip_frame" in argv
    assert argv[argv.index("-progress"):argv.index("-progress") + 2] == ["-progress", "pipe:6"]
    assert "pipe:1" in argv and "pipe:5" in argv and "/d/hls/index.m3u8" in argv
    # the spool is always written (recording keeps its segments): never straight into rec/
    assert "/d/spool/%Y%m%dT%H%M%SZ.ts" in argv and "mpegts" in argv and "30" in argv
    assert not any("rec/" in a for a in argv)


def test_transcode_and_substream_encode_h264() -> None:
    src = StreamSource("udp://127.0.0.1:1")
    opts = VideoOptions.parse({"transcode": {"bitrate": "800k", "scale": "640x360"},
                               "substream": {"scale": "320", "bitrate": "200k"}})
    argv = build_command(src, opts, Path("/d"), jpeg_fd=5)
    assert argv.count("libx264") == 3  # FLV + HLS (transcoded main) + the sub-stream
    vcodecs = [argv[i + 1] for i, a in enumerate(argv) if a == "-c:v"]
    assert vcodecs.count("copy") == 1  # the spool keeps the camera's own stream
    assert "-skip_frame" not in argv  # every frame is decoded anyway
    graph = argv[argv.index("-filter_complex") + 1]
    assert "scale=640:360" in graph and "scale=320:-2" in graph and "split=2" in graph
    assert "/d/hls-sub/index.m3u8" in argv


def test_explain_redacts_and_skips_decoder_chatter() -> None:
    src = StreamSource("rtsp://admin:s3cret@10.0.0.1/x")
    lines = ["[h264 @ 0x55d1] non-existing PPS 0 referenced",
             "rtsp://admin:s3cret@10.0.0.1/x: Server returned 401 Unauthorized",
             "[h264 @ 0x55d1] decode_slice_header error"]
    text = explain(lines, src)
    assert "401 Unauthorized" in text and "s3cret" not in text


async def test_substream_rendition_is_written(tmp_path: Path) -> None:
    doc = {"metadata": {"name": "c1"}, "spec": {"binding": {"sim": {"video": {
        "port": free_port(socket.SOCK_DGRAM), "size": "320x180", "fps": 10}}}}}
    src = await resolve_source(doc, "sim", {})  # type: ignore[arg-type]
    opts = VideoOptions.parse({"substream": {"scale": "160", "bitrate": "100k"}})
    pipeline = CameraPipeline("c1", src, opts, tmp_path)
    sub = tmp_path / "hls-sub" / "index.m3u8"

    async def pusher() -> None:
        with contextlib.suppress(Exception):  # it ends when cancelled; a crash shows below
            await run_pusher("c1", src.pusher)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher)
            nursery.start_soon(pipeline.run)
            while not (sub.exists() and "#EXTINF" in sub.read_text()):  # noqa: ASYNC110
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert pipeline.snapshot is not None  # one rendition more, the rest as before


async def test_snapshot_url_of_the_camera(tmp_path: Path) -> None:
    import http.server
    import threading
    from functools import partial

    from twin.video.snapshots import fetch_jpeg

    (tmp_path / "snap.jpg").write_bytes(b"\xff\xd8" + b"\0" * 100 + b"\xff\xd9")
    (tmp_path / "page.html").write_text("<html>not a picture</html>")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        got = await fetch_jpeg(f"{base}/snap.jpg", 5)
        assert got is not None and got.startswith(b"\xff\xd8")
        assert await fetch_jpeg(f"{base}/page.html", 5) is None
        assert await fetch_jpeg(f"{base}/missing.jpg", 5) is None
        assert await fetch_jpeg(f"http://127.0.0.1:{free_port()}/x.jpg", 5) is None
    finally:
        httpd.shutdown()
        httpd.server_close()
