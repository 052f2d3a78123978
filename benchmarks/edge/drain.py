"""Draining an edge's outbox after an outage while live data keeps flowing.

    python benchmarks/edge/drain.py [--outage 3600] [--rate 1000] [--per-record 10]

The cloud is a real ``twin up`` process (LanceDB store, write-ahead log, the edge service);
the edge side runs here: an outbox prefilled with ``outage * rate`` readings (``per-record``
readings a record, as the edge's tap groups them, timestamps spread over the outage), then
the uplink drains it while a producer appends ``rate`` live readings/s. Reported: the drain
time and rate (vs the production rate; goal: a 1-hour outage at 1,000/s in < 6 min), and the
lag of live records (appended → acknowledged by the cloud) during the drain."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edge.harness import free_port, twin, wait_http  # noqa: E402

from twin.edge.outbox import Outbox  # noqa: E402
from twin.edge.uplink import Uplink  # noqa: E402

SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: remote}
---
apiVersion: flux.iot/v1
kind: DeviceGroup
metadata: {name: edge-devs, site: remote}
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {name: gw-d, site: remote}
spec: {devices: {group: edge-devs}, uplink: {url: "http://127.0.0.1:1"}}
"""
DEVICES = 10


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def site(path: Path) -> Path:
    path.mkdir(parents=True)
    devs = "".join(
        f"---\napiVersion: flux.iot/v1\nkind: Device\nmetadata: {{name: m{i}, site: remote, "
        f"group: edge-devs}}\nspec: {{type: sensor, binding: {{http: {{}}}}}}\n"
        for i in range(DEVICES)
    )
    (path / "s.yaml").write_text(SITE + devs)
    return path


def record(k: int, per: int, t: float) -> list[list[Any]]:
    return [[f"m{(k * per + j) % DEVICES}", "v", float(k * per + j), t + j * 1e-4, "good"]
            for j in range(per)]  # fmt: skip


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    box = Outbox(tmp / "outbox", segment_bytes=16 << 20)
    n_records = int(args.outage * args.rate / args.per_record)
    t_start = time.time() - args.outage
    async with trio.open_nursery() as n:
        await n.start(box.run)
        t0 = time.perf_counter()
        k = 0
        while k < n_records:
            batch = None
            for _ in range(min(2000, n_records - k)):
                _, batch = box.append("telemetry", record(k, args.per_record,
                                      t_start + k * args.per_record / args.rate))  # fmt: skip
                k += 1
            assert batch is not None
            await box.commit(batch)
        prefill = time.perf_counter() - t0
        print(f"prefilled {n_records:,} records ({n_records * args.per_record:,} readings, "
              f"{box.bytes / 1e6:.0f} MB) in {prefill:.1f} s", flush=True)
        up = Uplink(box, args.cloud, "gw-d", args.key, batch=args.batch, interval=0.05)
        appended: dict[int, float] = {}
        lags: list[float] = []
        backlog_end = box.next_seq - 1
        done = trio.Event()
        t_drain = time.perf_counter()

        async def live() -> None:
            i = n_records
            nxt = time.perf_counter()
            while not done.is_set():
                seq, _ = box.append("telemetry", record(i, args.per_record, time.time()))
                appended[seq] = time.perf_counter()
                i += 1
                nxt += args.per_record / args.rate
                await trio.sleep(max(0.0, nxt - time.perf_counter()))

        async def watch() -> None:
            while True:
                now = time.perf_counter()
                for seq in [s for s in appended if s in up.covered]:
                    lags.append(now - appended.pop(seq))
                if up.covered.acked >= backlog_end and not done.is_set():
                    done.set()
                await trio.sleep(0.02)

        n.start_soon(live)
        n.start_soon(watch)
        await n.start(up.run)
        await done.wait()
        drain = time.perf_counter() - t_drain
        await trio.sleep(2.0)  # live lag after the drain
        n.cancel_scope.cancel()
    readings = n_records * args.per_record
    return {"readings": readings, "drain_s": drain, "rate": readings / drain,
            "ratio": readings / drain / args.rate, "lag_p50": pct(lags, 0.5),
            "lag_p99": pct(lags, 0.99), "lag_max": max(lags) if lags else float("nan"),
            "live_records": len(lags), "uploads": up.uploads}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=3600.0, help="seconds of outage")
    ap.add_argument("--rate", type=float, default=1000.0, help="readings per second")
    ap.add_argument("--per-record", type=int, default=10)
    ap.add_argument("--batch", type=int, default=5000, help="records per upload")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        folder = site(tmp / "site")
        state = tmp / "cloud"
        twin(state, "apply", str(folder))
        args.key = twin(state, "edge-key", "gw-d").strip().splitlines()[-1]
        port = free_port()
        log = open(tmp / "cloud.log", "wb")  # noqa: SIM115
        cloud = subprocess.Popen([sys.executable, "-m", "twin.cli", "--state-dir", str(state),
                                  "up", "--listen", f"127.0.0.1:{port}", "--no-mqtt",
                                  "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        args.cloud = f"http://127.0.0.1:{port}"
        try:
            trio.run(wait_http, f"{args.cloud}/api/v1/health")
            r = trio.run(bench, args, tmp)
        finally:
            cloud.terminate()
            cloud.wait(30)
            log.close()
    hour = 3600 * args.rate / r["rate"] / 60
    print(f"outage of {args.outage:.0f} s at {args.rate:.0f} readings/s: {r['readings']:,} "
          f"readings drained in {r['drain_s']:.1f} s = {r['rate']:,.0f} readings/s "
          f"({r['ratio']:.1f}x the production rate; a 1-hour outage: {hour:.1f} min, goal < 6), "
          f"{r['uploads']} uploads")
    print(f"live data during the drain: {r['live_records']} records, appended → acknowledged "
          f"p50 {r['lag_p50']:.2f} s, p99 {r['lag_p99']:.2f} s, max {r['lag_max']:.2f} s")


if __name__ == "__main__":
    main()
