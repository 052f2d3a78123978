"""Interleaved A/B rounds for the bridge benchmarks (``modbus.py``, ``coap.py``).

On a shared, loaded machine one long run per mode measures the load as much as the mode: the
other engineers' jobs come and go within seconds. So each benchmark runs many short rounds,
alternating the modes (bridge, plain, bridge, plain, ...), takes the ratio **per round** (two
neighbours in time saw about the same load), and reports the median of those ratios, the
median rate of each mode, and the process CPU time per request (``time.process_time``: every
thread of the process, so the bridge's asyncio thread is counted), which depends much less on
how long the process waited for a core than the rate does. Per-request latencies give p50
and p99 per mode: a closed-loop caller's rate is the inverse of its mean latency, and the p50
ratio is that comparison without the few requests that waited for a core (the p99).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

SLOW = 0.5
"""A request slower than this (seconds) is counted apart: on UDP it is a retransmission (CoAP
waits ACK_TIMEOUT = 2-3 s before resending a lost confirmable message)."""


class Round:
    """One measured round of one mode: requests, wall and process CPU seconds, slow requests."""

    def __init__(self) -> None:
        self.n = 0
        self.slow = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.lat: list[float] = []  # seconds, every request of the round
        self._t0 = self._c0 = 0.0

    def start(self) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self._t0, time.process_time() - self._c0

    def count(self, began: float) -> None:
        """One request done that began at ``began`` (``time.perf_counter()``)."""
        took = time.perf_counter() - began
        self.n += 1
        self.slow += took > SLOW
        self.lat.append(took)

    @property
    def rate(self) -> float:
        return self.n / self.wall if self.wall else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.n * 1e6 if self.n else 0.0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def report(
    title: str, modes: Sequence[str], rounds: Sequence[Sequence[Round]], unit: str = "req"
) -> None:
    """Print medians per mode and each mode's per-round ratio to the last mode (the plain
    asyncio baseline)."""
    med = statistics.median
    print(f"\n{title}: {len(rounds)} interleaved rounds")
    print(
        f"  {'mode':<26}{unit + '/s median':>14}{'CPU µs/' + unit:>13}"
        f"{'latency p50':>13}{'p99 (ms)':>9}{'slow':>6}"
    )
    lat = []
    for k, name in enumerate(modes):
        rs = [r[k] for r in rounds]
        lat.append([x for r in rs for x in r.lat])
        print(
            f"  {name:<26}{med(r.rate for r in rs):>14,.0f}{med(r.cpu_us for r in rs):>13,.0f}"
            f"{_pct(lat[k], 0.5) * 1e3:>13.2f}{_pct(lat[k], 0.99) * 1e3:>9.2f}"
            f"{sum(r.slow for r in rs):>6}"
        )
    base = len(modes) - 1
    for k, name in enumerate(modes[:-1]):
        ratios = [r[k].rate / r[base].rate for r in rounds if r[base].rate]
        cpu = [r[k].cpu_us / r[base].cpu_us for r in rounds if r[base].cpu_us]
        print(
            f"  {name} / {modes[base]}: median {med(ratios):.2f}x (goal >= 0.8x), per round "
            f"{' '.join(f'{x:.2f}' for x in ratios)}; CPU per {unit} {med(cpu):.2f}x; "
            f"p50 latency {modes[base]}/{name} {_pct(lat[base], 0.5) / _pct(lat[k], 0.5):.2f}x"
        )
