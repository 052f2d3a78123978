"""Overhead of the asyncio↔Trio bridge (twin/bindings/aio.py) per call, against the same
coroutine awaited on plain asyncio, in one run.

    python benchmarks/protocols/bridge.py [--calls 20000]

Sequential: one caller, ``await aio.run(lambda: asyncio.sleep(0))`` N times (round-trip
latency). Concurrent: 10 Trio tasks doing the same (throughput). The asyncio baseline runs the
same number of ``await asyncio.sleep(0)`` in one asyncio loop (sequential and 10 tasks).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import trio

from twin.bindings import aio


def asyncio_baseline(n: int, conc: int) -> tuple[float, float]:
    async def worker(k: int) -> None:
        for _ in range(k):
            await asyncio.sleep(0)

    async def main() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(n // conc) for _ in range(conc)))
        return time.perf_counter() - t0, time.process_time() - c0

    return asyncio.run(main())


def bridged(n: int, conc: int) -> tuple[float, float]:
    async def worker(k: int) -> None:
        for _ in range(k):
            await aio.run(lambda: asyncio.sleep(0))

    async def main() -> tuple[float, float]:
        await aio.run(lambda: None)  # start the loop outside the measurement
        t0, c0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(conc):
                nursery.start_soon(worker, n // conc)
        return time.perf_counter() - t0, time.process_time() - c0

    try:
        return trio.run(main)
    finally:
        aio.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    n = ap.parse_args().calls
    print(f"load average {os.getloadavg()[0]:.2f}; aio from {aio.__file__}")
    print(f"{'mode':<28}{'calls/s':>12}{'µs/call':>10}{'CPU µs/call':>13}")
    for conc in (1, 10):
        base, bcpu = asyncio_baseline(n, conc)
        br, cpu = bridged(n, conc)
        print(f"{f'plain asyncio, {conc} task(s)':<28}{n / base:>12,.0f}{base / n * 1e6:>10.1f}{bcpu / n * 1e6:>13.1f}")
        print(f"{f'bridge, {conc} Trio task(s)':<28}{n / br:>12,.0f}{br / n * 1e6:>10.1f}{cpu / n * 1e6:>13.1f}")
        print(f"  bridge overhead per call: {(br - base) / n * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
