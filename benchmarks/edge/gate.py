"""Edge AI throughput on one core: 320x180 frames through the motion gate, and end to end
(ffmpeg decoding testsrc2 as fast as it can → gate → onnxruntime on the frames that pass).

    python benchmarks/edge/gate.py [--frames 3000]

The model is the tiny one the tests build (tests/edge/tinymodel.py): the figure is the
pipeline's own cost (decode pipe, gate, pre-processing, one onnxruntime call), not a real
detector's. The gate itself is timed on frames already in memory; the process is pinned to
one CPU (ffmpeg, a separate process, is not)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from edge.tinymodel import SPEC, build

from twin.edge.vision import Detector, MotionGate, frames


async def end_to_end(n: int, det: Detector) -> dict[str, float]:
    gate = MotionGate()
    t0, cpu0 = time.perf_counter(), time.process_time()
    got = passed = 0
    async for f in frames("lavfi:testsrc2", 320, 180, 1000, limit=n):
        got += 1
        if gate.check(f):
            passed += 1
            det.detect(f)
    wall = time.perf_counter() - t0
    return {"frames": got, "passed": passed, "fps": got / wall,
            "cpu_percent": 100 * (time.process_time() - cpu0) / wall}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=3000)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = np.random.default_rng(1)
    base = rng.integers(0, 200, (180, 320, 3), dtype=np.uint8)
    frames_mem = []
    for i in range(64):
        f = base.copy()
        if i % 4 == 0:  # a quarter of the frames move
            f[40:100, (i * 3) % 200 : (i * 3) % 200 + 60] = 255
        frames_mem.append(f)
    gate = MotionGate()
    t0 = time.perf_counter()
    for i in range(args.frames):
        gate.check(frames_mem[i % 64])
    gate_fps = args.frames / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        det = Detector(build(Path(tmp) / "m.onnx"), SPEC)
        t0 = time.perf_counter()
        for i in range(500):
            det.detect(frames_mem[i % 64])
        infer_ms = (time.perf_counter() - t0) / 500 * 1000
        e2e = trio.run(end_to_end, args.frames, det)
    print(f"motion gate, 320x180, frames in memory: {gate_fps:,.0f} frames/s on one core "
          f"(goal >= 200); passed {gate.passed}/{gate.seen}")
    print(f"inference (tiny model, pre-processing included): {infer_ms:.3f} ms per frame")
    print(f"end to end (ffmpeg testsrc2 → gate → inference on passing frames): "
          f"{e2e['fps']:,.0f} frames/s, {e2e['passed']:.0f}/{e2e['frames']:.0f} passed the "
          f"gate, this process {e2e['cpu_percent']:.0f} % of one core")


if __name__ == "__main__":
    main()
