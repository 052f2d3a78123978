"""Benchmark: HTTP ingest through the whole durable path (API -> WAL -> store).

    .venv/bin/python benchmarks/ingest/run.py [--devices 1000] [--seconds 10] [--procs 1] \
        [--conns 16] [--batches 1,10]

The engine runs in this process with the API and the time-series service (LanceDB in a
temporary state dir), as ``twin up`` runs them; ``--devices`` push-mode http devices, one
device key each. Load comes from ``--procs`` separate processes (the raw keep-alive HTTP/1.1
load generator of ``benchmarks/runtime/bench_api.py``). For each ``--batches`` value (readings
per request) it prints readings answered 2xx per second, request latency p50/p99, the engine's
CPU per 1,000 readings/s, and, after the writer's last flush, how many readings are in the
store (every acknowledged reading must be there). ``--batches`` 1 is hypercorn's per-request
cost plus the write-ahead log's group commit; larger batches share one commit among more
readings. Prints figures; no thresholds. The machine is shared: compare only back-to-back runs
and read the printed load average. ``--variants wal,nowal --repeat 2`` alternates the engine
with and without the write-ahead log in one command (the WAL's own cost, back to back);
``--servers hypercorn,door`` alternates hypercorn alone with the front door (issue 20).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks" / "runtime"))
sys.path.insert(0, str(ROOT))

from bench_api import collect, cpu_self, make_keys, pct, run_load  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    servers = [v.strip() for v in args.servers.split(",") if v.strip()]
    for r in range(args.repeat):
        for variant in variants:
            for server in servers:
                print(f"-- {variant}, {server} (run {r + 1} of {args.repeat})")
                await one_run(args, wal=variant != "nowal", door=server == "door")


async def one_run(args: argparse.Namespace, *, wal: bool, door: bool = True) -> None:
    from runtime.helpers import apply, fast_config, model, sim_device, site

    from twin.api import auth
    from twin.api.app import ApiSettings
    from twin.api.ratelimit import Rate
    from twin.api.server import ApiService
    from twin.registry import open_registry
    from twin.registry.base import DeviceKey
    from twin.runtime.engine import Engine
    from twin.runtime.timeseries_service import TimeSeriesService
    from twin.timeseries.base import Selector

    state = Path(tempfile.mkdtemp(prefix="twin-bench-ingest-"))
    reg = open_registry(None, state)
    names = [f"d{i:05d}" for i in range(args.devices)]
    hb = {"interval": "10s", "timeout": "600s"}
    apply(reg, site(), model(), *[sim_device(n, binding={"http": {}}, heartbeat=hb) for n in names])
    with mp.get_context("spawn").Pool(2) as pool:
        made = pool.map(make_keys, [names[i::8] for i in range(8)])
    keys: dict[str, str] = {}
    for part in made:
        for name, kid, secret, hashed in part:  # type: ignore[misc]
            reg.add_device_key(DeviceKey(kid, name, hashed, time.time()))
            keys[name] = f"{auth.KEY_PREFIX}{kid}_{secret}"
    big = Rate(1e9, 1e9)
    settings = ApiSettings(
        state_dir=state,
        rate_per_token=big,
        rate_per_client=big,
        rate_ingest_per_device=big,
        front_door=door,
    )
    ts = TimeSeriesService(**({} if wal else {"wal_enabled": False}))
    engine = Engine(
        reg,
        fast_config(state_dir=state, metrics_interval=3600, reload_interval=0.25),
        [ts, ApiService("127.0.0.1", 0, settings)],
    )
    print(
        f"{args.devices} http devices, {args.procs} load process(es) x {args.conns} connections, "
        f"state {state}; load average {os.getloadavg()[0]:.2f}"
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        info = engine.service_info["api"]
        host, port = "127.0.0.1", int(info["port"])
        jobs = [(f"/api/v1/ingest/{n}", keys[n]) for n in names]

        args.batch = 1
        procs, q, _ = run_load(host, port, jobs, args, "warm", 600)  # type: ignore[misc]
        await collect(procs, q)  # argon2 once per key, then the key cache
        if args.gc_freeze:  # as the edge agent does (twin/runtime/gc_freeze.py)
            from twin.runtime.gc_freeze import freeze

            print(f"gc: {freeze()} objects frozen")
        acked = args.devices  # warm-up: one reading per device
        for batch in [int(b) for b in args.batches.split(",")]:
            args.batch = batch
            load0 = os.getloadavg()[0]
            procs, q, start_at = run_load(host, port, jobs, args, "ingest", args.seconds)  # type: ignore[misc]
            await trio.sleep_until(trio.current_time() + (start_at - time.time()))
            c0 = cpu_self()
            lat, codes = await collect(procs, q)
            cpu = cpu_self() - c0
            ok = codes.get(200, 0)
            acked += ok * batch
            rate = ok * batch / args.seconds
            print(
                f"batch {batch:>3}: {rate:>8.0f} readings/s acknowledged; codes {codes}; "
                f"request p50 {pct(lat, 0.5) * 1000:.1f} ms p99 {pct(lat, 0.99) * 1000:.1f} ms; "
                f"engine {cpu / max(rate / 1000, 1e-9):.3f} core-s per 1,000 readings/s; "
                f"load average {load0:.2f}-{os.getloadavg()[0]:.2f}"
            )
        assert ts.writer is not None and ts.store is not None
        await ts.flush_barrier()
        await trio.sleep(ts.flush_interval * 2)
        store = ts.store
        stored = await trio.to_thread.run_sync(
            lambda: store.read_raw(Selector(), 0, time.time() + 3600).num_rows
        )
        print(f"acknowledged {acked} readings, {stored} in the store")
        wal = getattr(ts, "wal", None)
        if wal is not None:
            st = wal.stats()
            n = max(st["commits"], 1)
            print(
                f"write-ahead log: {st['commits']} group commits, "
                f"{st['records'] / n:.1f} requests per commit, "
                f"{st['commit_seconds'] / n * 1000:.2f} ms per commit (write + fdatasync, "
                f"worker thread round trip included)"
            )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--procs", type=int, default=1, help="load generator processes")
    ap.add_argument("--conns", type=int, default=16, help="keep-alive connections per process")
    ap.add_argument("--rate", type=float, default=0.0, help="total requests/s cap (0: max)")
    ap.add_argument("--batches", default="1,10", help="readings per request, one run each")
    ap.add_argument(
        "--variants",
        default="wal",
        help="wal (default), nowal (the same engine without the write-ahead log: its 2xx are "
        "not durable), or both alternating: wal,nowal",
    )
    ap.add_argument(
        "--servers",
        default="door",
        help="door (default: ingest answered by twin/api/frontdoor.py), hypercorn (hypercorn "
        "serves every request, the gatekeeper's ASGI ingest path), or both alternating: "
        "hypercorn,door",
    )
    ap.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() the engine's heap after the warm-up (full collections scan only what "
        "was allocated since)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant, alternating")
    trio.run(main, ap.parse_args())
