"""Camera specs and real peers (ffmpeg pushers) for the video tests."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

from tests.runtime.helpers import model


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def camera_model() -> dict[str, Any]:
    return model(
        "cam-model",
        properties={"streaming": {"type": "boolean", "access": "readwrite"},
                    "recording": {"type": "boolean", "access": "readwrite"}},
        telemetry={"fps": {"type": "number"}, "bitrate": {"type": "number"}},
        commands={
            "start_stream": {}, "stop_stream": {}, "take_snapshot": {},
            "start_recording": {}, "stop_recording": {},
            "ptz": {"params": {"type": "object"}},
        },
    )


def camera(name: str, binding: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "camera", "model": "cam-model", "binding": binding,
                            "heartbeat": {"interval": "2s", "timeout": "20s"}}
    body.update(spec)
    return {"apiVersion": "flux.iot/v1", "kind": "Device",
            "metadata": {"name": name, "site": "plant-a"}, "spec": body}


def sim_camera(name: str, **video: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"video": {"port": free_port(socket.SOCK_DGRAM), "fps": 10,
                                      "size": "320x180", "bitrate": "300k"},
                            "health_interval": "0.5s", "stall_timeout": "4s"}
    opts.update(video)
    return camera(name, {"sim": opts})


def start_pusher(url: str, fmt: str, *, fps: int = 10, bitrate: str = "300k",
                   duration: float | None = None) -> subprocess.Popen[bytes]:
    """A real peer: ffmpeg encoding testsrc and pushing it (RTMP: fmt flv; SRT/UDP: mpegts)."""
    argv = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
            "-f", "lavfi", "-i", f"testsrc2=size=320x180:rate={fps}"]
    if duration is not None:
        argv += ["-t", str(duration)]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
             "-pix_fmt", "yuv420p", "-g", str(fps), "-b:v", bitrate, "-f", fmt, url]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
