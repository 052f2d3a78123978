"""Interleaved A/B measurement for the bridge benchmarks (``modbus.py``, ``coap.py``).

On a shared, loaded machine one run per mode measures the load as much as the mode: the other
engineers' jobs come and go within a second, and a mode measured for 5 s after another saw
different load (earlier CoAP runs here scattered 0.49-5.35x). Rounds of 1 s, alternating, were
not enough either (neighbouring rounds still differed 0.3-3.6x: the load changes faster, and
each round paid a new loop, thread, socket and connection). So:

* every mode is set up **once** and stays live: the bridged clients on the bridge's asyncio
  thread (``twin.bindings.aio``), the plain ones on a plain asyncio loop in a thread of its own
  (:class:`PlainLoop`, the same library awaited directly, as a plain asyncio program would);
* the modes then take turns in short **slices** (default 100 ms: bridge, plain, bridge, plain,
  ...), many of them, so both see the same load to within a fraction of a second;
* figures: each mode's total requests / total time over its slices (the pooled rate), their
  ratio, the median of the per-pair ratios, and the process CPU time per request
  (``time.process_time``: all threads; during a slice only that mode's threads work).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import trio

SLOW = 0.5
"""A request slower than this (seconds) is counted apart: on UDP it is a retransmission (CoAP
waits ACK_TIMEOUT = 2-3 s before resending a lost confirmable message)."""


class Round:
    """One measured slice of one mode: requests, wall and process CPU seconds, slow ones."""

    def __init__(self) -> None:
        self.n = 0
        self.slow = 0
        self.wall = 0.0
        self.cpu = 0.0
        self._t0 = self._c0 = 0.0

    def start(self) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self._t0, time.process_time() - self._c0

    def count(self, began: float) -> None:
        """One request done that began at ``began`` (``time.perf_counter()``)."""
        self.n += 1
        self.slow += time.perf_counter() - began > SLOW

    @property
    def rate(self) -> float:
        return self.n / self.wall if self.wall else 0.0


class PlainLoop:
    """A plain asyncio event loop in a thread of its own: the baseline's home."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="plain-asyncio", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the loop; block this (non-Trio) thread for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def run(self, coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """From Trio: run ``coro_fn()`` on the loop, waiting in a worker thread (idle)."""
        return await trio.to_thread.run_sync(lambda: self.call(coro_fn()))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def interleave(
    modes: Sequence[Callable[[float], Awaitable[Round]]], slices: int, slice_s: float
) -> list[list[Round]]:
    """``slices`` turns of every mode in order, each ``mode(slice_s)`` -> its Round."""
    out: list[list[Round]] = []
    for _ in range(slices):
        out.append([await mode(slice_s) for mode in modes])
    return out


def report(title: str, names: Sequence[str], rounds: Sequence[Sequence[Round]], unit: str = "req") -> dict[str, float]:
    """Print pooled rates, CPU per request and ratios to the last mode (the plain baseline);
    returns ``{name: pooled ratio to the baseline}``."""
    med = statistics.median
    print(f"\n{title}: {len(rounds)} slices per mode, interleaved")
    print(f"  {'mode':<26}{unit + '/s (pooled)':>16}{'CPU µs/' + unit:>13}{'slow':>6}")
    pooled, cpu = [], []
    for k, name in enumerate(names):
        n = sum(r[k].n for r in rounds)
        wall = sum(r[k].wall for r in rounds)
        pooled.append(n / wall if wall else 0.0)
        cpu.append(sum(r[k].cpu for r in rounds) / n * 1e6 if n else 0.0)
        print(f"  {name:<26}{pooled[k]:>16,.0f}{cpu[k]:>13,.0f}{sum(r[k].slow for r in rounds):>6}")
    base = len(names) - 1
    ratios: dict[str, float] = {}
    for k, name in enumerate(names[:-1]):
        per = sorted(r[k].rate / r[base].rate for r in rounds if r[base].rate)
        q = [per[int(f * (len(per) - 1))] for f in (0.1, 0.5, 0.9)] if per else [0, 0, 0]
        ratios[name] = pooled[k] / pooled[base] if pooled[base] else 0.0
        print(f"  {name} / {names[base]}: {ratios[name]:.2f}x pooled (goal >= 0.8x); per slice pair "
              f"median {med(per) if per else 0:.2f}x (p10 {q[0]:.2f}, p90 {q[2]:.2f}); CPU per "
              f"{unit} {cpu[k] / cpu[base] if cpu[base] else 0:.2f}x")
    return ratios
