"""Benchmark: on-demand snapshots from RTSP cameras whose stream is off (issue 13: < 0.5 s).

    flock /work/wt/bench.lock .venv/bin/python benchmarks/video/snapshot.py [--per 4] [--rounds 2]

Two real RTSP cameras (GStreamer's RTSP server, ``tests/video/rtsp_camera.py`` run with the
system python3-gi): 1280x720, 10 fps, 2 Mbit/s H.264, GOP 1 s and 4 s, their encoders running
all the time (one viewer stays connected, as a camera encodes whether anyone watches or not),
and not restarted for a new client (``RTSP_CAMERA_STRICT_GOP``): a new session waits for the
next scheduled keyframe, the worst case a camera offers.
For each camera, in alternating rounds:

- one-shot grab (``snapshot.warm: 0``, ``grab_frame``): *before* = the options of the code
  before session 6 (probe 0.1 s / 32 KiB, decoder threads auto), *after* = this code
  (probe stops at the first packet, one decoder thread);
- the first request of a timed warm session (``warm: 60s``, the default before session 6; a
  1 s session here, so each request starts a fresh one): before / after as above;
- ``warm: always``: the copy-only session runs; requests at random times decode its newest
  keyframe.

Then CPU over ``--cpu-seconds``: the always-on session's ffmpeg (copy, keyframes to a file)
against a keyframe-decoding warm session's ffmpeg (the JPEG of every keyframe), both running
on the 1 s-GOP camera at the same time (/proc/<pid>/stat). No thresholds; the machine is shared
— the load average is printed with each figure.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.video.run import cpu_seconds, free_port  # noqa: E402
from twin.video import snapshots  # noqa: E402
from twin.video.pipeline import CameraPipeline, PipelineError, VideoOptions, grab_frame  # noqa: E402
from twin.video.sources import StreamSource  # noqa: E402

BEFORE = {"analyzeduration": "100000", "probesize": "32768"}
"""The snapshot paths' input options before session 6 (the source's options win over the
code's, so these reproduce the old command line; the one-shot grab also had the decoder's
default threads)."""


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def camera(gop_frames: int, strict: bool = True, size: str = "1280x720", kbps: int = 2000
           ) -> tuple[subprocess.Popen[str], subprocess.Popen[bytes], str]:
    """A GStreamer RTSP camera and one viewer that keeps its encoder running: (server, viewer,
    URL)."""
    port = free_port()
    env = {**os.environ, "RTSP_CAMERA_SIZE": size, "RTSP_CAMERA_GOP": str(gop_frames),
           "RTSP_CAMERA_KBPS": str(kbps), "RTSP_CAMERA_STRICT_GOP": "1" if strict else "0"}
    gst = subprocess.Popen(["/usr/bin/python3", str(ROOT / "tests/video/rtsp_camera.py"),
                            str(port)], stdout=subprocess.PIPE, text=True, env=env)
    assert gst.stdout is not None and gst.stdout.readline().strip() == "ready"
    url = f"rtsp://127.0.0.1:{port}/live"
    viewer = subprocess.Popen(["ffmpeg", "-loglevel", "quiet", "-rtsp_transport", "tcp", "-i",
                               url, "-c", "copy", "-f", "null", "-"], stdin=subprocess.DEVNULL)
    return gst, viewer, url


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


def fmt(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):.3f} s, min {min(xs):.3f}, max {max(xs):.3f} "
            f"(n={len(xs)})")


async def supervised(p: CameraPipeline) -> None:
    while True:
        try:
            await p.run()
        except PipelineError as exc:
            print("   pipeline error:", exc)
        await trio.sleep(0.25)


async def main(args: argparse.Namespace) -> None:
    state = Path(tempfile.mkdtemp(prefix="snapbench-"))
    cams = {"keyframe at PLAY (GStreamer restarts its encoder per client), GOP 4 s":
            camera(40, strict=False),
            "strict GOP 1 s": camera(10), "strict GOP 4 s": camera(40)}
    print(" ".join(sys.argv), "—", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    procs = [p for gst, viewer, _ in cams.values() for p in (gst, viewer)]
    try:
        await trio.sleep(3)
        print(load())
        for label, (_, _, url) in cams.items():
            async with trio.open_nursery() as nursery:
                gop = 4.0 if "GOP 4" in label else 1.0
                res: dict[str, list[float]] = {k: [] for k in (
                    "one-shot before", "one-shot after", "session before", "session after",
                    "always")}
                srcs = {"before": StreamSource(url, {"rtsp_transport": "tcp", **BEFORE}),
                        "after": StreamSource(url, {"rtsp_transport": "tcp"})}
                one_shot = {"before": StreamSource(url, {**srcs["before"].options,
                                                         "threads": "auto"}),
                            "after": srcs["after"]}
                sessions = {}
                for which, src in srcs.items():
                    p = CameraPipeline(f"s_{which}", src, VideoOptions.parse(
                        {"snapshot": {"warm": "1s"}}), state / f"{label}-{which}",
                        streaming=False)
                    nursery.start_soon(supervised, p)
                    sessions[which] = p
                always = CameraPipeline("always", srcs["after"], VideoOptions.parse(
                    {"snapshot": {"warm": "always"}}), state / f"{label}-always", streaming=False)
                nursery.start_soon(supervised, always)
                await trio.sleep(gop + 2)  # the always-on session has its first keyframe
                loads = [load()]
                for r in range(args.rounds):
                    order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                    for _ in range(args.per):
                        for which in order:
                            src = one_shot[which]
                            res[f"one-shot {which}"].append(
                                await timed(lambda src=src: grab_frame(src, 15)))
                            await trio.sleep(random.random() * gop)  # off the GOP's beat
                        for which in order:
                            p = sessions[which]
                            while p.process is not None:  # noqa: ASYNC110 (a fresh session)
                                await trio.sleep(0.1)
                            await trio.sleep(random.random() * gop)
                            res[f"session {which}"].append(
                                await timed(lambda p=p: snapshots.take(p, 15)))
                        await trio.sleep(random.random() * gop)
                        res["always"].append(
                            await timed(lambda a=always: snapshots.take(a, 15)))
                    loads.append(load())
                print(f"== {label} (1280x720, 10 fps, 2 Mbit/s); {' -> '.join(loads)}")
                for k, xs in res.items():
                    print(f"   {k:16s} {fmt(xs)}")
                nursery.cancel_scope.cancel()  # this camera's sessions end

        # CPU: the always-on copy session vs a keyframe-decoding session, same camera, together
        url = cams["strict GOP 1 s"][2]
        src = StreamSource(url, {"rtsp_transport": "tcp"})
        async with trio.open_nursery() as nursery:
            always = CameraPipeline("cpu_always", src, VideoOptions.parse(
                {"snapshot": {"warm": "always"}}), state / "cpu-always", streaming=False)
            decoding = CameraPipeline("cpu_decoding", src, VideoOptions.parse(
                {"snapshot": {"warm": "1h"}}), state / "cpu-decoding", streaming=False)
            nursery.start_soon(supervised, always)
            nursery.start_soon(supervised, decoding)
            await snapshots.take(decoding, 15)  # starts the decoding session
            await snapshots.take(always, 15)
            await trio.sleep(2)
            assert always.process is not None and decoding.process is not None
            pids = {"always (copy, keyframes to a file)": always.process.pid,
                    "warm session (decodes every keyframe to JPEG)": decoding.process.pid}
            before = {k: cpu_seconds(pid) for k, pid in pids.items()}
            me0 = time.process_time()
            t0 = time.monotonic()
            l0 = load()
            await trio.sleep(args.cpu_seconds)
            dt = time.monotonic() - t0
            me = (time.process_time() - me0) / dt * 100
            print(f"== CPU over {dt:.0f} s, GOP 1 s camera, 1280x720 2 Mbit/s; {l0} -> {load()}")
            for k, pid in pids.items():
                print(f"   {k}: {(cpu_seconds(pid) - before[k]) / dt * 100:.2f} % of a core")
            print(f"   this process (both pipelines' readers, watchdogs): {me:.2f} %")
            # the on-demand decode of one keyframe, CPU (a fresh ffmpeg each time)
            raw = (state / "cpu-always" / "snapshots" / "keyframe.bin").read_bytes()
            print(f"   keyframe file {len(raw) / 1024:.0f} KiB")
            nursery.cancel_scope.cancel()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--per", type=int, default=4, help="requests per variant per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu-seconds", type=float, default=20.0)
    trio.run(main, ap.parse_args())
