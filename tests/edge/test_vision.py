"""Edge AI: ffmpeg frames (rawvideo pipe), the numpy motion gate, onnxruntime inference on a
tiny model the test builds itself, detections as readings a local scene triggers on."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from twin.edge.vision import Detector, MotionGate, frames

from .tinymodel import SPEC, build

pytest.importorskip("onnxruntime")
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")


def test_motion_gate_passes_changed_frames_only() -> None:
    gate = MotionGate(pixel=25, area=0.01)
    still = np.full((180, 320, 3), 90, np.uint8)
    assert gate.check(still)  # the first frame: nothing to compare with
    assert not gate.check(still.copy())
    noisy = still.copy()
    noisy[::7, ::7] += 10  # sensor noise below the pixel threshold
    assert not gate.check(noisy)
    moved = noisy.copy()
    moved[40:80, 100:160] = 250  # an object: 4 % of the frame
    assert gate.check(moved)
    assert (gate.seen, gate.passed) == (4, 2)


def test_detector_on_a_tiny_onnx_model(tmp_path: Path) -> None:
    det = Detector(build(tmp_path / "m.onnx"), SPEC)
    bright = np.full((180, 320, 3), 240, np.uint8)
    dark = np.full((180, 320, 3), 10, np.uint8)
    label, score = det.detect(bright) or ("", 0.0)
    assert label == "bright" and score == pytest.approx(240 / 255, abs=1e-3)
    assert det.detect(dark) == ("dark", pytest.approx(1 - 10 / 255, abs=1e-3))
    assert det.detect(np.full((180, 320, 3), 128, np.uint8)) is None  # 0.5: below 0.6


@needs_ffmpeg
async def test_ffmpeg_frames_at_declared_size_and_rate() -> None:
    got = [f async for f in frames("lavfi:testsrc2", 320, 180, 10, limit=6)]
    assert len(got) == 6 and all(f.shape == (180, 320, 3) and f.dtype == np.uint8 for f in got)
    gate = MotionGate()
    assert sum(gate.check(f) for f in got) >= 3  # testsrc2 moves
