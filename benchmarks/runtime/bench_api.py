"""Benchmark: HTTP ingest readings/s and GET /api/v1/devices with N devices.

    .venv/bin/python benchmarks/runtime/bench_api.py [--devices 10000] [--seconds 10] [--clients 32]

Starts an engine + API on a free port in this process (a temporary state dir), N push-mode
http devices, one device key each; clients post readings round-robin over devices, then time
GET /api/v1/devices?limit=100 (sorted, paginated). Prints figures; no thresholds.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from runtime.helpers import apply, fast_config, model, sim_device, site

from twin.api import auth
from twin.api.app import ApiSettings
from twin.api.ratelimit import Rate
from twin.api.server import ApiService
from twin.registry import open_registry
from twin.runtime.engine import Engine


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


async def main(args: argparse.Namespace) -> None:
    state = Path(tempfile.mkdtemp(prefix="twin-bench-"))
    reg = open_registry(None, state)
    devs = [
        sim_device(
            f"d{i:05d}", binding={"http": {}}, heartbeat={"interval": "10s", "timeout": "60s"}
        )
        for i in range(args.devices)
    ]
    t0 = time.perf_counter()
    apply(reg, site(), model(), *devs)
    print(f"apply {args.devices} devices: {time.perf_counter() - t0:.2f}s")
    reg.put_user(auth.make_user("bench", "benchmark-pw", "admin"))
    keys = {}
    for i in range(min(args.devices, args.keyed)):
        name = f"d{i:05d}"
        _, keys[name] = auth.create_device_key(reg, name)
    big = Rate(1e9, 1e9)
    settings = ApiSettings(
        state_dir=state, rate_per_token=big, rate_per_client=big, rate_ingest_per_device=big
    )
    engine = Engine(
        reg,
        fast_config(state_dir=state, metrics_interval=3600),
        [ApiService("127.0.0.1", 0, settings)],
    )
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        await nursery.start(engine.run)
        print(f"engine start with {args.devices} devices: {time.perf_counter() - t0:.2f}s")
        url = engine.service_info["api"]["url"]
        user = reg.get_user("bench")
        token = auth.issue_access_token(auth.load_secret(state), user)
        names = list(keys)
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:

            async def warm(name: str) -> None:
                await c.post(
                    f"/api/v1/ingest/{name}", headers={"X-Device-Key": keys[name]}, json={}
                )

            async with trio.open_nursery() as n:
                for name in names:
                    n.start_soon(warm, name)
        print(f"warm-up: argon2 verification of {len(names)} keys: {time.perf_counter() - t0:.2f}s")
        sent = 0
        lat: list[float] = []
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        deadline = time.perf_counter() + args.seconds

        async def client(k: int) -> None:
            nonlocal sent
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                i = k
                while time.perf_counter() < deadline:
                    name = names[i % len(names)]
                    i += args.clients
                    s = time.perf_counter()
                    r = await c.post(
                        f"/api/v1/ingest/{name}",
                        headers={"X-Device-Key": keys[name]},
                        json={"values": {"temperature": 20.0 + i % 10}},
                    )
                    lat.append(time.perf_counter() - s)
                    if r.status_code == 200:
                        sent += 1

        async with trio.open_nursery() as n:
            for k in range(args.clients):
                n.start_soon(client, k)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        rate = sent / args.seconds
        print(
            f"ingest: {sent} readings in {args.seconds}s = {rate:.0f} readings/s over {args.clients} "
            f"connections (keys verified and cached); "
            f"request p50 {pct(lat, 0.5) * 1000:.1f} ms, p99 {pct(lat, 0.99) * 1000:.1f} ms; "
            f"CPU (server+clients, one process) {cpu / max(rate / 1000, 1e-9) / args.seconds:.2f} s "
            f"per 1000 readings/s"
        )
        received = sum(t.metrics.messages_in for t in engine.twins.all())
        print(f"engine processed {received} messages")

        gl: list[float] = []
        async with httpx.AsyncClient(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}
        ) as c:
            t0 = time.perf_counter()
            n_req = args.gets
            for i in range(n_req):
                s = time.perf_counter()
                r = await c.get(
                    "/api/v1/devices", params={"limit": 100, "offset": (i * 100) % args.devices}
                )
                gl.append(time.perf_counter() - s)
                assert r.status_code == 200 and r.json()["total"] == args.devices
            el = time.perf_counter() - t0
            print(
                f"GET /api/v1/devices?limit=100 with {args.devices} devices: {n_req / el:.0f} req/s "
                f"(1 connection), p50 {pct(gl, 0.5) * 1000:.1f} ms, p99 {pct(gl, 0.99) * 1000:.1f} ms"
            )
            gl.clear()
            for _ in range(50):
                s = time.perf_counter()
                r = await c.get(
                    "/api/v1/devices", params={"limit": 100, "sort": "-status", "site": "plant-a"}
                )
                gl.append(time.perf_counter() - s)
            print(
                f"GET /api/v1/devices?sort=-status&site=plant-a: p50 {pct(gl, 0.5) * 1000:.1f} ms, "
                f"p99 {pct(gl, 0.99) * 1000:.1f} ms"
            )
        nursery.cancel_scope.cancel()
    reg.close()
    print(f"(pid {os.getpid()}, state {state})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument(
        "--keyed", type=int, default=200, help="devices that post (each key costs argon2 once)"
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--gets", type=int, default=300)
    trio.run(main, ap.parse_args())
