"""Dashboard documents: schema, located panel checks, layout, the default dashboard."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from twin.errors import SpecError
from twin.spec import load_site
from twin.spec.dashboards import (
    dashboards_of,
    default_dashboard,
    page_rows,
    row_widths,
    select_devices,
)

DEMO = Path(__file__).resolve().parents[2] / "sites" / "demo"

BAD = """\
apiVersion: flux.iot/v1
kind: Dashboard
metadata: {name: broken, site: plant-a}
spec:
  refresh: 2s
  pages:
    - title: One
      panels:
        - {type: mapp}
        - {type: stat, metric: temprature, select: {group: line-1}}
        - {type: timeseries, metrics: [temperature, nope], select: {tag: hvac}, range: 6h}
        - {type: alarms, select: {site: plant-b}}
        - type: devices
          select: {group: line-9, tag: [hvac, nonexistent]}
        - {type: stat}
        - {type: timeseries, metrics: [motor_rpm], select: {device: cam_gate_01}}
        - {type: map, select: {tag: video, group: line-2}}
"""


def site_with(tmp_path: Path, text: str | None) -> Path:
    site = tmp_path / "site"
    shutil.copytree(DEMO, site)
    (site / "dashboards.yaml").unlink()
    if text is not None:
        (site / "dashboards.yaml").write_text(text, encoding="utf-8")
    return site


def test_demo_dashboard_is_valid() -> None:
    loaded = load_site(DEMO)
    assert ("Dashboard", "plant-overview") in loaded.specs


def test_bad_panels_are_located(tmp_path: Path) -> None:
    site = site_with(tmp_path, BAD)
    with pytest.raises(SpecError) as info:
        load_site(site)
    f = str(site / "dashboards.yaml")
    lines = [
        str(p).removeprefix(f + ":")
        for p in info.value.problems
        if p.location is not None and p.location.file == f
    ]
    text = "\n".join(lines)
    assert "9:18:" in text and '"mapp"' in text and "is not a panel type" in text
    assert any(s.startswith("10:") and "unknown metric 'temprature'" in s for s in lines)
    assert any(s.startswith("11:") and "unknown metric 'nope'" in s for s in lines)
    assert any(s.startswith("12:") and "unknown site 'plant-b'" in s for s in lines)
    assert any(s.startswith("14:") and "unknown group 'line-9'" in s for s in lines)
    assert any(s.startswith("14:") and "unknown tag 'nonexistent'" in s for s in lines)
    assert any(s.startswith("15:") and "a stat panel needs metric" in s for s in lines)
    assert any(
        s.startswith("16:") and "unknown metric 'motor_rpm'" in s and "selected devices" in s
        for s in lines
    )
    assert any(s.startswith("17:") and "selects no device" in s for s in lines)
    hints = [p.hint for p in info.value.problems if p.hint]
    assert "did you mean 'temperature'?" in hints


def test_default_dashboard_when_none_declared(tmp_path: Path) -> None:
    site = site_with(tmp_path, None)
    loaded = load_site(site)
    docs = [d.body for d in loaded.documents.values()]
    boards = dashboards_of(docs)
    assert len(boards) == 1
    board = boards[0]
    assert board["metadata"]["labels"] == {"generated": "true"}
    titles = [p["title"] for p in board["spec"]["pages"]]
    assert titles == ["Overview", "Telemetry", "Control", "History"]
    types = [p["type"] for page in board["spec"]["pages"] for r in page_rows(page) for p in r]
    overview = [[p["type"] for p in r] for r in page_rows(board["spec"]["pages"][0])]
    assert overview == [["stat"] * 4, ["map", "alarms"], ["devices"]]
    for t in ("map", "alarms", "devices", "timeseries", "history", "commands", "scenes"):
        assert t in types
    charts = [p for p in board["spec"]["pages"][1]["panels"]]
    assert {c["select"]["model"] for c in charts} == {
        "th-sensor-v2",
        "fan-controller",
        "ip-camera",
        "plc-s7",
        "edge-gateway",
        "energy-meter",
        "air-quality",  # the demo device that speaks MQTT
        "boiler-modbus",  # the demo PLC that speaks Modbus TCP
        "boiler",  # the demo device behind an OPC UA server
        "acme-th8",  # the demo device whose binary payload a Wasm plugin decodes
    }
    # motion is boolean telemetry: not charted
    cam = next(c for c in charts if c["select"]["model"] == "ip-camera")
    assert cam["metrics"][:2] == ["fps", "bitrate"] and "frame_age" in cam["metrics"]
    # the generated dashboard passes the same checks as a declared one
    import yaml

    (site / "dashboards.yaml").write_text(yaml.safe_dump(board, sort_keys=False), encoding="utf-8")
    assert ("Dashboard", "plant-a-default") in load_site(site).specs


def test_declared_dashboards_win() -> None:
    docs = [d.body for d in load_site(DEMO).documents.values()]
    assert [b["metadata"]["name"] for b in dashboards_of(docs)] == ["plant-overview"]


def test_layout_rows_and_widths() -> None:
    page = {
        "title": "x",
        "panels": [
            {"type": "stat", "width": 4},
            {"type": "stat", "width": 4},
            {"type": "stat", "width": 6},
            {"type": "devices"},
        ],
        "rows": [{"panels": [{"type": "map", "width": 8}, {"type": "alarms"}]}],
    }
    rows = page_rows(page)
    assert [[p["type"] for p in r] for r in rows] == [
        ["stat", "stat"],
        ["stat"],
        ["devices"],
        ["map", "alarms"],
    ]
    assert row_widths(rows[3]) == [8, 4]
    assert row_widths([{"type": "a"}, {"type": "b"}, {"type": "c"}]) == [4, 4, 4]


def test_select_nested_groups() -> None:
    loaded = load_site(DEMO)
    devices = [d.body for d in loaded.of_kind("Device").values()]
    groups = {n: d.body for n, d in loaded.of_kind("DeviceGroup").items()}
    line1 = select_devices(devices, {"group": "line-1"}, groups)
    assert "plc_conveyor_01" in line1 and "temp_sensor_01" in line1  # cell-1a nests under line-1
    assert select_devices(devices, {"tag": "video"}, groups) == ["cam_gate_01", "cam_line_01"]
    assert len(select_devices(devices, None, groups)) == len(devices)
    assert default_dashboard([])["spec"]["pages"][0]["title"] == "Overview"


def test_dashboard_command_line() -> None:
    from twin.cli.dashboard_cmds import app_path, dashboard_command

    cmd, env, url = dashboard_command(DEMO, "http://127.0.0.1:9/", "127.0.0.1", 0, refresh="0")
    port = int(url.rsplit(":", 1)[1])
    assert port > 0 and cmd[cmd.index("--server.port") + 1] == str(port)
    assert cmd[1:4] == ["-m", "dashboards.serve", "run"] and cmd[4] == str(app_path())
    assert env["FLUX_SERVER"] == "http://127.0.0.1:9" and env["FLUX_SITE"] == str(DEMO)
    assert env["FLUX_REFRESH"] == "0"


def test_serve_preloads_then_hands_over_to_streamlit() -> None:
    """`python -m dashboards.serve` is Streamlit's command line after the preload (here
    `--version`, so no server starts); the preloaded site is served once, then read again."""
    import subprocess
    import sys

    from dashboards import core

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.serve", "--version"],
        env={**os.environ, "FLUX_SITE": str(DEMO), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Streamlit, version" in proc.stdout, proc.stderr
    core.preload_docs(str(DEMO))
    first = core.load_docs(str(DEMO))
    assert any(d["kind"] == "Dashboard" for d in first)
    assert str(DEMO) not in core._PRELOADED  # handed over once
    assert core.load_docs(str(DEMO)) == first
