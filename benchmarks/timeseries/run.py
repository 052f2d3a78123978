"""Time-series benchmark: LanceDB and PostgreSQL stores vs InfluxDB 1.x, in one run.

    .venv/bin/python benchmarks/timeseries/run.py                       # 100 x 10 x 1000 = 1 M
    .venv/bin/python benchmarks/timeseries/run.py --devices 1000        # the issue's 10 M
    .venv/bin/python benchmarks/timeseries/run.py --backends lance,influx
    .venv/bin/python benchmarks/timeseries/run.py --shape realistic --devices 1000

Two data shapes (``--shape friendly``, ``realistic`` or ``both``, the default: both in one
run, side by side):

* friendly: DEVICES x METRICS series, TIMESTAMPS points each, one every --step seconds
  (default 90 s, so 1,000 timestamps span 25 h), aligned across series, values a random
  walk rounded to 0.01;
* realistic (issue 19): the same devices and metrics over the same span, but each series
  has its own phase and its own millisecond jitter (90 s +- up to 3 s; 1 % of the series
  report every 10 s), float metrics are full-precision float64 (random walks, sines with
  noise: not rounded), two metrics are monotonically increasing integer counters and one is
  a 0/1 state. ~10.8 M points at 1,000 devices.

Per backend:
* ingest points/s through the public write path (ours: ``BatchedWriter`` fed with readings
  one poll cycle at a time, with the engine's background ``Maintainer`` running beside it
  as in the time-series service, so LanceDB's clustering/compaction runs concurrently and
  is not skipped; the clock stops when the writer has stored every point, and the
  maintenance still in progress then is reported as ``ingest_maint_tail_s``; InfluxDB: line
  protocol over HTTP, 5,000 lines per request);
* bytes per point on disk after compaction (allocated blocks, as ``du``: st_blocks * 512,
  for every store; InfluxDB's ``_series`` files are preallocated and mostly empty);
* p50/p99 latency of one device/metric over 1 h and over 1 day (raw points);
* time to downsample one day of every series to 1-minute aggregates;
* a retention pass dropping the oldest 30 %: time and bytes reclaimed.

InfluxDB runs as a private ``influxd`` on free loopback ports with its data in a temp dir;
if ``influxd`` is missing the benchmark prints "influxd not found" and goes on. PostgreSQL
comes from --pg-url (default: TWIN_TEST_POSTGRES or postgresql://postgres@127.0.0.1:5432/test)
and is skipped if unreachable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import contextlib

from twin.timeseries.base import Record, Selector, TimeSeriesQuery
from twin.timeseries.retention import RetentionManager, RetentionPolicy
from twin.timeseries.writer import BatchedWriter, Maintainer

T0 = 1_700_006_400.0  # a day boundary


def dir_size(path: Path) -> int:
    """Allocated bytes under ``path`` (``du``): sparse and preallocated files count for
    what they occupy, not their length."""
    total = 0
    for root, _d, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


class Data:
    def __init__(self, devices: int, metrics: int, timestamps: int, step: float) -> None:
        self.devices = [f"dev{i:05d}" for i in range(devices)]
        self.metrics = [f"m{i:02d}" for i in range(metrics)]
        self.timestamps = timestamps
        self.step = step
        rng = np.random.default_rng(42)
        walk = np.cumsum(rng.normal(0, 0.1, size=(timestamps, devices * metrics)), axis=0) + 20
        self.values = np.round(walk, 2)
        self.points = devices * metrics * timestamps
        self.end = T0 + timestamps * step

    def cycles(self) -> Any:
        """One poll cycle (every series at one timestamp) at a time, as reading records."""
        for k in range(self.timestamps):
            ts = T0 + k * self.step
            row = self.values[k].tolist()
            i = 0
            cycle: list[Record] = []
            for d in self.devices:
                for m in self.metrics:
                    cycle.append((d, m, row[i], ts, 0, "bench", "g1", ","))
                    i += 1
            yield cycle


class RealisticData:
    """Issue 19's realistic shape (see the module docstring). Points are generated per
    series with numpy, then merged into time order and handed out in cycles of about one
    point per series, as pollers would deliver them."""

    FLOATS = 7  # m00..m06 float64; m07, m08 counters; m09 0/1

    def __init__(self, devices: int, metrics: int, timestamps: int, step: float) -> None:
        self.devices = [f"dev{i:05d}" for i in range(devices)]
        self.metrics = [f"m{i:02d}" for i in range(metrics)]
        self.step = step
        span = timestamps * step
        rng = np.random.default_rng(19)
        ts_parts, sid_parts, val_parts = [], [], []
        self.kinds: list[str] = []
        series = 0
        for _d in range(devices):
            for mi in range(metrics):
                fast = rng.random() < 0.01
                st = 10.0 if fast else step
                n = int(span / st)
                jitter = rng.uniform(0, 1.0 if fast else 3.0)
                ms = np.rint(
                    (rng.uniform(0, st) + np.arange(n) * st + rng.uniform(-jitter, jitter, n))
                    * 1000
                )
                ts_parts.append(T0 + np.sort(ms) / 1000)
                kind = (
                    "float"
                    if mi < min(self.FLOATS, metrics - 3) or metrics < 4
                    else ("counter" if mi < metrics - 1 else "bool")
                )
                if kind == "float":
                    if mi % 2:
                        v = 20 + np.cumsum(rng.normal(0, 0.05, n))
                    else:
                        v = (
                            50
                            + 10 * np.sin(np.arange(n) * st / 3600 + rng.uniform(0, 6))
                            + rng.normal(0, 0.2, n)
                        )
                elif kind == "counter":
                    v = np.cumsum(rng.integers(0, 200, n)).astype(np.float64)
                else:
                    v = ((rng.random(n) < 0.02).cumsum() % 2).astype(np.float64)
                val_parts.append(v)
                sid_parts.append(np.full(n, series, dtype=np.int32))
                self.kinds.append(kind)
                series += 1
        ts = np.concatenate(ts_parts)
        order = np.argsort(ts, kind="stable")
        self.ts = ts[order]
        self.sid = np.concatenate(sid_parts)[order]
        self.val = np.concatenate(val_parts)[order]
        self.points = len(self.ts)
        self.end = T0 + span
        self.timestamps = timestamps
        self.cycle = devices * metrics

    def cycles(self) -> Any:
        nm = len(self.metrics)
        is_int = np.array([k != "float" for k in self.kinds])
        for a in range(0, self.points, self.cycle):
            sid = self.sid[a : a + self.cycle].tolist()
            ts = self.ts[a : a + self.cycle].tolist()
            val = self.val[a : a + self.cycle]
            vals = [
                int(x) if i else x
                for x, i in zip(
                    val.tolist(), is_int[self.sid[a : a + self.cycle]].tolist(), strict=True
                )
            ]
            yield [
                (self.devices[s // nm], self.metrics[s % nm], v, t, 0, "bench", "g1", ",")
                for s, v, t in zip(sid, vals, ts, strict=True)
            ]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def time_queries(
    fn: Callable[[str, str, float, float], int], data: Data, span: float, n: int
) -> tuple[float, float, int]:
    rng = random.Random(7)
    lat = []
    rows = 0
    for _ in range(n):
        d, m = rng.choice(data.devices), rng.choice(data.metrics)
        start = T0 + rng.random() * max(0.0, data.end - T0 - span)
        t0 = time.perf_counter()
        rows += fn(d, m, start, start + span)
        lat.append((time.perf_counter() - t0) * 1000)
    return pct(lat, 50), pct(lat, 99), rows // n


# --- our stores ---------------------------------------------------------------------------


def bench_ours(
    name: str, store: Any, size_fn: Callable[[], int], data: Data, args: argparse.Namespace
) -> dict[str, Any]:
    res: dict[str, Any] = {}

    async def ingest() -> float:
        # what the engine's time-series service runs: the writer + background maintenance
        m = Maintainer(store)
        w = BatchedWriter(
            store,
            batch_size=args.batch,
            flush_interval=1.0,
            max_chunks=8,
            on_flush=lambda _n: m.poke(),
        )
        frags: list[int] = []
        count = getattr(store, "fragment_count", None)
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            await n.start(m.run)
            await n.start(w.run)
            for k, cycle in enumerate(data.cycles()):
                await w.write_many(cycle)
                if count is not None and k % 50 == 0:
                    frags.append(count())
            await w.aclose()
            secs = time.perf_counter() - t0
            n.cancel_scope.cancel()  # waits for a maintenance in progress
        res["ingest_maint_tail_s"] = time.perf_counter() - t0 - secs
        res["ingest_maint_runs"] = m.runs
        res["ingest_maint_s"] = m.seconds
        if frags:
            res["ingest_max_fragments"] = max(frags)
        return secs

    secs = trio.run(ingest)
    res["ingest_pps"] = data.points / secs
    # the closed windows all in chunks, as the engine's Maintainer leaves them after its
    # next passes (one pass moves at most ``compact_rows`` points: a single reclaim left
    # 0-3 M points in the row layout depending on how far the ingest's maintenance got,
    # which moved bytes/point by ~0.15 and the 1 h p50 by ~1 ms between runs)
    compact = getattr(store, "compact_chunks", None)
    t0 = time.perf_counter()
    tail = 0
    while compact is not None:
        moved = compact(force=True)
        tail += moved
        if not moved:
            break
    res["compact_tail_points"] = tail
    res["compact_tail_s"] = time.perf_counter() - t0
    # (LanceDB: the maintenance also merges each closed day's rows of a series into one)
    t0 = time.perf_counter()
    store.reclaim()
    res["reclaim_s"] = time.perf_counter() - t0
    res["bytes_per_point"] = size_fn() / data.points

    def q(d: str, m: str, a: float, b: float) -> int:
        return int(store.query(TimeSeriesQuery(a, b, Selector.of(devices=d, metrics=m))).num_rows)

    q("dev00000", "m00", T0, T0 + 3600)  # warm up
    res["q1h_p50"], res["q1h_p99"], res["q1h_rows"] = time_queries(q, data, 3600, args.queries)
    res["q1d_p50"], res["q1d_p99"], res["q1d_rows"] = time_queries(q, data, 86400, args.queries)
    resize = getattr(store, "resize_chunk_cache", None)
    if resize is not None:
        # the same queries with no chunk-row cache (a restarted engine's first read of a
        # series, or a store larger than the cache): every read takes its rows from Lance
        resize(0)
        res["q1h_cold_p50"], res["q1h_cold_p99"], _ = time_queries(q, data, 3600, args.queries)
        res["q1d_cold_p50"], res["q1d_cold_p99"], _ = time_queries(q, data, 86400, args.queries)
        resize(128 * 1024 * 1024)

    # downsample one day of every series to 1-minute partials
    pol = RetentionPolicy.from_doc(
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": "bench"},
            "spec": {
                "tiers": [{"resolution": "raw", "keep": "inf"}, {"resolution": "1m", "keep": "inf"}]
            },
        }
    )
    mgr = RetentionManager(store, [pol])
    # where a rollup's time goes: reading + bucketing (+ encoding) vs writing the tier (the
    # LanceDB store's ``rollup`` runs ``_rollup_raw_chunks`` or ``_partials``, then
    # ``_replace_tier``)
    if hasattr(store, "_replace_tier"):
        read_fns, write_fn = ["_rollup_raw_chunks", "_partials"], "_replace_tier"
    else:
        read_fns, write_fn = ["aggregate"], "replace_partials"
    spent = dict.fromkeys([*read_fns, write_fn], 0.0)
    originals = {k: getattr(store, k) for k in spent}

    def timed(name: str) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return originals[name](*a, **k)
            finally:
                spent[name] += time.perf_counter() - t

        return call

    for k in spent:
        setattr(store, k, timed(k))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        rolled = mgr.downsample(now=T0 + 86400)
    finally:
        for k, fn in originals.items():
            setattr(store, k, fn)
    res["downsample_s"] = time.perf_counter() - t0
    res["downsample_cpu_s"] = time.process_time() - c0
    res["downsample_read_bucket_s"] = sum(spent[k] for k in read_fns)
    res["downsample_write_s"] = spent[write_fn]
    res["downsample_rows"] = sum(rolled.values())

    # retention: drop the oldest 30 % of raw
    cutoff = T0 + 0.3 * (data.end - T0)
    before = size_fn()
    t0 = time.perf_counter()
    dropped = store.delete_before("raw", Selector(), cutoff)
    store.reclaim()
    res["retention_s"] = time.perf_counter() - t0
    res["retention_dropped"] = dropped
    res["reclaimed_bytes"] = before - size_fn()
    return res


# --- InfluxDB -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Influx:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        conf = root / "influxdb.conf"
        conf.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{free_port()}"
[meta]
  dir = "{root}/meta"
[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "2s"
  compact-full-write-cold-duration = "5s"
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
"""
        )
        self.proc = subprocess.Popen(
            ["influxd", "run", "-config", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                self.get("/ping")
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("influxd did not start")
        self.query("CREATE DATABASE bench")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def get(self, path: str) -> bytes:
        c = self.conn()
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return body

    def query(self, q: str, db: str = "bench") -> Any:
        c = self.conn()
        body = urllib.parse.urlencode({"q": q, "db": db, "epoch": "s"})
        c.request("POST", "/query", body, {"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        out = json.loads(r.read() or b"{}")
        c.close()
        if r.status != 200:
            raise RuntimeError(f"influx query failed: {out}")
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def wait_compacted(self, limit: float = 60.0) -> int:
        """Size of data+wal once it has stopped changing for 5 s (or after ``limit``)."""
        deadline = time.time() + limit
        last, stable_since = -1, time.time()
        while time.time() < deadline:
            size = dir_size(self.root / "data") + dir_size(self.root / "wal")
            if size != last:
                last, stable_since = size, time.time()
            elif time.time() - stable_since >= 5:
                break
            time.sleep(0.5)
        return last


def bench_influx(data: Data, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    inf = Influx(root)
    res: dict[str, Any] = {}
    try:
        c = inf.conn()
        lines: list[str] = []
        t0 = time.perf_counter()

        def send() -> None:
            c.request("POST", "/write?db=bench&precision=ms", "\n".join(lines).encode())
            r = c.getresponse()
            r.read()
            if r.status != 204:
                raise RuntimeError(f"influx write failed: {r.status}")
            lines.clear()

        for cycle in data.cycles():
            for d, m, v, ts, _q, _s, _g, _t in cycle:
                # ints as integer fields; floats by repr (shortest exact form)
                val = f"{v}i" if type(v) is int else repr(v)
                lines.append(f"{m},device={d} value={val} {round(ts * 1000)}")
                if len(lines) >= 5000:
                    send()
        if lines:
            send()
        res["ingest_pps"] = data.points / (time.perf_counter() - t0)
        c.close()
        res["bytes_per_point"] = inf.wait_compacted() / data.points

        def q(d: str, m: str, a: float, b: float) -> int:
            out = inf.query(
                f"SELECT value FROM {m} WHERE device = '{d}' AND time >= {int(a)}s AND time < {int(b)}s"
            )
            series = out["results"][0].get("series", [])
            return len(series[0]["values"]) if series else 0

        q("dev00000", "m00", T0, T0 + 3600)
        res["q1h_p50"], res["q1h_p99"], res["q1h_rows"] = time_queries(q, data, 3600, args.queries)
        res["q1d_p50"], res["q1d_p99"], res["q1d_rows"] = time_queries(q, data, 86400, args.queries)

        # each metric into its own measurement: one INTO for all (``FROM /m.*/``) made
        # metrics of the same device and minute overwrite each other (issue 19)
        t0 = time.perf_counter()
        for m in [] if args.skip_influx_downsample else data.metrics:
            inf.query(
                "SELECT mean(value), min(value), max(value), count(value) "
                f"INTO bench.autogen.rollup_1m_{m} FROM {m} "
                f"WHERE time >= {int(T0)}s AND time < {int(T0 + 86400)}s GROUP BY time(1m), *"
            )
        if not args.skip_influx_downsample:
            res["downsample_s"] = time.perf_counter() - t0

        cutoff = T0 + 0.3 * (data.end - T0)
        before = inf.wait_compacted(limit=30)
        t0 = time.perf_counter()
        for m in data.metrics:
            inf.query(f"DELETE FROM {m} WHERE time < {int(cutoff)}s")
        res["retention_s"] = time.perf_counter() - t0
        res["reclaimed_bytes"] = before - inf.wait_compacted(limit=30)
    finally:
        inf.close()
    return res


# --- main --------------------------------------------------------------------------------

ROWS = [
    ("ingest points/s", "ingest_pps", "{:,.0f}", "higher"),
    ("bytes/point after compaction", "bytes_per_point", "{:.2f}", "lower"),
    ("1 series 1 h  p50 ms", "q1h_p50", "{:.2f}", "lower"),
    ("1 series 1 h  p99 ms", "q1h_p99", "{:.2f}", "lower"),
    ("1 series 1 d  p50 ms", "q1d_p50", "{:.2f}", "lower"),
    ("1 series 1 d  p99 ms", "q1d_p99", "{:.2f}", "lower"),
    # ours with the chunk-row cache emptied and off (ratios against InfluxDB's figure above)
    ("  no cache: 1 h p50 ms", "q1h_cold_p50", "{:.2f}", "lower"),
    ("  no cache: 1 d p50 ms", "q1d_cold_p50", "{:.2f}", "lower"),
    ("downsample 1 day to 1m, s", "downsample_s", "{:.2f}", "lower"),
    ("retention drop 30 %, s", "retention_s", "{:.2f}", "lower"),
    ("bytes reclaimed", "reclaimed_bytes", "{:,.0f}", "higher"),
]


def run_shape(
    shape: str, data: Any, args: argparse.Namespace, load: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    with tempfile.TemporaryDirectory(prefix="ts-bench-") as tmp:
        root = Path(tmp)
        if "lance" in backends:
            from twin.timeseries.lance import LanceStore

            path = root / "lance"
            store = LanceStore(path, compact_every=32, min_free_bytes=0)
            print(f"[{shape}] lance: running ...", flush=True)
            # the raw tier: the row table, the chunk table and the store's metadata
            results["lance"] = bench_ours("lance", store, lambda: dir_size(path), data, args)
            print(f"[{shape}] lance: {json.dumps(results['lance'])}", flush=True)
            load(f"{shape}, after lance")
        if "postgres" in backends:
            try:
                from twin.timeseries.postgres import PostgresStore

                pg = PostgresStore(args.pg_url, prefix=f"bench{os.getpid()}_")
            except Exception as exc:
                print(f"postgres: skipped ({exc})")
            else:
                print(f"[{shape}] postgres: running ... (timescaledb: {pg.timescale})", flush=True)
                try:
                    results["postgres"] = bench_ours(
                        "postgres",
                        pg,
                        lambda: next((t.bytes for t in pg.stats().tiers if t.tier == "raw"), 0),
                        data,
                        args,
                    )
                    print(f"[{shape}] postgres: {json.dumps(results['postgres'])}", flush=True)
                    load(f"{shape}, after postgres")
                finally:
                    pg.drop_all()
                    pg.close()
        if "influx" in backends:
            if shutil.which("influxd") is None:
                print("influxd not found: skipping InfluxDB (apt-get install influxdb)")
            else:
                print(f"[{shape}] influx: running ...", flush=True)
                (root / "influx").mkdir()
                results["influx"] = bench_influx(data, args, root / "influx")
                print(f"[{shape}] influx: {json.dumps(results['influx'])}", flush=True)
                load(f"{shape}, after influx")
    return results


def print_table(shape: str, results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    ref = "influx" if "influx" in results else None
    header = f"{shape:32}" + "".join(f"{n:>16}" for n in names)
    if ref:
        header += "".join(f"{n + '/influx':>18}" for n in names if n != ref)
    print()
    print(header)
    print("-" * len(header))
    for label, key, fmt, _better in ROWS:
        line = f"{label:32}"
        for n in names:
            v = results[n].get(key)
            line += f"{fmt.format(v) if v is not None else '-':>16}"
        if ref:
            for n in names:
                if n == ref:
                    continue
                a, b = results[n].get(key), results[ref].get(key.replace("_cold", ""))
                ratio = (
                    a / b if a is not None and b not in (None, 0) and not math.isnan(b) else None
                )
                line += f"{(f'{ratio:.2f}x') if ratio is not None else '-':>18}"
        print(line)
    extras = {
        n: {
            k: v
            for k, v in r.items()
            if k.endswith("rows")
            or k == "retention_dropped"
            or (k.startswith("ingest_") and k != "ingest_pps")
            or k.startswith(("compact_", "reclaim_"))
        }
        for n, r in results.items()
    }
    print(
        "\nrows per query / rolled-up rows / dropped / background maintenance during ingest"
        " / compaction after it:",
        json.dumps(extras),
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--metrics", type=int, default=10)
    ap.add_argument("--timestamps", type=int, default=1000)
    ap.add_argument("--step", type=float, default=90.0, help="seconds between timestamps")
    ap.add_argument("--shape", choices=("friendly", "realistic", "both"), default="both")
    ap.add_argument("--batch", type=int, default=50_000, help="writer batch size (points)")
    ap.add_argument("--queries", type=int, default=50, help="queries per latency figure")
    ap.add_argument("--backends", default="lance,postgres,influx")
    ap.add_argument(
        "--skip-influx-downsample",
        action="store_true",
        help="InfluxDB's one-day rollup takes minutes at 10 M points (14 min at load 12)",
    )
    ap.add_argument(
        "--pg-url",
        default=os.environ.get("TWIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    args = ap.parse_args()

    loads: list[str] = []

    def load(label: str) -> None:
        # the machine is shared: every figure is noted with the load it was taken under
        one, five, fifteen = os.getloadavg()
        loads.append(f"{label} {one:.2f}/{five:.2f}/{fifteen:.2f}")
        print(f"load average {loads[-1]}", flush=True)

    shapes = ["friendly", "realistic"] if args.shape == "both" else [args.shape]
    all_results: dict[str, dict[str, dict[str, Any]]] = {}
    load("start")
    for shape in shapes:
        cls = Data if shape == "friendly" else RealisticData
        data: Any = cls(args.devices, args.metrics, args.timestamps, args.step)
        span_h = (data.end - T0) / 3600
        print(
            f"[{shape}] {args.devices} devices x {args.metrics} metrics = {data.points:,} points "
            f"over {span_h:.1f} h (step {args.step:g} s); writer batch {args.batch:,}",
            flush=True,
        )
        all_results[shape] = run_shape(shape, data, args, load)
        del data

    for shape, results in all_results.items():
        print_table(shape, results)
    if len(all_results) > 1:
        names = sorted({n for r in all_results.values() for n in r})
        cols = [(sh, n) for sh in all_results for n in names if n in all_results[sh]]
        print()
        head = f"{'side by side':32}" + "".join(f"{(sh[:4] + ' ' + n):>18}" for sh, n in cols)
        print(head)
        print("-" * len(head))
        for label, key, fmt, _b in ROWS:
            line = f"{label:32}"
            for sh, n in cols:
                v = all_results[sh][n].get(key)
                line += f"{fmt.format(v) if v is not None else '-':>18}"
            print(line)
    print("load average (1/5/15 min):", "; ".join(loads))


if __name__ == "__main__":
    main()
