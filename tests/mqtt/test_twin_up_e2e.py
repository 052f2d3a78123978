"""End to end: `twin up` with the embedded broker on a free port, a device connecting with its
device key, its telemetry in the API's twin and the broker on /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import WAIT, Client, interrupt
from .test_listeners_cli import ROOT

DEVICES = """\
apiVersion: flux.iot/v1
kind: Device
metadata: {name: mq1, site: plant-a}
spec:
  type: sensor
  model: th-sensor-v2
  binding: {mqtt: {}}
  heartbeat: {interval: 60s, timeout: 300s}
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="250", NO_COLOR="1")


def _twin(tmp_path: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "twin.cli", "--state-dir", str(tmp_path / "st"), *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=str(tmp_path),
        timeout=120,
        check=True,
    )
    return out.stdout


def _demo_with_mq1(tmp_path: Path) -> str:
    """Apply the demo site plus the MQTT device mq1; mq1's new device key."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("site.yaml", "models.yaml", "plugins.yaml"):  # a demo model names a plugin
        shutil.copy(ROOT / "sites" / "demo" / name, site / name)
    shutil.copytree(ROOT / "sites" / "demo" / "plugins", site / "plugins")
    (site / "devices.yaml").write_text(DEVICES)
    _twin(tmp_path, "apply", str(site))
    return _twin(tmp_path, "device-key", "create", "mq1").strip().splitlines()[-1]


@pytest.mark.slow
def test_twin_up_embedded_broker_end_to_end(tmp_path: Path) -> None:
    key = _demo_with_mq1(tmp_path)
    _twin(tmp_path, "user", "add", "admin", "--role", "admin", "--password", "adminpass1")
    token = _twin(tmp_path, "token", "create", "admin").strip().splitlines()[-1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twin.cli",
            "--state-dir",
            str(tmp_path / "st"),
            "up",
            "--listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
        cwd=str(tmp_path),
    )
    try:
        assert proc.stdout is not None
        api = mqtt = None
        deadline = time.monotonic() + 60
        while (api is None or mqtt is None) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if m := re.search(r"api\s+(http://\S+)/api/v1", line):
                api = m.group(1)
            if m := re.search(r"mqtt\s+mqtt://127\.0\.0\.1:(\d+)", line):
                mqtt = int(m.group(1))
        assert api and mqtt, "banner without api / mqtt lines"
        dev = Client(mqtt, "mq1", username="mq1", password=key)
        assert dev.connack is not None and not dev.connack[1].is_failure
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=api, headers=headers, timeout=WAIT) as http:
            deadline = time.monotonic() + WAIT
            reported: dict[str, object] = {}
            while time.monotonic() < deadline:
                # periodic telemetry, as a device sends it: the engine's routes for the device
                # may be set up a moment after the banner
                dev.publish("flux/plant-a/mq1/telemetry", json.dumps({"temperature": 23.5}), 1)
                doc = http.get("/api/v1/devices/mq1/twin").json()
                reported = doc.get("reported") or {}
                if "temperature" in reported:
                    break
                time.sleep(0.2)
            assert "temperature" in reported, reported
            metrics = http.get("/metrics").text
        assert "twin_mqtt_clients_connected 1.0" in metrics
        dev.close()
    finally:
        interrupt(proc)


@pytest.mark.slow
def test_twin_up_wss_listener_and_max_keep_alive(tmp_path: Path) -> None:
    from .test_listeners_cli import _server_cert, _wss_connack

    key = _demo_with_mq1(tmp_path)
    ca_file, cert, keyfile = _server_cert(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "twin.cli", "--state-dir", str(tmp_path / "st"), "up", "--no-api",
         "--no-timeseries", "--mqtt-listen", "127.0.0.1:0", "--mqtt-wss-listen", "127.0.0.1:0",
         "--mqtt-certfile", cert, "--mqtt-keyfile", keyfile, "--mqtt-max-keep-alive", "9"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=str(tmp_path),
    )
    try:
        assert proc.stdout is not None
        wss = None
        deadline = time.monotonic() + 60
        while wss is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if m := re.search(r"wss://127\.0\.0\.1:(\d+)", line):
                wss = int(m.group(1))
        assert wss, "banner without the wss listener"
        rc, props = _wss_connack(wss, ca_file, "mq1", key)
        assert not rc.is_failure and props.ServerKeepAlive == 9
    finally:
        interrupt(proc)
