"""Benchmark: engine start with N simulated devices, and heartbeat-timeout lateness.

    .venv/bin/python benchmarks/runtime/bench_start.py [--devices 10000] [--timeout 5]

Applies N sim devices (one revision) to a temporary registry, then times ``Engine.run`` until
it reports readiness and until every device task runs (the controller's nursery holds a task
per device). Then the sim devices are paused (their binding stops sending) and every device
must go offline at last_seen + timeout: prints how late the engine noticed (p50, p99, max).
No thresholds.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(args: argparse.Namespace) -> None:
    from runtime.helpers import apply, fast_config, model, sim_device, site

    from twin.registry import open_registry
    from twin.runtime.bus import Filter
    from twin.runtime.engine import Engine

    state = Path(tempfile.mkdtemp(prefix="twin-bench-start-"))
    reg = open_registry(None, state)
    names = [f"d{i:05d}" for i in range(args.devices)]
    hb = {"interval": "1s", "timeout": f"{args.timeout:g}s"}
    devs = [sim_device(n, interval=f"{args.interval:g}s", heartbeat=hb) for n in names]
    t0 = time.perf_counter()
    apply(reg, site(), model(), *devs)
    print(f"apply {args.devices} devices: {time.perf_counter() - t0:.2f}s")
    engine = Engine(reg, fast_config(state_dir=state, metrics_interval=3600))
    async with trio.open_nursery() as nursery:
        t0, c0 = time.perf_counter(), cpu_self()
        await nursery.start(engine.run)
        up = time.perf_counter() - t0
        while any(t.binding is None for t in engine.controller.tasks.values()):  # noqa: ASYNC110
            await trio.sleep(0.01)
        running = time.perf_counter() - t0
        print(
            f"engine start with {args.devices} sim devices: ready {up:.2f}s, every device task "
            f"running {running:.2f}s (engine CPU {cpu_self() - c0:.2f}s)"
        )
        # wait until every device was seen once, then stop all sims and watch timeouts
        with trio.move_on_after(args.interval * 3 + 30):
            while any(t.last_seen is None for t in engine.twins.all()):  # noqa: ASYNC110
                await trio.sleep(0.05)
        online = sum(1 for t in engine.twins.all() if t.last_seen is not None)
        print(f"devices seen: {online}/{args.devices} after {time.perf_counter() - t0:.2f}s")
        await engine.writer.flushed()
        late: list[float] = []
        with engine.bus.subscribe(Filter.of(kinds=["status"]), buffer=args.devices * 4) as sub:
            for task in engine.controller.tasks.values():
                binding = task.binding
                if binding is not None and hasattr(binding, "paused"):
                    binding.paused = True
            # last_seen after the pause (a reading already in flight may still land)
            await trio.sleep(0.2)
            pending = {t.name: t for t in engine.twins.all() if t.last_seen}
            seen_at = {n: t.last_seen for n, t in pending.items()}
            with trio.move_on_after(args.timeout + 30):
                async for ev in sub.receive:
                    if ev["status"] != "offline" or ev["device"] not in pending:
                        continue
                    twin = pending.pop(ev["device"])
                    last = twin.last_seen or seen_at[ev["device"]]
                    late.append(ev["ts"] - (last + args.timeout))
                    if not pending:
                        break
        print(
            f"heartbeat timeout ({args.timeout:g}s) of {len(late)}/{args.devices} devices "
            f"detected late by p50 {pct(late, 0.5) * 1000:.0f} ms, p99 "
            f"{pct(late, 0.99) * 1000:.0f} ms, max {max(late, default=float('nan')) * 1000:.0f} ms"
        )
        nursery.cancel_scope.cancel()
    reg.close()
    print(f"(pid {os.getpid()}, load average {os.getloadavg()}, state {state})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=5.0, help="sim reading interval, s")
    ap.add_argument("--timeout", type=float, default=15.0, help="heartbeat timeout, s")
    trio.run(main, ap.parse_args())
