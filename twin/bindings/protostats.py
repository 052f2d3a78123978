"""Per-binding protocol counters (requests, errors, malformed frames, latency) that the
engine's ``/metrics`` exposes (``twin.runtime.metrics``: ``twin_protocol_*{binding=...}``).

Process-wide and lock-free (each binding updates them on the Trio thread or the asyncio
thread, one ``+=`` at a time); a binding calls ``STATS.get("modbus")`` once and keeps the
object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProtocolStats:
    requests: int = 0
    errors: int = 0  # failed requests (timeout, exception response, connection lost)
    timeouts: int = 0
    malformed: int = 0  # frames/responses dropped as malformed
    latency_sum: float = 0.0  # seconds, over the requests that got a response
    latency_count: int = 0

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1


class _Registry(dict[str, ProtocolStats]):
    def get_stats(self, binding: str) -> ProtocolStats:
        stats = dict.get(self, binding)
        if stats is None:
            stats = self[binding] = ProtocolStats()
        return stats


STATS = _Registry()


def stats(binding: str) -> ProtocolStats:
    return STATS.get_stats(binding)
