"""Edge AI: camera frames → motion gate → ONNX inference → readings scenes can trigger on.

::

    ffmpeg (one process per camera: -vf fps=F,scale=W:H -f rawvideo -pix_fmt rgb24 pipe:1)
      │  W·H·3 bytes per frame
      ▼
    MotionGate   grey (integer mean of R, G, B) of every 2nd pixel; |frame - previous| > pixel on
      │          at least ``area`` of them → motion (cheap: numpy, ~0.1 ms at 320x180)
      ▼ frames with motion only
    Detector     onnxruntime (one intra-op thread), the frame resized to the model's input
      │          (nearest), scaled, NCHW/NHWC; output: one score per label
      ▼
    readings of the camera device: motion (bool), detection (label), detection_score;
    through the time-series service's log (and the edge's outbox), then the bus: scenes
    trigger on them (``device_data`` on ``detection``) with the uplink up or down.

ffmpeg is a subprocess started by :func:`frames` (``input`` is a URL or file, or
``lavfi:<filter>`` such as ``lavfi:testsrc2`` for a test pattern); it is restarted with backoff
by the service when it ends.
"""

from __future__ import annotations

import logging
import math
import shlex
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from twin.bindings.base import Quality, Reading

if TYPE_CHECKING:
    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)


def ffmpeg_args(source: str, width: int, height: int, fps: float) -> list[str]:
    if source.startswith("lavfi:"):
        spec = source[6:]
        sep = ":" if "=" in spec else "="
        inp = ["-f", "lavfi", "-i", f"{spec}{sep}size={width}x{height}:rate={fps}"]
    else:
        inp = (["-rtsp_transport", "tcp"] if source.startswith("rtsp") else []) + ["-i", source]
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *inp,
            "-vf", f"fps={fps},scale={width}:{height}", "-f", "rawvideo", "-pix_fmt", "rgb24",
            "pipe:1"]  # fmt: skip


async def frames(source: str, width: int, height: int, fps: float,
                 limit: int | None = None) -> AsyncIterator[np.ndarray]:
    """Decoded frames (HxWx3 uint8) from ffmpeg's rawvideo pipe; ends with the stream."""
    size = width * height * 3
    args = ffmpeg_args(source, width, height, fps)
    log.debug("vision: %s", shlex.join(args))
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE,
                                            stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdout is not None
    n = 0
    try:
        buf = bytearray()
        while limit is None or n < limit:
            while len(buf) < size:
                chunk = await proc.stdout.receive_some(size - len(buf))
                if not chunk:
                    return
                buf += chunk
            frame = np.frombuffer(bytes(buf[:size]), dtype=np.uint8).reshape(height, width, 3)
            del buf[:size]
            n += 1
            yield frame
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()


@dataclass
class MotionGate:
    """Frame difference on a grey, half-resolution copy. ``check`` is True when at least
    ``area`` of the pixels changed by more than ``pixel`` grey levels (the first frame: True)."""

    pixel: int = 25
    area: float = 0.01
    step: int = 2
    passed: int = 0
    seen: int = 0
    _prev: np.ndarray | None = field(default=None, repr=False)

    def check(self, frame: np.ndarray) -> bool:
        small = frame[:: self.step, :: self.step]
        grey = small.sum(axis=2, dtype=np.uint16) // 3  # integer mean of R, G, B
        prev, self._prev = self._prev, grey
        self.seen += 1
        if prev is None:
            self.passed += 1
            return True
        diff = np.abs(grey.astype(np.int16) - prev.astype(np.int16))
        changed = np.count_nonzero(diff > self.pixel)
        moved = changed >= self.area * grey.size
        if moved:
            self.passed += 1
        return bool(moved)


class Detector:
    """One ONNX model (``kind: Model``) on onnxruntime's CPU provider, one thread."""

    def __init__(self, path: str | Path, spec: Mapping[str, Any]) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = spec.get("input") or {}
        self.input_name = inp.get("name") or self.session.get_inputs()[0].name
        self.shape = [int(x) for x in inp["shape"]]
        self.layout = inp.get("layout", "NCHW")
        self.scale = float(inp.get("scale", 1 / 255))
        self.labels = [str(x) for x in spec["labels"]]
        self.threshold = float(spec.get("threshold", 0.5))
        h, w = (self.shape[2], self.shape[3]) if self.layout == "NCHW" else (self.shape[1], self.shape[2])
        self.h, self.w = h, w
        self.runs = 0

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        fh, fw = frame.shape[:2]
        rows = (np.arange(self.h) * fh // self.h).astype(np.intp)
        cols = (np.arange(self.w) * fw // self.w).astype(np.intp)
        x = frame[rows][:, cols].astype(np.float32) * self.scale  # nearest-neighbour resize
        x = x.transpose(2, 0, 1) if self.layout == "NCHW" else x
        return x[np.newaxis]

    def scores(self, frame: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: self.prepare(frame)})[0]
        self.runs += 1
        return np.asarray(out, dtype=np.float64).reshape(-1)[: len(self.labels)]

    def detect(self, frame: np.ndarray) -> tuple[str, float] | None:
        s = self.scores(frame)
        i = int(np.argmax(s))
        score = float(s[i])
        if not math.isfinite(score) or score < self.threshold:
            return None
        return self.labels[i], score


@dataclass
class CameraPipeline:
    """One camera of ``EdgeNode.spec.vision``: frames → gate → detector → readings."""

    camera: str
    source: str
    detector: Detector
    gate: MotionGate
    width: int = 320
    height: int = 180
    fps: float = 5.0
    frames: int = 0
    detections: int = 0

    async def run(self, engine: Engine, limit: int | None = None) -> None:
        from twin.runtime.timeseries_service import timeseries_of

        last_label: str | None = None
        async for frame in frames(self.source, self.width, self.height, self.fps, limit):
            self.frames += 1
            now = time.time()
            if not self.gate.check(frame):
                continue
            found = await trio.to_thread.run_sync(self.detector.detect, frame)
            readings = [Reading(self.camera, "motion", True, now)]
            if found is not None:
                self.detections += 1
                label, score = found
                readings += [Reading(self.camera, "detection", label, now, Quality.GOOD),
                             Reading(self.camera, "detection_score", round(score, 4), now)]  # fmt: skip
                if label != last_label:
                    log.info("vision: %s: %s (%.2f)", self.camera, label, score)
                last_label = label
            svc = timeseries_of(engine)
            if svc is not None:
                await svc.log_readings(readings)  # stored (and in the edge's outbox) first
            twin = engine.twin(self.camera)
            for r in readings:
                engine.bus.publish({"kind": "reading", "device": r.device,
                                    "site": twin.site if twin else None,
                                    "groups": twin.groups if twin else (), "ts": r.ts,
                                    "point": r.point, "value": r.value, "quality": str(r.quality),
                                    "logged": svc is not None})  # fmt: skip


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


__all__ = ["CameraPipeline", "Detector", "MotionGate", "ffmpeg_args", "frames", "parse_size"]
