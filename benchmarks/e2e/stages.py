"""Per-reading cost of the store path's stages, before and after, in one process and one run.

    python benchmarks/e2e/stages.py [--records 2000] [--points 10]

What ``benchmarks/e2e/run.py``'s profile named as the next costs, measured in isolation on
the same data (``--records`` write-ahead log records of ``--points`` readings each, as one MQTT
message of one device makes), alternating the two variants, best of 7:

* WAL record payload: format 1 (compact JSON, what ``encode`` wrote before) vs format 2
  (``marshal``, ``twin.timeseries.wal.encode_payload``), and decoding both at replay;
* log rows → store records: ``TimeSeriesService.record_of`` per reading vs ``records_of``
  per record (the device's tags looked up through the service's real cache).

Both variants are the code in the tree (format 1 is still read at replay; ``record_of`` is
still the per-reading fallback), so the comparison stays honest as the code changes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.wal import decode_payload, encode_payload


class _Engine:
    """What ``TimeSeriesService._device_tags`` asks of the engine (a device's document)."""

    revision_number = 1

    def device_doc(self, name: str) -> dict[str, Any]:
        return {"metadata": {"site": "plant-a", "tags": ["line1"], "labels": {"zone": "z3"}}}


def best(fn: Callable[[], Any], readings: int) -> float:
    """Nanoseconds per reading, best of 7 repeats."""
    return min(timeit.repeat(fn, number=1, repeat=7)) / readings * 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--points", type=int, default=10)
    args = ap.parse_args()
    rnd = random.Random(1)
    records = [
        [
            (f"dev-{j % 200:04d}", f"p{i}", rnd.random() * 100, 1.7e9 + rnd.random(), "good")
            for i in range(args.points)
        ]
        for j in range(args.records)
    ]
    n = args.records * args.points

    def json_enc() -> list[bytes]:
        return [json.dumps(r, separators=(",", ":"), default=str).encode() for r in records]

    def marshal_enc() -> list[bytes]:
        return [encode_payload(r) for r in records]

    v1, v2 = json_enc(), marshal_enc()
    assert [decode_payload(p, 1) for p in v1] == [decode_payload(p, 2) for p in v2] == records

    svc = TimeSeriesService()
    svc._engine = _Engine()  # type: ignore[assignment]

    def per_reading() -> list[Any]:
        return [svc.record_of(r) for rs in records for r in rs]

    def per_record() -> list[Any]:
        out: list[Any] = []
        for rs in records:
            svc.records_of(rs, out)
        return out

    assert per_reading() == per_record()
    rows = [
        ("WAL encode", lambda: best(json_enc, n), lambda: best(marshal_enc, n)),
        (
            "WAL decode (replay)",
            lambda: best(lambda: [decode_payload(p, 1) for p in v1], n),
            lambda: best(lambda: [decode_payload(p, 2) for p in v2], n),
        ),
        ("log rows -> records", lambda: best(per_reading, n), lambda: best(per_record, n)),
    ]
    print(f"{args.records} records x {args.points} readings; ns per reading, best of 7")
    print(f"{'stage':22} {'before':>8} {'after':>8} {'ratio':>6}")
    for name, before, after in rows:
        b1, a1, b2, a2 = before(), after(), before(), after()  # alternating
        b, a = min(b1, b2), min(a1, a2)
        print(f"{name:22} {b:8.0f} {a:8.0f} {a / b:6.2f}")


if __name__ == "__main__":
    main()
