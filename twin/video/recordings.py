"""Recordings: MPEG-TS segments per camera, listed by time, exported as clips, kept by retention.

A camera's recordings are ``<camera dir>/rec/<UTC start, %Y%m%dT%H%M%SZ>.ts``: the segments of
its ffmpeg's spool kept while recording is on (``twin/video/spool.py``). A segment's start is its name; its end is the next segment's
start when that follows on (or its file's modification time). MPEG-TS needs no trailer: a
segment cut off by a SIGKILL is still readable up to its last packet.

Retention (``record.retention: {days, size_gb}`` in the camera binding) deletes whole segments,
oldest first, until both limits hold; the segment being written (the newest) is never deleted.
"""

from __future__ import annotations

import calendar
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Segment:
    path: Path
    start: float  # unix seconds UTC
    end: float
    size: int

    def to_json(self, camera: str) -> dict[str, Any]:
        return {"camera": camera, "file": self.path.name, "start": self.start, "end": self.end,
                "duration": round(self.end - self.start, 3), "bytes": self.size}


def parse_start(name: str) -> float | None:
    try:
        stem = name.removesuffix(".ts").split("-", 1)[0]  # "-N": a second segment that second
        return float(calendar.timegm(time.strptime(stem, NAME_FORMAT)))
    except ValueError:
        return None


def segments(rec_dir: Path) -> list[Segment]:
    """Every complete-or-growing segment in ``rec_dir``, oldest first."""
    found: list[tuple[float, Path, int, float]] = []
    try:
        entries = list(rec_dir.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if path.suffix != ".ts":
            continue
        start = parse_start(path.name)
        if start is None:
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        found.append((start, path, st.st_size, st.st_mtime))
    found.sort()
    out = []
    for i, (start, path, size, mtime) in enumerate(found):
        end = max(start, mtime)
        if i + 1 < len(found):
            end = min(end, found[i + 1][0]) if found[i + 1][0] > start else end
        out.append(Segment(path, start, end, size))
    return out


@dataclass(frozen=True)
class Run:
    """Back-to-back segments: one recording from start_recording to stop_recording."""

    start: float
    end: float
    segments: int
    size: int
    first: str  # the first segment's file name

    def to_json(self, camera: str, site: str | None = None) -> dict[str, Any]:
        return {"camera": camera, "site": site, "start": self.start, "end": self.end,
                "duration": round(self.end - self.start, 3), "segments": self.segments,
                "bytes": self.size, "first": self.first}


def runs(segs: list[Segment], gap: float = 2.0) -> list[Run]:
    """``segs`` (oldest first) merged into recordings: a segment starting within ``gap`` s of
    the previous one's end continues it."""
    out: list[Run] = []
    for seg in segs:
        if out and seg.start - out[-1].end <= gap:
            last = out[-1]
            out[-1] = Run(last.start, max(last.end, seg.end), last.segments + 1,
                          last.size + seg.size, last.first)
        else:
            out.append(Run(seg.start, seg.end, 1, seg.size, seg.path.name))
    return out


def in_range(rec_dir: Path, start: float | None = None, end: float | None = None) -> list[Segment]:
    """Segments overlapping ``[start, end]`` (either open)."""
    return [s for s in segments(rec_dir)
            if (start is None or s.end >= start) and (end is None or s.start <= end)]


def enforce(rec_dir: Path, *, days: float | None, max_bytes: int | None,
            now: float | None = None) -> list[Path]:
    """Delete the oldest segments until ``days`` and ``max_bytes`` hold; returns what went."""
    segs = segments(rec_dir)
    if len(segs) <= 1:
        return []
    now = time.time() if now is None else now
    removed: list[Path] = []
    total = sum(s.size for s in segs)
    for seg in segs[:-1]:  # never the one being written
        too_old = days is not None and seg.end < now - days * 86400
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break
        seg.path.unlink(missing_ok=True)
        total -= seg.size
        removed.append(seg.path)
    return removed


def export_command(segs: list[Segment], start: float, end: float, out: Path, listing_path: Path,
                   ffmpeg: str = "ffmpeg") -> tuple[list[str], str]:
    """ffmpeg argv (concat demuxer, stream copy) cutting ``[start, end]`` out of ``segs`` into
    ``out`` (.mp4 or .ts), and the concat list it reads from ``listing_path``."""
    if not segs:
        raise ValueError("no recording in that time range")
    first = segs[0].start
    listing = "ffconcat version 1.0\n" + "".join(
        f"file '{s.path.resolve().as_posix()}'\n" for s in segs)
    offset = max(0.0, start - first)
    duration = max(0.1, end - max(start, first))
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "concat", "-safe", "0", "-i", str(listing_path), "-ss", f"{offset:.3f}", "-t", f"{duration:.3f}",
            "-map", "0:v:0", "-map", "0:a:0?", "-c", "copy"]
    if out.suffix == ".mp4":
        argv += ["-movflags", "+faststart"]
    return [*argv, str(out)], listing


def export_clip(rec_dir: Path, start: float, end: float, out: Path, timeout: float = 120) -> Path:
    """Cut ``[start, end]`` into ``out`` (blocking: run it in a worker thread)."""
    segs = in_range(rec_dir, start, end)
    out.parent.mkdir(parents=True, exist_ok=True)
    listing_path = out.with_name(out.name + ".ffconcat")
    argv, listing = export_command(segs, start, end, out, listing_path)
    listing_path.write_text(listing, encoding="utf-8")
    try:
        result = subprocess.run(argv, capture_output=True, timeout=timeout, check=False,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0 and b"codec not currently supported" in result.stderr:
            # an audio codec the container cannot hold (G.711 in MP4): the clip without it
            at = argv.index("0:a:0?")
            argv = argv[:at - 1] + argv[at + 1:]
            result = subprocess.run(argv, capture_output=True, timeout=timeout, check=False,
                                    stdin=subprocess.DEVNULL)
    finally:
        listing_path.unlink(missing_ok=True)
    if result.returncode != 0 or not out.exists():
        tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"exporting the clip failed: {tail[0][:300]}")
    return out


__all__ = ["Run", "Segment", "enforce", "export_clip", "export_command", "in_range", "parse_start",
           "runs", "segments"]
