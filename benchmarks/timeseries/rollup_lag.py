"""Rollup lag through the real engine path: devices → bus → pump → BatchedWriter → store →
the prompt rollup loop of ``TimeSeriesService``.

    .venv/bin/python benchmarks/timeseries/rollup_lag.py                   # 130 s, 1,000 series
    .venv/bin/python benchmarks/timeseries/rollup_lag.py --duration 600 --tiers 1m,5m
    .venv/bin/python benchmarks/timeseries/rollup_lag.py --source feed --series 5000

An ``Engine`` (SQLite registry in a temp state dir) runs one ``RetentionPolicy`` over the
bench site with ``--tiers`` (default ``10s,1m``) and a ``TimeSeriesService`` storing in LanceDB
(or ``--store postgresql://...``). Readings come from ``--series / 10`` simulated devices with
10 points each at ``--rate`` Hz (``--source sim``, the whole binding path), or are published
straight onto the engine's bus (``--source feed``). After ``--duration`` seconds of real time it
prints, per tier:

* ``close→tier``: for every window that closed during the run, how long after its end it was
  in the tier (the watermark passed it), observed every 0.1 s: p50 and max. This is the lag a
  dashboard sees; the issue's goal is under a minute.
* ``lag gauge``: ``twin_timeseries_rollup_lag_seconds`` sampled every 0.1 s (how long the
  oldest closed, not rolled-up window has waited; 0 when current): p50 and max.
* ``wm age``: ``now - watermark`` sampled likewise (includes the open window, so it is at
  least the resolution just before a window closes).
* ``complete``: the tier's counts over everything rolled up equal the raw rows of that range.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twin.registry import open_registry
from twin.runtime.engine import Engine, EngineConfig
from twin.runtime.timeseries_service import TimeSeriesService
from twin.spec.units import parse_duration
from twin.timeseries.base import Selector

SITE = "bench"
POINTS = 10


def docs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "flux.iot/v1",
            "kind": "Site",
            "metadata": {"name": SITE},
            "spec": {"title": "rollup lag bench", "timezone": "UTC"},
        },
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": "bench", "site": SITE},
            "spec": {
                "select": {"site": SITE},
                "tiers": [{"resolution": "raw", "keep": "1d"}]
                + [{"resolution": t, "keep": "30d"} for t in args.tiers.split(",")],
            },
        },
    ]
    if args.source == "sim":
        out.append(
            {
                "apiVersion": "flux.iot/v1",
                "kind": "DeviceModel",
                "metadata": {"name": "bench-sensor"},
                "spec": {
                    "telemetry": {f"m{i}": {"type": "number"} for i in range(POINTS)},
                },
            }
        )
        interval = f"{round(1000 / args.rate)}ms"
        for d in range(args.series // POINTS):
            out.append(
                {
                    "apiVersion": "flux.iot/v1",
                    "kind": "Device",
                    "metadata": {"name": f"dev-{d:05d}", "site": SITE},
                    "spec": {
                        "type": "sensor",
                        "model": "bench-sensor",
                        "binding": {
                            "sim": {
                                "interval": interval,
                                "seed": d,
                                "points": {
                                    f"m{i}": {"wave": "random_walk", "min": 0, "max": 100}
                                    for i in range(POINTS)
                                },
                            }
                        },
                        "heartbeat": {"interval": "10s", "timeout": "60s"},
                    },
                }
            )
    return out


async def feed(engine: Engine, args: argparse.Namespace) -> None:
    """``--series`` readings every 1/rate s straight onto the bus (no bindings)."""
    period = 1.0 / args.rate
    nxt = trio.current_time()
    i = 0
    while True:
        now = time.time()
        for s in range(args.series):
            engine.bus.publish(
                {
                    "kind": "reading",
                    "device": f"dev-{s // POINTS:05d}",
                    "site": SITE,
                    "groups": (),
                    "point": f"m{s % POINTS}",
                    "value": float((i + s) % 100),
                    "ts": now,
                    "quality": "good",
                }
            )
            if s % 500 == 499:
                await trio.lowlevel.checkpoint()
        i += 1
        nxt += period
        await trio.sleep_until(nxt)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rollup-lag-"))
    state = tmp / "state"
    registry = open_registry(None, state)
    head = registry.head()
    registry.apply(
        {(d["kind"], d["metadata"]["name"]): d for d in docs(args)},
        base=head.number if head else 0,
        author="bench",
    )
    service = TimeSeriesService(
        url=args.store,
        flush_interval=args.flush_interval,
        rollup_lateness=args.lateness,
        retention_interval=60.0,
        monitor_interval=3600.0,
    )
    engine = Engine(registry, EngineConfig(state_dir=state), [service])
    res = {t: parse_duration(t) for t in args.tiers.split(",")}
    names = {t: f"agg_{int(r)}s" for t, r in res.items()}
    delays: dict[str, list[float]] = {t: [] for t in res}
    lag_samples: dict[str, list[float]] = {t: [] for t in res}
    age_samples: dict[str, list[float]] = {t: [] for t in res}
    first_wm: dict[str, float] = {}
    last_wm: dict[str, float] = {}
    started = time.time()
    print(
        f"rollup lag: {args.series} series at {args.rate:g} Hz ({args.source}), tiers "
        f"{args.tiers}, lateness {args.lateness:g}s, writer flush {args.flush_interval:g}s, "
        f"{args.duration:g}s of real time, store {args.store or 'lance'}",
        flush=True,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        if args.source == "feed":
            nursery.start_soon(feed, engine, args)
        deadline = trio.current_time() + args.duration
        next_report = time.time() + 30
        while trio.current_time() < deadline:
            await trio.sleep(0.1)
            now = time.time()
            by_tier = {e["tier"]: e for e in service.rollup_lags(now)}
            for t, name in names.items():
                e = by_tier.get(name)
                if e is None or e["watermark"] is None:
                    continue
                wm = float(e["watermark"])
                lag_samples[t].append(float(e["lag_s"]))
                age_samples[t].append(float(e["watermark_age_s"]))
                prev = last_wm.get(t)
                if prev is None:
                    first_wm[t] = wm
                elif wm > prev:
                    # every window end in (prev, wm] became available now; only windows
                    # that closed after the start count (earlier ones were never waiting)
                    end = prev + res[t]
                    while end <= wm + 1e-9:
                        if end > started:
                            delays[t].append(now - end)
                        end += res[t]
                last_wm[t] = wm
            if now >= next_report:
                next_report = now + 30
                w = service.writer
                print(
                    f"  {now - started:5.0f}s  stored {w.points_written if w else 0:,}  "
                    + "  ".join(
                        f"{t}: lag {lag_samples[t][-1] if lag_samples[t] else math.nan:.1f}s"
                        for t in res
                    ),
                    flush=True,
                )
        nursery.cancel_scope.cancel()
    written = service.writer.points_written if service.writer else 0
    print(f"stored {written:,} points ({written / args.duration:,.0f}/s)")
    complete: dict[str, str] = {}
    from twin.timeseries.factory import open_store

    reopened = open_store(args.store, state)
    try:
        for t, name in names.items():
            if t not in first_wm:
                complete[t] = "-"
                continue
            lo, hi = first_wm[t], last_wm[t]
            tier_n = sum(
                reopened.aggregate(name, Selector(), lo, hi, res[t]).column("count").to_pylist()
            )
            raw_n = reopened.read_raw(Selector(), lo, hi).num_rows
            complete[t] = "yes" if tier_n == raw_n else f"NO ({tier_n} vs {raw_n} raw)"
    finally:
        reopened.close()
    print()
    print(
        f"{'tier':>6} {'windows':>8} {'close→tier p50':>15} {'max':>7} {'lag gauge p50':>14} "
        f"{'max':>7} {'wm age p50':>11} {'max':>7} {'complete':>9}"
    )
    ok = True
    for t in res:
        d, g, a = delays[t], lag_samples[t], age_samples[t]
        print(
            f"{t:>6} {len(d):>8} {pct(d, 0.5):>14.2f}s {pct(d, 1.0):>6.2f}s "
            f"{pct(g, 0.5):>13.2f}s {pct(g, 1.0):>6.2f}s {pct(a, 0.5):>10.2f}s "
            f"{pct(a, 1.0):>6.2f}s {complete.get(t, '-'):>9}"
        )
        if d and max(d) >= 60:
            ok = False
        if complete.get(t, "yes") not in ("yes", "-"):
            ok = False
    mean_rollup = (service.last_rollup or {}).get("seconds")
    if mean_rollup is not None:
        print(f"last rollup run took {mean_rollup:.3f}s")
    if not any(delays.values()):
        print("no window closed during the run: make --duration longer than a tier")
    print("goal: close→tier under 60 s —", "met" if ok else "NOT met")
    registry.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=130.0, help="seconds of real time")
    ap.add_argument("--series", type=int, default=1000, help="series (10 per device)")
    ap.add_argument("--rate", type=float, default=1.0, help="readings per series per second")
    ap.add_argument("--tiers", default="10s,1m", help="tier resolutions after raw")
    ap.add_argument("--lateness", type=float, default=5.0, help="rollup lateness (s)")
    ap.add_argument("--flush-interval", type=float, default=1.0, help="writer flush (s)")
    ap.add_argument("--source", choices=["sim", "feed"], default="sim")
    ap.add_argument("--store", default=None, help="None: LanceDB; or postgresql://...")
    args = ap.parse_args()
    if args.series % POINTS:
        ap.error(f"--series must be a multiple of {POINTS}")
    return trio.run(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
