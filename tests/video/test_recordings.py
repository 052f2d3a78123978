"""Recordings: segments by time range, retention by age and size, clips cut with stream copy
(real MPEG-TS segments made by ffmpeg, the clip read back with ffprobe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twin.video import recordings as rec

T0 = 1_780_000_000.0  # a whole second, UTC


def _segment(path: Path, seconds: int = 2) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=160x90:rate=10", "-t", str(seconds), "-c:v", "libx264", "-preset",
         "ultrafast", "-g", "10", "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)],
        check=True)


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rec")
    for i in range(3):
        start = T0 + 2 * i
        path = d / (time.strftime(rec.NAME_FORMAT, time.gmtime(start)) + ".ts")
        _segment(path)
        os.utime(path, (start + 2, start + 2))  # written until its end
    (d / "notes.txt").write_text("not a segment")
    return d


def _duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                          "json", str(path)], capture_output=True, check=True).stdout
    return float(json.loads(out)["format"]["duration"])


def test_segments_by_time_range(rec_dir: Path) -> None:
    segs = rec.segments(rec_dir)
    assert [s.start for s in segs] == [T0, T0 + 2, T0 + 4]
    assert [s.end for s in segs] == [T0 + 2, T0 + 4, T0 + 6]
    assert [s.start for s in rec.in_range(rec_dir, T0 + 2.5, T0 + 3)] == [T0 + 2]
    assert [s.start for s in rec.in_range(rec_dir, T0 + 3, None)] == [T0 + 2, T0 + 4]
    assert rec.in_range(rec_dir, T0 + 10, T0 + 20) == []


def test_clip_across_segments_is_cut_with_copy(rec_dir: Path, tmp_path: Path) -> None:
    out = rec.export_clip(rec_dir, T0 + 1, T0 + 5, tmp_path / "clip.mp4")
    assert 3.0 <= _duration(out) <= 5.0  # cut at keyframes (copy): within a GOP of 4 s
    with pytest.raises(ValueError, match="no recording"):
        rec.export_clip(rec_dir, T0 + 100, T0 + 101, tmp_path / "none.mp4")


def test_retention_by_age_and_size_keeps_the_newest(tmp_path: Path, rec_dir: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    for seg in rec.segments(rec_dir):
        (d / seg.path.name).write_bytes(seg.path.read_bytes())
        os.utime(d / seg.path.name, (seg.end, seg.end))
    sizes = [s.size for s in rec.segments(d)]
    # by size: keep what fits in the two newest
    removed = rec.enforce(d, days=None, max_bytes=sizes[1] + sizes[2])
    assert [p.name for p in removed] == [rec.segments(rec_dir)[0].path.name]
    # by age: everything older than a day goes, but never the segment being written
    removed = rec.enforce(d, days=1, max_bytes=None, now=T0 + 10 * 86400)
    assert len(removed) == 1 and len(rec.segments(d)) == 1


def _twin(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twin.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120, check=False)


def test_cli_lists_and_cuts(tmp_path: Path, rec_dir: Path) -> None:
    cam = tmp_path / "state" / "video" / "cam1" / "rec"
    cam.parent.mkdir(parents=True)
    cam.symlink_to(rec_dir)
    env = {"TWIN_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    r = _twin("video", "recordings", "cam1", "--from", str(T0), "--to", str(T0 + 3), "--json",
              env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [json.loads(ln)["start"] for ln in r.stdout.splitlines()] == [T0, T0 + 2]
    out = tmp_path / "c.mp4"
    r = _twin("video", "clip", "cam1", "--from", str(T0), "--to", str(T0 + 4), "--out", str(out),
              env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _duration(out) > 2.0
    r = _twin("video", "clip", "cam1", "--from", str(T0 + 50), "--to", str(T0 + 60), "--out",
              str(out), env=env)
    assert r.returncode == 1 and "no recording of cam1" in r.stderr
    assert "hint: twin video recordings" in r.stderr and "Traceback" not in r.stderr


def test_runs_merge_back_to_back_segments(rec_dir: Path) -> None:
    [run] = rec.runs(rec.segments(rec_dir))
    assert (run.start, run.end, run.segments) == (T0, T0 + 6, 3)
    assert run.size == sum(s.size for s in rec.segments(rec_dir))
    later = rec.Segment(Path("x.ts"), T0 + 60, T0 + 70, 5)
    assert [r.start for r in rec.runs([*rec.segments(rec_dir), later])] == [T0, T0 + 60]


def test_twin_query_lists_recordings_per_camera(tmp_path: Path, rec_dir: Path) -> None:
    state = tmp_path / "state"
    for cam in ("cam1", "cam2"):
        (state / "video" / cam).mkdir(parents=True)
        (state / "video" / cam / "rec").symlink_to(rec_dir)
    (state / "video" / "cam3").mkdir()  # a camera that never recorded
    env = {"TWIN_STATE_DIR": str(state), "COLUMNS": "200"}
    r = _twin("query", "--recordings", "--from", str(T0 + 1), "--to", str(T0 + 3), "-o", "json",
              env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    items = json.loads(r.stdout)["items"]
    assert [(i["camera"], i["start"], i["end"], i["segments"]) for i in items] == [
        ("cam1", T0, T0 + 4, 2), ("cam2", T0, T0 + 4, 2)]
    r = _twin("query", "--recordings", "--device", "cam2", "--from", str(T0), "-o", "csv",
              env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("camera,site,start,end") and len(lines) == 2
    assert lines[1].startswith(f"cam2,,{T0},{T0 + 6},6.0,3,")
    r = _twin("query", "--recordings", "--from", str(T0), env=env)  # the table
    assert r.returncode == 0 and "cam1" in r.stdout and "2 recording(s)" in r.stderr
    r = _twin("query", "temperature", "--recordings", env=env)
    assert r.returncode == 1 and "no metrics" in r.stderr
