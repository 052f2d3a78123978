"""The uplink protocol between an edge and the cloud, and the cloud's dedup bookkeeping.

An upload (``POST /api/v1/edge-link/{edge}/batch``, JSON, the edge's key in
``Authorization: Bearer``) carries one or more *runs*::

    {"revision": 7,                          # the spec revision the edge runs
     "stats": {"depth": 120, "oldest_age_s": 3.2, "dropped": {"telemetry": 12}, ...},
     "runs": [{"after": 100, "records": [[101, "telemetry", ts, body], [104, ...], ...]}]}

A run's promise: the edge's outbox holds nothing between ``after`` and the first record, nor
between two consecutive records, other than what is listed — any sequence number skipped was
dropped by the overflow policy (counted at the edge and, from these gaps, at the cloud). A
batch usually holds two runs while a backlog drains: the oldest records, and the newest (live)
ones, so live data is never stuck behind an hour of backlog.

The cloud keeps, per edge, the set of sequence numbers it has *covered* (stored, or declared
dropped) as a few intervals; a record whose number is covered is a duplicate and skipped. The
answer acknowledges the largest contiguous prefix (``acked``) and the intervals above it
(``covered``), so the edge deletes what the cloud has and never re-sends the live run::

    {"acked": 180, "covered": [[200, 260]], "accepted": 140, "duplicates": 0, "dropped": 3}

The covered set is stored with the data, in the same write-ahead-log commit, as the reading
``_edge/<edge> covered = "0-180,200-260"``: a cloud that dies at any moment comes back with
exactly the set that matches what it stored (``twin/edge/cloud.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_INTERVALS = 256
"""A run that would leave more disjoint intervals than this is refused (the edge re-sends)."""

Interval = tuple[int, int]


class Covered:
    """A set of non-negative integers as sorted, disjoint, non-adjacent closed intervals;
    always contains 0 (so ``acked`` is the end of the first interval)."""

    def __init__(self, intervals: Iterable[Sequence[int]] = ()) -> None:
        self.iv: list[list[int]] = [[0, 0]]
        for lo, hi in intervals:
            self.add(int(lo), int(hi))

    @property
    def acked(self) -> int:
        return self.iv[0][1]

    def __contains__(self, n: int) -> bool:
        for lo, hi in self.iv:
            if n < lo:
                return False
            if n <= hi:
                return True
        return False

    def missing(self, lo: int, hi: int) -> int:
        """How many numbers in [lo, hi] are not covered."""
        if hi < lo:
            return 0
        have = 0
        for a, b in self.iv:
            x, y = max(a, lo), min(b, hi)
            if x <= y:
                have += y - x + 1
        return hi - lo + 1 - have

    def add(self, lo: int, hi: int) -> None:
        if hi < lo:
            return
        out: list[list[int]] = []
        placed = False
        for a, b in self.iv:
            if b + 1 < lo:
                out.append([a, b])
            elif hi + 1 < a:
                if not placed:
                    out.append([lo, hi])
                    placed = True
                out.append([a, b])
            else:
                lo, hi = min(lo, a), max(hi, b)
        if not placed:
            out.append([lo, hi])
        out.sort()
        self.iv = out

    def copy(self) -> Covered:
        c = Covered()
        c.iv = [list(x) for x in self.iv]
        return c

    def above(self) -> list[list[int]]:
        """The intervals above the contiguous prefix."""
        return [list(x) for x in self.iv[1:]]

    def encode(self) -> str:
        return ",".join(f"{lo}-{hi}" for lo, hi in self.iv)

    @classmethod
    def decode(cls, text: str) -> Covered:
        c = cls()
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            if sep and lo.isdigit() and hi.isdigit():
                c.add(int(lo), int(hi))
        return c

    def union(self, other: Covered) -> None:
        for lo, hi in other.iv:
            self.add(lo, hi)


__all__ = ["MAX_INTERVALS", "Covered"]
