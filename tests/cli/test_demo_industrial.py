"""The demo shows its OPC UA and CoAP devices live: ``twin up sites/demo`` starts the simulated
OPC UA server and the simulated CoAP meter; their twins go online with values, a command to the
boiler runs its OPC UA method, and the engine's CoAP server lists the meter."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from cli.procs import ROOT, cli_env, run, start_up, wait_for

pytestmark = pytest.mark.slow  # one engine with the whole demo: ~30 s


def hold(port: int) -> socket.socket | None:
    """Listen on 127.0.0.1:``port`` (as another program would), or None if someone else does."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen(1)
    return s


def test_demo_opcua_and_coap_devices_live(tmp_path: Path) -> None:
    """Also with the demo's declared simulator ports (Modbus 15020, OPC UA 48400) taken by
    another program: the simulators serve on free ports and the devices follow them."""
    holders = [h for h in (hold(15020), hold(48400)) if h is not None]
    try:
        _demo_live(tmp_path, len(holders) == 2)
    finally:
        for h in holders:
            h.close()


def _demo_live(tmp_path: Path, held: bool) -> None:
    env = cli_env(tmp_path / "state")
    up = start_up(env, str(ROOT / "sites" / "demo"), "--listen", "127.0.0.1:0",
                  "--mqtt-listen", "127.0.0.1:0", "--no-timeseries")
    try:
        m = re.search(r"^\s*coap\s+(coap://[0-9.]+:\d+)", up.output, re.M)
        assert m, up.output
        coap_url = m.group(1)
        assert run(env, "user", "add", "ops", "--role", "operator", "--password",
                   "long enough pw").returncode == 0
        env["TWIN_TOKEN"] = run(env, "token", "create", "ops").stdout.strip().splitlines()[-1]

        def twin(device: str) -> dict:  # type: ignore[type-arg]
            p = run(env, "describe", "device", device, "--server", up.url, "-o", "json")
            assert p.returncode == 0, p.stderr
            return dict(json.loads(p.stdout)["twin"])

        def live(device: str, point: str) -> dict | None:  # type: ignore[type-arg]
            t = twin(device)
            return t if t["status"] == "online" and point in t["reported"] else None

        boiler = wait_for(lambda: live("boiler_01", "temperature"), "boiler_01 online", 90)
        assert {"pressure", "counter", "setpoint", "running"} <= set(boiler["reported"])
        plc = wait_for(lambda: live("boiler_plc_01", "water_temp"), "boiler_plc_01 online", 60)
        assert plc["reported"]["water_temp"]["quality"] == "good"
        meter = wait_for(lambda: live("meter_coap_01", "power_kw"), "meter_coap_01 online", 60)
        assert {"energy_kwh", "voltage"} <= set(meter["reported"])
        # a command through the ledger runs the boiler's OPC UA method SetSetpoint
        p = run(env, "command", "send", "boiler_01", "set_setpoint", "-p", "value=64.5", "--wait",
                "--server", up.url)
        assert p.returncode == 0, p.stdout + p.stderr
        wait_for(lambda: twin("boiler_01")["reported"]["setpoint"]["value"] == 64.5,
                 "the new setpoint reported back")
        client = shutil.which("coap-client-notls")
        if client:
            out = subprocess.run([client, "-m", "get", f"{coap_url}/.well-known/core"],
                                 capture_output=True, text=True, timeout=30).stdout
            assert "</d/meter_coap_01>" in out
    finally:
        assert up.stop() == 0, up.output[-3000:]
    if held:  # one line each, naming the port used instead
        assert re.search(r"modbus simulator 127\.0\.0\.1:15020 .*taken; serving on port \d+",
                         up.output), up.output[-3000:]
        assert re.search(r"boiler_01: port 48400 is taken; its OPC UA server is at "
                         r"opc\.tcp://127\.0\.0\.1:\d+", up.output), up.output[-3000:]
