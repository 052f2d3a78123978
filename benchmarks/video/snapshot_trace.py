"""Where a cold on-demand snapshot from RTSP spends its time (issue 13: < 0.5 s).

    flock /work/wt/bench.lock .venv/bin/python benchmarks/video/snapshot_trace.py [--n 8]

The one-shot grab's ffmpeg (``twin.video.pipeline.grab_frame``'s command line, before and
after session 6's input options) run with ``-loglevel debug``; each stderr line is stamped when
it arrives (a pipe, line-buffered by ffmpeg), so the phases are:

- spawn: process start → ffmpeg's first log line (exec, dynamic linking, option parsing);
- RTSP: → the SDP is printed (TCP connect, OPTIONS, DESCRIBE); SETUP/PLAY follow in ~1 ms;
- keyframe: → the first IDR NAL unit is parsed (the camera's next keyframe);
- probe tail: → ``Input #0`` (find_stream_info returns);
- decode + JPEG + exit: → the JPEG on stdout, → the process exits.

Against the test camera (``tests/video/rtsp_camera.py``, 320x180, GOP 1 s) in both modes:
GStreamer's default (a client's PLAY restarts the encoder: a keyframe ~0.25 s later) and strict
GOP (the encoder runs on: the wait is up to a GOP). Medians; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.video.snapshot import camera  # noqa: E402

BEFORE = ["-analyzeduration", "100000", "-probesize", "32768"]
AFTER = ["-analyzeduration", "1", "-probesize", "32", "-threads", "1"]
MARKS = (("RTSP (to SDP)", b"SDP:"), ("keyframe", b"nal_unit_type: 5"),
         ("probe tail", b"Input #0"))


def trace(url: str, opts: list[str]) -> dict[str, float]:
    argv = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "debug", "-rtsp_transport", "tcp",
            *opts, "-skip_frame", "nokey", "-i", url, "-frames:v", "1", "-f", "image2pipe",
            "-c:v", "mjpeg", "-q:v", "5", "pipe:1"]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    assert p.stdout is not None and p.stderr is not None
    at: dict[str, float] = {}
    err = b""
    names = {p.stdout.fileno(): "out", p.stderr.fileno(): "err"}
    open_fds = set(names)
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [], 15)
        if not ready:
            p.kill()
            break
        for fd in ready:
            data = os.read(fd, 65536)
            now = time.perf_counter() - t0
            if not data:
                open_fds.discard(fd)
            elif names[fd] == "out":
                at.setdefault("jpeg", now)
            else:
                at.setdefault("spawn", now)
                err += data
                for key, pattern in MARKS:
                    if key not in at and pattern in err:
                        at[key] = now
    p.wait()
    at["exit"] = time.perf_counter() - t0
    return at


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="runs per variant (alternating)")
    args = ap.parse_args()
    print(" ".join(sys.argv), "—", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    spawn = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run(["ffmpeg", "-hide_banner", "-version"], stdout=subprocess.DEVNULL,
                       check=True)
        spawn.append(time.perf_counter() - t)
    print(f"ffmpeg -version (spawn + exit alone): median {statistics.median(spawn):.3f} s")
    for strict in (False, True):
        gst, viewer, url = camera(10, strict, size="320x180", kbps=300)
        time.sleep(3)
        try:
            rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            l0 = os.getloadavg()
            for i in range(args.n):
                for which in (("before", "after") if i % 2 == 0 else ("after", "before")):
                    rows[which].append(trace(url, BEFORE if which == "before" else AFTER))
                    time.sleep(random.random())  # off the GOP's beat
            l1 = os.getloadavg()
            print(f"== {'strict GOP 1 s' if strict else 'keyframe at PLAY (GStreamer default)'}"
                  f"; load {l0[0]:.2f} -> {l1[0]:.2f}")
            for which, runs in rows.items():
                keys = ["spawn", *(k for k, _ in MARKS), "jpeg", "exit"]
                med = {k: statistics.median(r.get(k, float("nan")) for r in runs) for k in keys}
                steps, prev = [], 0.0
                for k in keys:
                    steps.append(f"{k} +{(med[k] - prev) * 1000:.0f}")
                    prev = med[k]
                print(f"   {which:6s} total {med['exit']:.3f} s: " + ", ".join(steps) + " ms")
        finally:
            for proc in (viewer, gst):
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
