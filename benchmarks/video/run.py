"""Benchmark: camera pipelines (issue 13 goals).

    .venv/bin/python benchmarks/video/run.py [--cameras 32] [--seconds 20]

The engine and the API run in this process (a temporary state dir), as `twin up` runs them.
Cameras are ``sim`` cameras whose pusher loops a pre-encoded 1 Mbit/s H.264 file with stream
copy (no encoding: on 2 cores, 32 x264 encoders would measure the encoders), so each camera's
pipeline is what a real network camera costs: one ffmpeg, copy, four outputs (HTTP-FLV hub,
HLS, keyframe snapshots, no recording). A real RTSP camera (GStreamer's RTSP server, run with
the system python3-gi) is the source of the on-demand snapshot. Prints:

1. CPU per pipeline (% of one core) over ``--seconds``: the camera ffmpeg processes
   (/proc/<pid>/stat), this process (FLV parsing, snapshots, health) divided by the cameras,
   and, for reference, the pushers (the stand-in cameras, not part of a pipeline);
2. restart after SIGKILL of a camera's ffmpeg: until the next frame arrives (5 kills);
3. snapshot latency: the rolling snapshot over HTTP (GET /video/cameras/{c}/snapshot, 50
   requests); on demand from the RTSP camera with its stream off (twin/video/snapshots.py): a
   one-shot ffmpeg (connect, describe, first keyframe), the warm snapshot session (its first
   request starts it; the next ones within ``snapshot.warm``), and a snapshot URL (the fake
   ONVIF camera's HTTP server, Digest auth);
4. HTTP-FLV time to first frame: request sent → first keyframe bytes received (10 viewers,
   loopback, measured at the client; server side is below that);
5. HLS glass-to-player estimate: newest segment's age (EXT-X-PROGRAM-DATE-TIME vs now) plus
   the player's live offset (hls.js ``liveSyncDurationCount`` 2 x segment length).

No thresholds; the machine is shared — the load average is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def children(pattern: str) -> list[int]:
    me = str(os.getpid())
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if ppid == me and pattern in cmd:
            out.append(int(d.name))
    return out


def make_clip(path: Path) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=640x360:rate=25", "-t", "20", "-c:v", "libx264", "-preset", "veryfast",
         "-pix_fmt", "yuv420p", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
         "-b:v", "1M", "-maxrate", "1M", "-bufsize", "1M", "-f", "mpegts", str(path)],
        check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(args: argparse.Namespace) -> None:
    from twin.api import auth
    from twin.api.server import ApiService
    from twin.api.state import ApiSettings
    from twin.registry import open_registry
    from twin.runtime.engine import Engine, EngineConfig
    from twin.video import snapshots
    from twin.video.pipeline import CameraPipeline, VideoOptions, grab_frame
    from twin.video.sources import StreamSource

    print(f"load average at start: {os.getloadavg()[0]:.1f} (2 cores)")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        clip = state / "clip.ts"
        make_clip(clip)
        docs: list[dict[str, Any]] = [
            {"apiVersion": "flux.iot/v1", "kind": "Site", "metadata": {"name": "bench"},
             "spec": {"title": "bench"}},
        ]
        names = [f"cam{i:02d}" for i in range(args.cameras)]
        for name in names:
            docs.append({
                "apiVersion": "flux.iot/v1", "kind": "Device",
                "metadata": {"name": name, "site": "bench"},
                "spec": {"type": "camera", "binding": {"sim": {
                    "video": {"file": str(clip)}, "health_interval": "2s"}},
                    "heartbeat": {"interval": "2s", "timeout": "30s"}}})
        reg = open_registry(None, state)
        head = reg.head()
        reg.apply({(d["kind"], d["metadata"]["name"]): d for d in docs},
                  base=head.number if head else 0, author="bench")
        reg.put_user(auth.make_user("bench", "benchbench", "admin"))
        token = auth.issue_access_token(auth.load_secret(state), reg.get_user("bench"))  # type: ignore[arg-type]
        engine = Engine(reg, EngineConfig(state_dir=state),
                        [ApiService("127.0.0.1", 0, ApiSettings(state_dir=state))])
        rtsp_port = free_port()
        gst = subprocess.Popen(["/usr/bin/python3", str(ROOT / "tests/video/rtsp_camera.py"),  # noqa: ASYNC220
                                str(rtsp_port)], stdout=subprocess.PIPE, text=True)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                url = engine.service_info["api"]["url"]
                video = engine.video
                t0 = time.monotonic()
                with trio.move_on_after(240):
                    while True:
                        up = [n for n in names if (p := video.get(n)) is not None
                              and p.health.state == "live" and p.hub.ready]
                        if len(up) == len(names):
                            break
                        await trio.sleep(0.5)
                if len(up) < len(names):
                    for n in names:
                        p = video.get(n)
                        if n not in up:
                            print(f"   {n} not live: {p.status() if p else 'no pipeline'}")
                    raise SystemExit(f"only {len(up)} of {len(names)} cameras live")
                print(f"{len(names)} cameras live after {time.monotonic() - t0:.1f} s")
                await trio.sleep(5)  # past the start-up burst

                # 1. CPU
                pids = {n: video.get(n).process.pid for n in names}  # type: ignore[union-attr]
                pushers = children("-stream_loop")
                before = {n: cpu_seconds(p) for n, p in pids.items()}
                push_before = sum(cpu_seconds(p) for p in pushers)
                me_before = sum(os.times()[:2])
                w0 = time.monotonic()
                await trio.sleep(args.seconds)
                wall = time.monotonic() - w0
                per = sorted((cpu_seconds(p) - before[n]) / wall * 100 for n, p in pids.items())
                me = (sum(os.times()[:2]) - me_before) / wall * 100
                push = (sum(cpu_seconds(p) for p in pushers) - push_before) / wall * 100
                kbps = statistics.mean(video.get(n).health.bitrate_kbps for n in names)  # type: ignore[union-attr]
                print(f"1. CPU per pipeline over {wall:.0f} s (copy, {kbps:.0f} kbit/s each):")
                print(f"   camera ffmpeg: mean {statistics.mean(per):.2f} %, median "
                      f"{statistics.median(per):.2f} %, max {per[-1]:.2f} % of a core")
                print(f"   engine process (FLV hub, snapshots, health, API): {me:.1f} % total, "
                      f"{me / len(names):.2f} % per camera")
                print(f"   => per pipeline: {statistics.mean(per) + me / len(names):.2f} % "
                      f"of a core; pushers (stand-in cameras, not counted): "
                      f"{push / max(1, len(pushers)):.2f} % each")
                print(f"   load average now: {os.getloadavg()[0]:.1f}")

                # 2. restart after SIGKILL
                restarts = []
                for i in range(5):
                    p = video.get(names[i % len(names)])
                    assert p is not None and p.process is not None
                    killed = trio.current_time()
                    os.kill(p.process.pid, signal.SIGKILL)
                    with trio.fail_after(60):
                        while not (p.health.last_frame_at and p.health.last_frame_at > killed  # noqa: ASYNC110
                                   and p.health.runs > 1 and p.health.state == "live"):
                            await trio.sleep(0.01)
                    restarts.append(p.health.last_frame_at - killed)
                print(f"2. restart after SIGKILL → next frame: median "
                      f"{statistics.median(restarts):.2f} s, max {max(restarts):.2f} s "
                      f"(5 kills; supervisor backoff 0.25-0.5 s of it)")

                h = {"Authorization": f"Bearer {token}"}
                async with httpx.AsyncClient(base_url=url, headers=h, timeout=30) as c:
                    # 3. snapshots
                    lat = []
                    for i in range(50):
                        t = time.perf_counter()
                        r = await c.get(f"/api/v1/video/cameras/{names[i % len(names)]}/snapshot")
                        lat.append(time.perf_counter() - t)
                        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
                    floor = []
                    for _ in range(50):  # the same server's cheapest route: the HTTP floor
                        t = time.perf_counter()
                        await c.get("/api/v1/health")
                        floor.append(time.perf_counter() - t)
                    print(f"3. rolling snapshot over HTTP: median {statistics.median(lat) * 1000:.1f}"
                          f" ms, p95 {pct(lat, 0.95) * 1000:.1f} ms (50 requests, "
                          f"{len(r.content) // 1024} KiB JPEG); GET /health on the same server "
                          f"(peer: the HTTP floor) median {statistics.median(floor) * 1000:.1f} ms "
                          f"→ ratio {statistics.median(lat) / statistics.median(floor):.2f}")
                    assert gst.stdout is not None
                    await trio.to_thread.run_sync(gst.stdout.readline)
                    src = StreamSource(f"rtsp://127.0.0.1:{rtsp_port}/live",
                                       {"rtsp_transport": "tcp"})

                    async def timed(fn: Any, n: int, gap: float = 0.0) -> list[float]:
                        out = []
                        for _ in range(n):
                            t = time.perf_counter()
                            await fn()
                            out.append(time.perf_counter() - t)
                            await trio.sleep(gap * random.random())  # off the GOP's beat
                        return out

                    cold = await timed(lambda: grab_frame(src, 10), 5)
                    # a camera encodes all the time: keep one session open (shared media)
                    watcher = subprocess.Popen(  # noqa: ASYNC220
                        ["ffmpeg", "-loglevel", "quiet", "-rtsp_transport", "tcp", "-i",
                         src.url, "-c", "copy", "-f", "null", "-"], stdin=subprocess.DEVNULL)
                    await trio.sleep(3)
                    one_shot = await timed(lambda: grab_frame(src, 10), 10, 1.0)
                    # the warm snapshot session of a camera whose stream is off: the first
                    # request starts it (a fresh session per round: warm 1 s, then 1.5 s idle)
                    off = CameraPipeline("rtsp_off", src, VideoOptions.parse(
                        {"snapshot": {"warm": "1s"}}), state / "rtsp_off", streaming=False)
                    nursery.start_soon(off.run)
                    first, again = [], []
                    for _ in range(5):
                        first += await timed(lambda: snapshots.take(off, 10), 1)
                        again += await timed(lambda: snapshots.take(off, 10), 4, 0.2)
                        await trio.sleep(1.5 + random.random())
                        assert off.process is None
                    watcher.terminate()
                    watcher.wait()
                    # the camera's own snapshot URL (ONVIF GetSnapshotUri), Digest auth
                    from tests.video.onvif_camera import FakeOnvifCamera

                    jpeg = (state / "rtsp_off" / "snapshots")
                    with FakeOnvifCamera(auth="digest", snapshot=off.snapshot or b"") as onvif:
                        url_src = StreamSource(src.url, src.options, snapshot_url=(
                            f"http://admin:secret@127.0.0.1:{onvif.port}/snapshot.jpg"))
                        by_url = CameraPipeline("url", url_src, VideoOptions(), jpeg,
                                                streaming=False)
                        via_url = await timed(lambda: snapshots.take(by_url, 10), 10)
                    print(f"   on demand from RTSP (GStreamer server, 320x180, GOP 1 s, encoder "
                          f"running like a camera's): one-shot ffmpeg median "
                          f"{statistics.median(one_shot):.2f} s, max {max(one_shot):.2f} s (10);"
                          f" warm session: first request (starts it) median "
                          f"{statistics.median(first):.2f} s, max {max(first):.2f} s (5), next "
                          f"requests median {statistics.median(again) * 1000:.1f} ms, max "
                          f"{max(again) * 1000:.1f} ms (20); camera snapshot URL (HTTP, Digest) "
                          f"median {statistics.median(via_url) * 1000:.1f} ms (10); one-shot with"
                          f" the server's encoder started per session median "
                          f"{statistics.median(cold):.2f} s (5)")

                    # 4. HTTP-FLV time to first frame
                    from twin.video.flvhub import FlvParser

                    ttff = []
                    for i in range(10):
                        links = (await c.get(f"/api/v1/video/cameras/{names[i % len(names)]}/urls")).json()
                        t = time.perf_counter()
                        async with c.stream("GET", links["flv"]) as resp:
                            parser = FlvParser()
                            async for chunk in resp.aiter_bytes():
                                if any(tag.keyframe for tag in parser.feed(chunk)):
                                    break
                        ttff.append(time.perf_counter() - t)
                    print(f"4. HTTP-FLV first keyframe at the client: median "
                          f"{statistics.median(ttff) * 1000:.1f} ms, max {max(ttff) * 1000:.1f} ms"
                          " (10 viewers; the GOP cache answers at once)")

                    # 5. HLS glass-to-player estimate
                    ages = []
                    for i in range(10):
                        links = (await c.get(f"/api/v1/video/cameras/{names[i % len(names)]}/urls")).json()
                        text = (await c.get(links["hls"])).text
                        now = time.time()
                        pdts = [ln.split(":", 1)[1] for ln in text.splitlines()
                                if ln.startswith("#EXT-X-PROGRAM-DATE-TIME:")]
                        durs = [float(ln.split(":", 1)[1].rstrip(",")) for ln in text.splitlines()
                                if ln.startswith("#EXTINF:")]
                        last = dt.datetime.fromisoformat(pdts[-1]).timestamp()
                        ages.append(now - (last + durs[-1]))
                        await trio.sleep(0.37)
                    seg = 1.0
                    est = statistics.median(ages) + seg + 2 * seg
                    print(f"5. HLS: newest segment complete {statistics.median(ages):.2f} s ago "
                          f"(median of 10); glass-to-player ≈ segment being written ({seg:.0f} s)"
                          f" + 2 segments live offset + that = {est:.1f} s")
                nursery.cancel_scope.cancel()
        finally:
            gst.terminate()
            gst.wait(10)
            reg.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    trio.run(main, ap.parse_args())
