"""``twin query`` and ``twin storage`` as subprocesses, on a store filled by a real engine."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import trio

from runtime.helpers import (
    apply,
    eventually,
    fast_config,
    group,
    model,
    running_engine,
    sim_device,
    site,
)
from twin.api import auth
from twin.api.app import ApiSettings
from twin.api.server import ApiService
from twin.registry import open_registry
from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.base import Selector

pytestmark = pytest.mark.slow  # subprocesses: ~15 s each

TWIN = [sys.executable, "-m", "twin.cli"]


def docs() -> list[dict[str, Any]]:
    return [
        site("plant-a"),
        model(),
        group("line-1", "plant-a"),
        sim_device("t1", group_="line-1", interval="100ms", tags=["hvac"]),
        sim_device("t2", interval="100ms"),
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": {"name": "fast", "site": "plant-a"},
            "spec": {
                "tiers": [{"resolution": "raw", "keep": "1h"}, {"resolution": "1s", "keep": "1d"}]
            },
        },
    ]


async def twin(state: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = await trio.run_process(
        [*TWIN, "--state-dir", str(state), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "TWIN_TIMESERIES": "", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture
async def state(tmp_path: Path) -> Path:
    """A state dir whose store holds a few seconds of two simulated devices."""
    state = tmp_path / "state"
    reg = open_registry(None, state)
    try:
        apply(reg, *docs())
        service = TimeSeriesService(flush_interval=0.1, retention_interval=3600)
        async with running_engine(reg, fast_config(state_dir=state), [service]):
            store = service.store
            assert store is not None
            await eventually(
                lambda: store.read_raw(Selector.of(devices="t1"), 0, 2e9).num_rows >= 10
            )
    finally:
        reg.close()
    return state


async def test_query_formats_from_the_state_dir(state: Path, tmp_path: Path) -> None:
    text = await twin(state, "query", "temperature", "--device", "t1", "--from", "-1h", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) >= 10 and {r["device"] for r in rows} == {"t1"}
    doc = json.loads(
        await twin(
            state,
            "query",
            "temperature",
            "--from",
            "-1h",
            "--every",
            "1m",
            "--agg",
            "avg",
            "--agg",
            "count",
            "-o",
            "json",
        )
    )
    assert {"avg", "count", "device"} <= set(doc["columns"]) and doc["count"] >= 2
    table = await twin(
        state, "query", "temperature", "--tag", "hvac", "--from", "-1h", "--every", "1m"
    )
    # the tag selects t1's series only (read the DEVICE column: the TS column's ISO timestamps
    # contain "T1x" between 10:00 and 19:59 UTC, so a substring test of the table is wrong)
    header, *rows = [line for line in table.splitlines() if line.strip()]
    at = header.index("DEVICE")  # the table's columns are aligned
    devices = {row[at:].split()[0] for row in rows}
    assert devices == {"t1"}, table
    out = tmp_path / "x.parquet"
    await twin(state, "query", "--from", "-1h", "-o", "parquet", "--out", str(out))
    assert pq.read_table(out).num_rows >= 20
    out = tmp_path / "x.xlsx"
    await twin(
        state, "query", "temperature", "--from", "-1h", "--trend", "-o", "xlsx", "--out", str(out)
    )
    import openpyxl

    ws = openpyxl.load_workbook(out).active
    assert ws is not None and ws.max_row == 3  # header + one row per device


async def test_storage_stats_and_retention_now(state: Path) -> None:
    stats = json.loads(await twin(state, "storage", "--json"))
    assert stats["points"] >= 20 and "raw" in {t["tier"] for t in stats["tiers"]}
    assert "raw" in await twin(state, "storage")
    report = json.loads(await twin(state, "storage", "--json", "retention"))
    assert report["rolled_up"].get("agg_1s", 0) > 0
    stats = json.loads(await twin(state, "storage", "--json"))
    assert "agg_1s" in {t["tier"] for t in stats["tiers"]}
    # the rollup watermark and lag per (policy, tier), read from the store's metadata
    (lag,) = [t for t in stats["rollup"]["tiers"] if t["tier"] == "agg_1s"]
    assert lag["watermark"] is not None and lag["lag_s"] >= 0
    text = await twin(state, "storage")
    assert "ROLLUP LAG" in text and "agg_1s" in text


async def test_query_and_storage_through_the_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    reg = open_registry(None, state)
    try:
        apply(reg, *docs())
        reg.put_user(auth.make_user("admin", "correct horse battery", "admin"))
        user = reg.get_user("admin")
        assert user is not None
        service = TimeSeriesService(flush_interval=0.1, retention_interval=3600)
        api = ApiService("127.0.0.1", 0, ApiSettings(state_dir=state))
        async with running_engine(reg, fast_config(state_dir=state), [service, api]) as engine:
            store = service.store
            assert store is not None
            await eventually(
                lambda: store.read_raw(Selector.of(devices="t2"), 0, 2e9).num_rows >= 5
            )
            env = {
                "TWIN_SERVER": engine.service_info["api"]["url"],
                "TWIN_TOKEN": auth.issue_access_token(auth.load_secret(state), user),
            }
            other = tmp_path / "elsewhere"  # no local store: everything goes over HTTP
            text = await twin(other, "query", "temperature", "--device", "t2", "-o", "csv", env=env)
            assert len(list(csv.DictReader(io.StringIO(text)))) >= 5
            out = tmp_path / "r.parquet"
            await twin(other, "query", "--every", "1m", "-o", "parquet", "--out", str(out), env=env)
            assert pq.read_table(out).num_rows >= 2
            assert json.loads(await twin(other, "storage", "--json", env=env))["points"] >= 5
            report = json.loads(await twin(other, "storage", "--json", "retention", env=env))
            assert {"rolled_up", "expired", "reclaimed_bytes"} <= set(report)
            # the rollup loop rolls windows up as they close (after the default 5 s of
            # lateness), with or without a manual pass; the stats show the tier and its lag
            await eventually(
                lambda: store.aggregate("agg_1s", Selector(), 0, 2e9, 1.0).num_rows > 0
            )
            stats = json.loads(await twin(other, "storage", "--json", env=env))
            assert {t["tier"]: t["points"] for t in stats["tiers"]}.get("agg_1s", 0) > 0
            (lag,) = stats["rollup"]["tiers"]
            assert lag["tier"] == "agg_1s" and lag["watermark"] is not None
    finally:
        reg.close()


def test_twin_up_stores_the_demo_readings(tmp_path: Path) -> None:
    """``twin up sites/demo`` → readings in the state dir's store → ``twin query`` reads them."""
    import signal
    import subprocess
    import time

    demo = Path(__file__).resolve().parents[2] / "sites" / "demo"
    state = tmp_path / "state"
    env = {**os.environ, "TWIN_TIMESERIES": ""}
    args = [*TWIN, "--state-dir", str(state), "up", str(demo), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [*args, "--no-mqtt"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        rows: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            time.sleep(1)
            if proc.poll() is not None:
                break
            if not (state / "timeseries" / "raw.lance").exists():
                continue
            q = subprocess.run(
                [
                    *TWIN,
                    "--state-dir",
                    str(state),
                    "query",
                    "temperature",
                    "--device",
                    "temp_sensor_01",
                    "--from",
                    "-1h",
                    "-o",
                    "csv",
                ],
                env=env,
                capture_output=True,
                check=False,
            )
            if q.returncode == 0:
                rows = list(csv.DictReader(io.StringIO(q.stdout.decode())))
                if len(rows) >= 2:
                    break
        assert len(rows) >= 2, proc.stdout.read().decode() if proc.poll() is not None else rows
        assert rows[0]["site"] == "plant-a" and "hvac" in rows[0]["tags"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert b"timeseries" in out, out.decode()
