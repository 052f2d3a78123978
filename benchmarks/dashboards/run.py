"""Dashboard benchmark: 1,000 devices, 24 h of data at 10 s, the generated default dashboard.

    .venv/bin/python benchmarks/dashboards/run.py [--devices 1000] [--hours 24] [--cpu-seconds 60]
        [--variants live+chart,rest+deck] [--workdir DIR]

1. A site of N th-sensor-v2 devices (sim binding, 10 s) and the demo's RetentionPolicy; no
   Dashboard document, so the default dashboard is generated (stat tiles, map, alarms, table).
2. The time-series store is filled with ``hours`` of temperature at 10 s for every device
   (N x 8,640 points for 24 h) and downsampled into the policy's 1m / 1h / 1d tiers.
3. The engine runs on it (``twin up`` with the API and MQTT on free ports), the
   dashboard through ``twin dashboard`` with a token and a 2 s refresh.
4. Headless Chromium (Playwright, /usr/bin/chromium) measures the time from navigation to the
   overview rendered (stat tiles with values, map, device table with N rows), cold (a new
   browser profile) and warm (a second tab: Streamlit's static files cached) and, on the
   History page (first variant only), the time to a 7-day query rendered (chart + caption).
5. CPU of the Streamlit process (and of the engine) over ``cpu-seconds`` while the overview
   refreshes every 2 s with one browser open.

Each variant (``--variants``) is a dashboard process of its own against the same engine, one
after the other: compare variants within one run (the machine is shared; see the load average).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TWIN = str(Path(sys.executable).with_name("twin"))
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
TICKS = os.sysconf("SC_CLK_TCK")


def make_site(root: Path, n: int) -> Path:
    site = root / "site"
    site.mkdir()
    for f in ("site.yaml", "models.yaml", "groups.yaml", "retention.yaml"):
        shutil.copy(ROOT / "sites" / "demo" / f, site / f)
    groups = ["line-1", "line-2", "cell-1a", "cell-1b", "utilities"]
    docs = []
    for i in range(n):
        docs.append({
            "apiVersion": "flux.iot/v1", "kind": "Device",
            "metadata": {"name": f"sensor_{i:04d}", "site": "plant-a",
                         "group": groups[i % len(groups)], "tags": ["hvac"] if i % 2 else ["bulk"]},
            "spec": {"type": "sensor", "model": "th-sensor-v2",
                     "location": {"lat": 48.13 + (i // 40) * 0.0004, "lon": 11.57 + (i % 40) * 0.0006},
                     "binding": {"sim": {"interval": "10s", "points": {
                         "temperature": {"wave": "sine", "min": 18, "max": 30, "period": "1h"}}}}},
        })  # fmt: skip
    (site / "devices.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return site


def fill_store(state: Path, site: Path, n: int, hours: float) -> dict[str, float]:
    import numpy as np

    from twin.timeseries.base import canonical_tags
    from twin.timeseries.factory import open_store
    from twin.timeseries.retention import RetentionManager, RetentionPolicy

    store = open_store(None, state)
    end = time.time() // 10 * 10 - 10
    ts = end - np.arange(int(hours * 360))[::-1] * 10.0
    groups = ["line-1", "line-2", "cell-1a", "cell-1b", "utilities"]
    t0 = time.perf_counter()
    points = 0
    batch: list[tuple[str, str, float, float, int, str, str, str]] = []
    for i in range(n):
        name = f"sensor_{i:04d}"
        tags = canonical_tags(["hvac"] if i % 2 else ["bulk"])
        vals = 24 + 6 * np.sin(ts / 600 + i) + (i % 7) * 0.1
        grp = groups[i % len(groups)]
        batch.extend(
            (name, "temperature", float(v), float(t), 0, "plant-a", grp, tags)
            for t, v in zip(ts, vals, strict=True)
        )
        if len(batch) >= 500_000:
            points += store.write_records(batch)
            batch = []
    if batch:
        points += store.write_records(batch)
    write_s = time.perf_counter() - t0
    policy = yaml.safe_load((site / "retention.yaml").read_text())
    t0 = time.perf_counter()
    RetentionManager(store, [RetentionPolicy.from_doc(policy)]).downsample(end + 3600)
    down_s = time.perf_counter() - t0
    close = getattr(store, "close", None)
    if close:
        close()
    return {"points": points, "write_s": write_s, "downsample_s": down_s}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICKS


def wait_line(proc: subprocess.Popen[str], pattern: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise SystemExit(f"process ended without printing {pattern!r}")


def panel_times(path: Path, name: str) -> None:
    """Median server-side time per panel (the app logs each panel's render time)."""
    times: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        m = re.search(r"(?:panel|stage) (\w+(?: '[^']*')?): ([0-9.]+) s", line)
        if m:
            times.setdefault(m.group(1), []).append(float(m.group(2)))
    for panel, vals in sorted(times.items()):
        print(f"[{name}]  server time per render, {panel}: median "
              f"{statistics.median(vals) * 1000:.0f} ms, first {vals[0] * 1000:.0f} ms "
              f"({len(vals)} renders)")  # fmt: skip


VARIANTS = {
    "live+chart": {},
    "live+deck": {"FLUX_MAP_RENDERER": "deck"},
    "rest+chart": {"FLUX_LIVE": "0"},
    "rest+deck": {"FLUX_LIVE": "0", "FLUX_MAP_RENDERER": "deck"},
    "live+chart-nopreload": {"FLUX_PRELOAD": "0"},
}
"""Dashboard variants (environment): live = WebSocket feed after a REST backfill, rest = REST
polling on every refresh; chart = the Vega-Lite map, deck = the pydeck (WebGL) map;
nopreload = the Streamlit process does not import the app and read the site before serving
(``dashboards/serve.py``), so the first visitor pays for it."""

MARKS = (
    ("shell", "[data-testid=stSidebar]"),
    ("first panel", "[data-testid=stMetricValue]"),
    ("table", "[data-testid=stDataFrame]"),
    ("map", "[class*=st-key-map-] .marks, [data-testid=stDeckGlJsonChart] canvas"),
)


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def overview(page: Any, url: str, n: int) -> tuple[float, dict[str, float]]:
    """Seconds from navigation to the overview rendered, and when each part appeared."""
    t0 = time.perf_counter()
    page.goto(url)
    marks = {}
    for name, css in MARKS:
        page.locator(css).first.wait_for(timeout=120_000)
        marks[name] = time.perf_counter() - t0
    page.get_by_text(f"{n} of {n} devices").wait_for(timeout=120_000)
    marks["rows"] = time.perf_counter() - t0
    return time.perf_counter() - t0, marks


def run_variant(
    name: str, p: Any, site: Path, api: str, token: str, env: dict[str, str], tmp: Path,
    args: argparse.Namespace, engine_pid: int, history: bool,
) -> None:  # fmt: skip
    log = tmp / f"dashboard-{name}.log"
    dash = subprocess.Popen(
        [TWIN, "dashboard", str(site), "--server", api, "--port", "0", "--refresh", args.refresh,
         "--token", token],
        env={**env, "FLUX_PROFILE": "1", **VARIANTS[name]}, stdout=subprocess.PIPE,
        stderr=open(log, "w"), text=True,  # noqa: SIM115
    )  # fmt: skip
    try:
        url = wait_line(dash, r"dashboard\s+(http://\S+)")
        for _ in range(100):
            try:
                if httpx.get(f"{url}/_stcore/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        streamlit_pid = int(subprocess.run(["pgrep", "-P", str(dash.pid)], capture_output=True,
                                           text=True).stdout.split()[0])  # fmt: skip
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            # warm-up: the first visitor after the dashboard started (imports, caches, the
            # WebSocket feed and its backfills)
            first_s, first = overview(page, url, args.devices)
            page.close()
            # cold: a new browser profile (nothing cached); warm: a second tab of the same
            # profile (Streamlit's static bundle cached, as for anyone who opened it before)
            # cold: a new browser profile each time (nothing cached); warm: new tabs of one
            # profile (Streamlit's static files cached, as for anyone who opened it before).
            # The machine is shared: medians of --repeat page loads, with the range.
            colds = []
            for _ in range(args.repeat):
                ctx = browser.new_context(viewport={"width": 1280, "height": 800})
                cpage = ctx.new_page()
                colds.append(overview(cpage, url, args.devices))
                ctx.close()
            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            page = ctx.new_page()
            overview(page, url, args.devices)
            page.screenshot(path=str(ROOT / "artifacts" / f"bench-overview-{name}.png"))
            warms = []
            for _ in range(args.repeat):
                wpage = ctx.new_page()
                warms.append(overview(wpage, url, args.devices))
                wpage.close()
            c0 = {pid: cpu_seconds(pid) for pid in (streamlit_pid, engine_pid)}
            w0 = time.perf_counter()
            page.wait_for_timeout(args.cpu_seconds * 1000)
            wall = time.perf_counter() - w0
            cpu = {pid: (cpu_seconds(pid) - c0[pid]) / wall * 100 for pid in c0}
            print(f"[{name}] load average {load_avg()}")
            print(f"[{name}] overview first render, first visitor after start (navigation → "
                  f"tiles, map, table with {args.devices} rows): {first_s:.2f} s  "
                  + ", ".join(f"{k} {v:.2f}" for k, v in first.items()))  # fmt: skip
            for label, runs in (("cold", colds), ("warm", warms)):
                totals = [r[0] for r in runs]
                marks = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
                print(f"[{name}] overview first render, {label}, median of {len(runs)}: "
                      f"{statistics.median(totals):.2f} s (range {min(totals):.2f}-"
                      f"{max(totals):.2f})  "
                      + ", ".join(f"{k} {v:.2f}" for k, v in marks.items()))  # fmt: skip
            print(f"[{name}] CPU while refreshing every {args.refresh} ({wall:.0f} s, 1 browser): "
                  f"streamlit {cpu[streamlit_pid]:.1f} % of a core, "
                  f"engine {cpu[engine_pid]:.1f} %")  # fmt: skip
            if history:
                page.get_by_text("History", exact=True).first.click()
                page.get_by_text(re.compile(r"· \d+ rows")).wait_for(timeout=120_000)
                page.locator("[data-testid=stSelectbox]").first.click()
                t0 = time.perf_counter()
                page.get_by_role("option", name="Last 7 days").click()
                pat = re.compile(r"bucket 1h · avg · tier [^·]*· \d+ rows")
                page.get_by_text(pat).wait_for(timeout=120_000)
                page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=120_000)
                history_s = time.perf_counter() - t0
                caption = page.get_by_text(pat).inner_text()
                page.screenshot(path=str(ROOT / "artifacts" / "bench-history.png"))
                print(f"[{name}] history 7-day query rendered (Last 7 days → chart): "
                      f"{history_s:.2f} s  [{caption}]")  # fmt: skip
                for title in ("Telemetry", "Control"):  # the other pages, to look at
                    page.get_by_text(title, exact=True).first.click()
                    page.get_by_text(f"· {title}").first.wait_for(timeout=120_000)
                    page.wait_for_timeout(3000)
                    page.screenshot(path=str(ROOT / "artifacts" / f"bench-{title.lower()}.png"))
        finally:
            browser.close()
        panel_times(log, name)
    finally:
        dash.terminate()
        try:
            dash.wait(timeout=15)
        except subprocess.TimeoutExpired:
            dash.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=24)
    ap.add_argument("--cpu-seconds", type=float, default=60)
    ap.add_argument("--refresh", default="2s", help="dashboard refresh (0 = off)")
    ap.add_argument(
        "--variants",
        default="live+chart,rest+deck",
        help=f"comma-separated, measured one after the other: {', '.join(VARIANTS)}",
    )
    ap.add_argument("--repeat", type=int, default=5, help="page loads per measurement")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the site and the filled store here and reuse them next time",
    )
    args = ap.parse_args()  # fmt: skip
    from playwright.sync_api import sync_playwright

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: {', '.join(VARIANTS)}")
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="dash-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    (ROOT / "artifacts").mkdir(exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        site, state = tmp / "site", tmp / "state"
        filled = tmp / f"filled-{args.devices}-{args.hours:g}"
        env = {**os.environ, "TWIN_STATE_DIR": str(state), "TWIN_PASSWORD": "benchpass1"}
        if not filled.exists():
            shutil.rmtree(site, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)
            make_site(tmp, args.devices)
            state.mkdir()
            fill = fill_store(state, site, args.devices, args.hours)
            print(f"store: {fill['points']:,.0f} points written in {fill['write_s']:.1f} s, "
                  f"downsampled (1m/1h/1d) in {fill['downsample_s']:.1f} s")  # fmt: skip
            subprocess.run([TWIN, "user", "add", "bench", "--role", "operator"], env=env,
                           check=True, capture_output=True)  # fmt: skip
            filled.touch()
        else:
            print(f"store: reused from {tmp} (its data ends when it was filled)")
        engine = subprocess.Popen(
            [TWIN, "up", str(site), "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"],
            env={**env, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        procs.append(engine)
        api = wait_line(engine, r"api\s+(http://[0-9.:]+)")
        # keep reading its log: a full pipe would block the engine on its next log line
        threading.Thread(target=engine.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        token = httpx.post(f"{api}/api/v1/auth/login",
                           json={"username": "bench", "password": "benchpass1"}).json()  # fmt: skip
        # the engine's first retention pass, ~60 s after it starts, takes ~6 s of a core on
        # the freshly filled store: the first variant measured alongside it was worse off than
        # the others. Wait past it (90 s), then (bounded) for the engine to be quiet.
        settle = time.perf_counter()
        while time.perf_counter() - settle < 240:
            c0 = cpu_seconds(engine.pid)
            time.sleep(5)
            if time.perf_counter() - settle > 90 and (cpu_seconds(engine.pid) - c0) / 5 < 0.10:
                break
        print(f"devices {args.devices}, {args.hours:g} h at 10 s; engine quiet after "
              f"{time.perf_counter() - settle:.0f} s; load average {load_avg()}")  # fmt: skip
        with sync_playwright() as p:
            for i, name in enumerate(variants):
                run_variant(name, p, site, api, token["access_token"], env, tmp, args,
                            engine.pid, history=i == 0)  # fmt: skip
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
