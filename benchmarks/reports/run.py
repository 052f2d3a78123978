"""Report and notification benchmarks (issue 16 goals), one command:

    python benchmarks/reports/run.py            # all three
    python benchmarks/reports/run.py pdf xlsx notify

- ``pdf``: a ~10-page report with charts over 1,000 devices' day (two metrics every 5 min:
  576,000 readings in LanceDB): gather + render. Goal <= 5 s.
- ``xlsx``: an XLSX of 100,000 raw rows (xlsxwriter, constant memory); peer: openpyxl's
  write-only mode (twin.timeseries.query.to_xlsx) on the same rows. Goal <= 6 s.
- ``notify``: alarm raised (monitor.raise_alarm in a running engine) -> signed webhook received
  by a local HTTP server, p50/p99 over 200 alarms. Peer: a bare httpx POST to the same
  receiver. Goal p99 < 1 s.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

N_DEVICES = 1000
STEP = 300  # seconds between readings
TZ = "Europe/Berlin"
DAY = "2026-03-01..2026-03-02"


def specs() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {
        ("Site", "plant"): {"kind": "Site", "metadata": {"name": "plant"},
                            "spec": {"title": "Benchmark plant", "timezone": TZ}},
        ("DeviceModel", "th"): {"kind": "DeviceModel", "metadata": {"name": "th"}, "spec": {
            "telemetry": {"temperature": {"type": "number", "unit": "°C"},
                          "humidity": {"type": "number", "unit": "%"}}}},
    }
    for g in range(10):
        out[("DeviceGroup", f"hall-{g}")] = {"kind": "DeviceGroup",
                                             "metadata": {"name": f"hall-{g}", "site": "plant"},
                                             "spec": {}}
    for i in range(N_DEVICES):
        name = f"dev-{i:04d}"
        out[("Device", name)] = {"kind": "Device", "metadata": {
            "name": name, "site": "plant", "group": f"hall-{i % 10}"},
            "spec": {"type": "sensor", "model": "th"}}
    return out


def report() -> dict[str, Any]:
    sections: list[dict[str, Any]] = [
        {"type": "stat", "title": "Temperature (avg)", "metric": "temperature"},
        {"type": "stat", "title": "Temperature (max)", "metric": "temperature", "aggregate": "max"},
        {"type": "stat", "title": "Humidity (avg)", "metric": "humidity"},
        {"type": "stat", "title": "Humidity (min)", "metric": "humidity", "aggregate": "min"},
    ]
    for g in range(10):
        sections.append({"type": "timeseries", "title": f"Hall {g}: temperature",
                         "metrics": ["temperature"], "select": {"group": f"hall-{g}"}})
    sections.append({"type": "table", "title": "Daily aggregates per device",
                     "metrics": ["temperature"], "aggregates": ["avg", "min", "max", "count"]})
    return {"metadata": {"name": "bench", "site": "plant"},
            "spec": {"title": "1,000 devices — daily report", "timezone": TZ,
                     "sections": sections}}


def make_store(path: Path) -> Any:
    from twin.spec.periods import resolve_period
    from twin.timeseries.lance import LanceStore

    store = LanceStore(path)
    p = resolve_period(DAY, TZ, 0)
    recs = []
    for i in range(N_DEVICES):
        dev = f"dev-{i:04d}"
        for k, t in enumerate(range(int(p.start), int(p.end), STEP)):
            x = k / (86400 / STEP) * 2 * math.pi
            recs.append((dev, "temperature", 20 + 4 * math.sin(x + i / 50), float(t), 0, "plant",
                         f"hall-{i % 10}", ","))
            recs.append((dev, "humidity", 50 + 10 * math.cos(x), float(t), 0, "plant",
                         f"hall-{i % 10}", ","))
    for j in range(0, len(recs), 100_000):
        store.write_records(recs[j:j + 100_000])
    return store, len(recs)


def bench_pdf(store: Any, tmp: Path) -> None:
    from twin.reports.data import gather
    from twin.reports.pdf import render_pdf
    from twin.reports.render import period_of

    sp = specs()
    doc = report()
    per = period_of(doc, sp, DAY, 0)
    times = []
    cpu = []
    for _ in range(3):
        c0 = time.process_time()
        t0 = time.perf_counter()
        data = gather(doc, sp, per, store, None)
        t1 = time.perf_counter()
        pdf = render_pdf(data)
        t2 = time.perf_counter()
        times.append((t2 - t0, t1 - t0, t2 - t1))
        cpu.append(time.process_time() - c0)
    out = tmp / "bench.pdf"
    out.write_bytes(pdf)
    pages = "?"
    if shutil.which("pdfinfo"):
        info = subprocess.run(["pdfinfo", str(out)], capture_output=True, text=True).stdout
        pages = next((ln.split()[-1] for ln in info.splitlines() if ln.startswith("Pages")), "?")
    best = min(times)
    print(f"pdf: {pages} pages, {len(pdf):,} bytes, 10 charts over {N_DEVICES:,} devices: "
          f"best {best[0]:.2f} s (gather {best[1]:.2f} s, render {best[2]:.2f} s); "
          f"runs {', '.join(f'{t[0]:.2f}' for t in times)} s, CPU {min(cpu):.2f} s "
          f"(load {os.getloadavg()[0]:.1f})  [goal <= 5 s]")


def bench_xlsx(store: Any, tmp: Path) -> None:
    import pyarrow as pa

    from twin.reports.data import gather
    from twin.reports.render import period_of
    from twin.reports.xlsx import render_xlsx
    from twin.timeseries.query import to_xlsx

    sp = specs()
    doc = {"metadata": {"name": "rows", "site": "plant"}, "spec": {
        "title": "100k rows", "timezone": TZ, "sections": [
            {"type": "readings", "title": "Readings", "metrics": ["temperature"],
             "limit": 100_000, "per_device": False}]}}
    per = period_of(doc, sp, DAY, 0)
    t0 = time.perf_counter()
    data = gather(doc, sp, per, store, None)
    t1 = time.perf_counter()
    rows = len(data.sections[0].table.rows)  # type: ignore[union-attr]
    best = best_cpu = math.inf
    for _ in range(2):
        a, ac = time.perf_counter(), time.process_time()
        blob = render_xlsx(data)
        best = min(best, time.perf_counter() - a)
        best_cpu = min(best_cpu, time.process_time() - ac)
    table = data.sections[0].table
    assert table is not None
    cols = list(zip(*table.rows, strict=True))
    arrow = pa.table({c: list(v) for c, v in zip(table.columns, cols, strict=True)})
    a, ac = time.perf_counter(), time.process_time()
    peer = to_xlsx(arrow)
    peer_s = time.perf_counter() - a
    peer_cpu = time.process_time() - ac
    print(f"xlsx: {rows:,} rows, {len(blob):,} bytes: render {best:.2f} s (+ gather "
          f"{t1 - t0:.2f} s = {best + t1 - t0:.2f} s), render CPU {best_cpu:.2f} s (load "
          f"{os.getloadavg()[0]:.1f})  [goal <= 6 s]; peer openpyxl write-only {peer_s:.2f} s, "
          f"CPU {peer_cpu:.2f} s ({len(peer):,} bytes, {peer_cpu / best_cpu:.1f}x the CPU)")


async def bench_notify(tmp: Path, n: int = 200) -> None:
    import httpx
    import trio

    from tests.reports.peers import start_receiver
    from tests.runtime.helpers import apply, fast_config, model, sim_device, site
    from twin.control.service import ControlService
    from twin.control.webhooks import WebhookPolicy
    from twin.registry import open_registry
    from twin.reports.service import ReportService
    from twin.runtime.engine import Engine

    rec = start_receiver()
    os.environ["TWIN_SECRET_HOOK"] = "hook-secret"
    reg = open_registry(None, tmp / "state")
    rule = {"apiVersion": "flux.iot/v1", "kind": "NotificationRule",
            "metadata": {"name": "all", "site": "plant-a"},
            "spec": {"channels": [{"type": "webhook", "url": rec.url,
                                   "secret": {"secret": "hook"}}]}}
    apply(reg, site(), model(), sim_device("t1"), rule)
    svc = ReportService(webhooks=WebhookPolicy.parse("127.0.0.1/32"), tick=0.05)
    engine = Engine(reg, fast_config(state_dir=tmp / "state"), [ControlService(), svc])
    lat: list[float] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            for i in range(n):
                before = len(rec.times)
                t0 = time.time()
                engine.monitor.raise_alarm("t1", f"bench-{i}", "major", f"alarm {i}")
                with trio.fail_after(10):
                    while len(rec.times) == before:  # noqa: ASYNC110 (a thread's list)
                        await trio.sleep(0.001)
                lat.append(rec.times[-1] - t0)
            peer = []
            async with httpx.AsyncClient() as c:
                for _ in range(50):
                    t0 = time.time()
                    await c.post(rec.url, content=b"{}")
                    peer.append(time.time() - t0)
            nursery.cancel_scope.cancel()
    finally:
        rec.stop()
        reg.close()
    lat.sort()
    p99 = lat[int(0.99 * (len(lat) - 1))]
    print(f"notify: {n} alarms raised -> signed webhook received: p50 "
          f"{statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
          f"{lat[-1] * 1000:.1f} ms  [goal p99 < 1 s]; peer bare httpx POST p50 "
          f"{statistics.median(peer) * 1000:.1f} ms")


def main() -> None:
    which = sys.argv[1:] or ["pdf", "xlsx", "notify"]
    tmp = Path(tempfile.mkdtemp(prefix="twin-bench-reports-"))
    try:
        if "pdf" in which or "xlsx" in which:
            t = time.perf_counter()
            store, n = make_store(tmp / "ts")
            print(f"store: {n:,} readings of {N_DEVICES:,} devices written in "
                  f"{time.perf_counter() - t:.1f} s")
            if "pdf" in which:
                bench_pdf(store, tmp)
            if "xlsx" in which:
                bench_xlsx(store, tmp)
            store.close()
        if "notify" in which:
            import trio

            trio.run(bench_notify, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
