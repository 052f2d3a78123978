"""Cameras against real peers, all in one engine at once: an RTSP camera served by GStreamer's
RTSP server (Digest auth), ffmpeg testsrc pushers over RTMP and SRT into per-camera listeners,
and the bad ones — wrong credentials, a stream that stalls, a peer that sends garbage. Each bad
camera gets a fault naming the cause (and an alarm); the good cameras stay live throughout and
the engine keeps serving."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.runtime.helpers import apply, eventually, fast_config, running_engine, site
from twin.registry.base import Registry
from twin.runtime.state import Status

from .helpers import camera, camera_model, free_port, start_pusher, stop

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]
FAST = {"stall_timeout": "4s", "health_interval": "0.5s"}


@pytest.fixture
def rtsp_camera() -> Iterator[int]:
    """GStreamer's RTSP server (system python's gi) with user admin / s3cret."""
    port = free_port()
    proc = subprocess.Popen(["/usr/bin/python3", str(HERE / "rtsp_camera.py"), str(port),
                             "admin", "s3cret"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + proc.stdout.read()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def garbage_server() -> Iterator[int]:
    """A TCP peer that answers anything with random bytes (a camera gone mad)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.5)
    done = threading.Event()

    def serve() -> None:
        rng = random.Random(7)
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(bytes(rng.getrandbits(8) for _ in range(4096)))
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        done.set()
        t.join(5)
        srv.close()


async def _push_until_stopped(url: str, fmt: str, procs: list[subprocess.Popen[bytes]],
                              stop_event: trio.Event) -> None:
    """Keep a pusher running into a listener (it fails until the listener is up)."""
    while not stop_event.is_set():
        proc = start_pusher(url, fmt)
        procs.append(proc)
        while proc.poll() is None and not stop_event.is_set():  # noqa: ASYNC110 - a process
            await trio.sleep(0.2)
        await trio.sleep(0.5)


async def test_real_peers_good_and_bad_cameras(
    registry: Registry, tmp_path: Path, rtsp_camera: int, garbage_server: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWIN_SECRET_CAMS_GATE", "s3cret")
    monkeypatch.setenv("TWIN_SECRET_CAMS_WRONG", "nope")
    rtmp_port, srt_port, stall_port = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    rtsp = f"rtsp://127.0.0.1:{rtsp_camera}/live"
    apply(
        registry, site(), camera_model(),
        camera("rtsp_ok", {"rtsp": {"url": rtsp, "username": "admin",
                                    "password": {"secret": "cams/gate"}, **FAST}}),
        camera("rtsp_badauth", {"rtsp": {"url": rtsp, "username": "admin",
                                         "password": {"secret": "cams/wrong"}, **FAST}}),
        camera("rtmp_push", {"rtmp": {"listen": rtmp_port, "path": "live/cam", **FAST}}),
        camera("srt_push", {"srt": {"listen": srt_port, **FAST}}),
        camera("stalls", {"rtmp": {"listen": stall_port, "path": "live/s", **FAST}}),
        camera("garbage", {"rtsp": {"url": f"rtsp://127.0.0.1:{garbage_server}/x", **FAST}}),
    )
    procs: list[subprocess.Popen[bytes]] = []
    stop_pushing = trio.Event()
    try:
        async with (
            running_engine(registry, fast_config(state_dir=tmp_path / "s")) as engine,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_push_until_stopped,
                               f"rtmp://127.0.0.1:{rtmp_port}/live/cam", "flv", procs,
                               stop_pushing)
            nursery.start_soon(_push_until_stopped,
                               f"srt://127.0.0.1:{srt_port}?mode=caller", "mpegts", procs,
                               stop_pushing)
            staller = start_pusher(f"rtmp://127.0.0.1:{stall_port}/live/s", "flv")
            procs.append(staller)

            def twin(name: str):  # type: ignore[no-untyped-def]
                t = engine.twin(name)
                assert t is not None
                return t

            def live(name: str) -> bool:
                p = engine.video.get(name)
                return p is not None and p.health.state == "live" and \
                    twin(name).status == Status.ONLINE

            for name in ("rtsp_ok", "rtmp_push", "srt_push"):
                await eventually(lambda n=name: live(n), within=60)  # type: ignore[misc]
            for name, cause in (("rtsp_badauth", "401 Unauthorized"),
                                ("garbage", "")):
                await eventually(lambda n=name: twin(n).status == Status.FAULT, within=60)  # type: ignore[misc]
                assert "camera dark" in (twin(name).fault or "")
                assert cause in (twin(name).fault or ""), twin(name).fault
            assert "s3cret" not in str(twin("rtsp_badauth").fault)
            assert "nope" not in str(twin("rtsp_badauth").fault)
            # the staller: live first, then its pusher freezes (SIGSTOP): stalled, dark
            if staller.poll() is None:
                await eventually(lambda: live("stalls"), within=60)
                os.kill(staller.pid, signal.SIGSTOP)
                await eventually(lambda: twin("stalls").status == Status.FAULT, within=30)
                assert "stalled" in (twin("stalls").fault or ""), twin("stalls").fault
                os.kill(staller.pid, signal.SIGCONT)
            # through all of it the good cameras stayed live and the engine answers
            for name in ("rtsp_ok", "rtmp_push", "srt_push"):
                assert live(name), (name, engine.video.get(name).status())  # type: ignore[union-attr]
                await eventually(lambda n=name: twin(n).reported["fps"].value > 0,  # type: ignore[misc]
                                 within=20)
            rtsp_pipe = engine.video.get("rtsp_ok")
            assert rtsp_pipe is not None and rtsp_pipe.snapshot is not None
            stop_pushing.set()
            nursery.cancel_scope.cancel()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            stop(proc)
