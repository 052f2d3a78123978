"""The recording spool: a camera's ffmpeg always writes short MPEG-TS segments, recording only
decides which of them are kept — so starting or stopping a recording never restarts ffmpeg.

The camera's ffmpeg (``twin/video/pipeline.py``) writes ``<camera dir>/spool/<UTC start>.ts``
(``record.segment`` long, cut at keyframes) whether recording is on or not. While recording is
on, every spool segment that ends at or after ``since`` (the recording's start minus its
``record.pre_roll``) is **hard-linked** into ``rec/`` under the same name: one file, two names, no
copy. The link is made as soon as the segment appears, so what ffmpeg writes afterwards is in the
recording too, and a SIGKILL of the engine or of ffmpeg leaves ``rec/`` with everything written
so far (MPEG-TS needs no trailer). Stopping stops linking; the segment being written when it
stopped is kept to its end.

The spool keeps only the pre-roll: completed segments that ended more than ``pre_roll`` seconds
ago lose their spool name (a kept one lives on in ``rec/``; an unkept one is gone). Before each
ffmpeg run the spool names of kept segments are dropped, so a new run can never reopen (and
truncate) a kept file by reusing a name. Retention (``recordings.enforce``) sees ``rec/`` only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from twin.video.recordings import segments


def _link(src: Path, rec_dir: Path) -> Path | None:
    """``src`` hard-linked into ``rec_dir`` (a name taken by another file gets ``-N``)."""
    stem = src.name.removesuffix(".ts")
    for n in range(100):
        target = rec_dir / (f"{stem}.ts" if n == 0 else f"{stem}-{n}.ts")
        try:
            os.link(src, target)
            return target
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if target.samefile(src):
                    return None  # already kept
        except FileNotFoundError:  # pruned meanwhile
            return None
    return None


def keep(spool_dir: Path, rec_dir: Path, since: float, *, ongoing: bool) -> list[Path]:
    """Link every spool segment that ends at or after ``since`` into ``rec_dir``; returns the
    new links. ``ongoing``: ffmpeg is writing the newest segment (it ends in the future)."""
    segs = segments(spool_dir)
    if not segs:
        return []
    rec_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, seg in enumerate(segs):
        current = ongoing and i == len(segs) - 1
        if current or seg.end >= since:
            target = _link(seg.path, rec_dir)
            if target is not None:
                out.append(target)
    return out


def prune(spool_dir: Path, pre_roll: float, now: float) -> list[Path]:
    """Drop the spool names of completed segments that ended before ``now - pre_roll`` (never
    the newest: ffmpeg may be writing it)."""
    removed = []
    for seg in segments(spool_dir)[:-1]:
        if seg.end < now - pre_roll:
            seg.path.unlink(missing_ok=True)
            removed.append(seg.path)
    return removed


def release_kept(spool_dir: Path) -> None:
    """Before an ffmpeg run: drop the spool names of kept segments (linked into ``rec/``), so
    the run cannot reopen one by name and truncate a recording."""
    try:
        entries = list(spool_dir.iterdir())
    except FileNotFoundError:
        return
    for path in entries:
        with contextlib.suppress(FileNotFoundError):
            if path.suffix == ".ts" and path.stat().st_nlink > 1:
                path.unlink()


__all__ = ["keep", "prune", "release_kept"]
