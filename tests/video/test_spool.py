"""The recording spool (twin/video/spool.py): ffmpeg always writes segments, recording keeps them
by hard links — start/stop never restarts ffmpeg, pre-roll comes from the spool, a SIGKILL leaves
readable recordings and a restart never truncates one. A real ffmpeg pipeline fed by a real
testsrc pusher."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import trio

from tests.runtime.helpers import eventually
from twin.video import spool
from twin.video.pipeline import CameraPipeline, PipelineError, VideoOptions, run_pusher
from twin.video.recordings import NAME_FORMAT, segments
from twin.video.sources import resolve_source

from .helpers import free_port

T0 = 1_780_000_000.0


def _fake(d: Path, start: float, end: float) -> Path:
    path = d / (time.strftime(NAME_FORMAT, time.gmtime(start)) + ".ts")
    path.write_bytes(b"G" * 188)
    os.utime(path, (end, end))
    return path


def test_keep_links_prune_unlinks_and_a_new_run_cannot_reuse_a_kept_name(tmp_path: Path) -> None:
    sp, rec = tmp_path / "spool", tmp_path / "rec"
    sp.mkdir()
    a, b, c = (_fake(sp, T0 + 10 * i, T0 + 10 * (i + 1)) for i in range(3))
    # recording from T0+15 on: b (ends T0+20) and c (being written) are kept, a is not
    kept = spool.keep(sp, rec, T0 + 15, ongoing=True)
    assert sorted(p.name for p in kept) == [b.name, c.name]
    assert (rec / b.name).samefile(b) and not (rec / a.name).exists()
    assert spool.keep(sp, rec, T0 + 15, ongoing=True) == []  # already kept: nothing new
    # the pre-roll window (5 s) at T0+40: a and b go from the spool; b lives on in rec/
    assert sorted(p.name for p in spool.prune(sp, 5, T0 + 40)) == [a.name, b.name]
    assert (rec / b.name).read_bytes() == b"G" * 188 and not a.exists()
    assert c.exists()  # never the newest
    # before the next ffmpeg run: the kept c loses its spool name (a reopen would truncate it)
    spool.release_kept(sp)
    assert not c.exists() and (rec / c.name).exists()
    # a new segment in the same second as a kept one is kept under another name
    again = _fake(sp, T0 + 20, T0 + 25)
    assert [p.name for p in spool.keep(sp, rec, T0, ongoing=True)] == [
        again.name.removesuffix(".ts") + "-1.ts"]
    assert [s.start for s in segments(rec)] == [T0 + 10, T0 + 20, T0 + 20]


def _readable_packets(path: Path) -> int:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-show_entries", "stream=nb_read_packets",
         "-of", "csv=p=0", str(path)], capture_output=True, check=False, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else 0


async def _until(predicate: Callable[[], bool]) -> None:
    await eventually(predicate, within=60, step=0.1)


async def test_recording_starts_and_stops_without_restarting_ffmpeg(tmp_path: Path) -> None:
    doc = {"metadata": {"name": "c1"}, "spec": {"binding": {"sim": {"video": {
        "port": free_port(socket.SOCK_DGRAM), "size": "160x90", "fps": 10}}}}}
    src = await resolve_source(doc, "sim", {})  # type: ignore[arg-type]
    opts = VideoOptions.parse({"record": {"segment": "2s", "pre_roll": "3s"}})
    p = CameraPipeline("c1", src, opts, tmp_path)
    sp, rec = tmp_path / "spool", tmp_path / "rec"

    async def pusher() -> None:
        with contextlib.suppress(Exception):  # it ends when cancelled
            await run_pusher("c1", src.pusher)

    async def supervised() -> None:  # the engine's supervisor restarts it the same way
        while True:
            with contextlib.suppress(PipelineError):
                await p.run()
            await trio.sleep(0.25)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pusher)
        nursery.start_soon(supervised)
        # not recording: the spool fills, rec/ stays empty, old spool segments are pruned
        await _until(lambda: len(segments(sp)) >= 3)
        first = segments(sp)[0].path
        assert list(rec.iterdir()) == []
        await _until(lambda: not first.exists())  # older than the 3 s pre-roll: pruned

        assert p.process is not None
        pid = p.process.pid
        started = time.time()
        current = segments(sp)[-1]
        p.set_recording(True)
        # kept when set_recording returns: the segment being written and the pre-roll
        kept = segments(rec)
        assert len(kept) >= 2 and kept[0].start < current.start <= kept[-1].start < started
        await _until(lambda: len(segments(rec)) >= len(kept) + 2)
        p.set_recording(False)
        stopped = time.time()
        n = len(segments(rec))
        await _until(lambda: segments(sp)[0].start > stopped)  # the spool moved on
        assert len(segments(rec)) == n  # nothing kept after the stop
        assert p.process is not None and p.process.pid == pid and p.health.runs == 1
        assert all(_readable_packets(s.path) > 0 for s in segments(rec))

        # SIGKILL mid-segment: what was kept is readable, the next run never truncates it
        p.set_recording(True)
        await _until(lambda: segments(rec)[-1].size > 4_000)
        victim = segments(rec)[-1]
        p.kill()
        await _until(lambda: p.health.runs == 2 and p.health.state == "live")
        victim = next(s for s in segments(rec) if s.path == victim.path)  # its final size
        size, packets = victim.size, _readable_packets(victim.path)
        assert packets > 0
        await _until(lambda: segments(rec)[-1].start > victim.start)  # the new run is kept
        assert victim.path.stat().st_size == size and _readable_packets(victim.path) == packets
        nursery.cancel_scope.cancel()
