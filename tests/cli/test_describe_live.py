"""`twin describe --server` against a real `twin up` process: live twin state from the engine."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from cli.procs import CLI, ROOT, start_up


def test_describe_shows_live_twin(tmp_path: Path) -> None:
    env = {**os.environ, "TWIN_STATE_DIR": str(tmp_path / "state"), "TWIN_AUTHOR": "tester"}
    env.pop("TWIN_REGISTRY", None)
    up = start_up(env, str(ROOT / "sites" / "demo"), "--listen", "127.0.0.1:0",
                  "--mqtt-listen", "127.0.0.1:0")
    url = up.url
    try:
        run = lambda *a: subprocess.run([*CLI, *a], env=env, capture_output=True, text=True, timeout=60)  # noqa: E731
        assert run("user", "add", "ops", "--role", "operator", "--password", "long enough pw").returncode == 0
        token = run("token", "create", "ops").stdout.strip().splitlines()[-1]
        env["TWIN_TOKEN"] = token
        for _ in range(100):  # until the simulated fan has reported its current
            proc = run("describe", "device", "fan_01", "--server", url, "-o", "json")
            assert proc.returncode == 0, proc.stderr
            info = json.loads(proc.stdout)
            if "current" in info["twin"]["reported"]:
                break
            time.sleep(0.2)
        assert info["twin"]["status"] == "online"
        assert info["twin"]["desired"] == {"power": False, "speed": 40}
        assert isinstance(info["twin"]["reported"]["current"]["value"], float)
        assert info["group_path"] == ["plant", "line-1", "cell-1a"]
        # a command sent through the engine shows up in describe's command history
        sent = run("command", "send", "fan_01", "set_state", "-p", "state=true", "--wait", "--server", url)
        assert sent.returncode == 0, sent.stderr
        info = json.loads(run("describe", "device", "fan_01", "--server", url, "-o", "json").stdout)
        cmd = next(c for c in info["commands"] if c["type"] == "set_state")
        assert cmd["params"] == {"state": True} and cmd["status"] == "success"
        assert cmd["transitions"][0]["status"] == "pending"
        # set_state declares `sets: {power: {param: state}}`: its success is runtime desired
        # state (an override with who and when), which the reconciler keeps, not reverts
        override = info["twin"]["overrides"]["power"]
        assert override["value"] is True and override["spec_value"] is False
        assert override["set_by"] == f"api:ops (command set_state {cmd['id']})"
        assert info["twin"]["desired"]["power"] is True
        # the simulated fan acts on it: power is reported on and its current rises (speed 40 or
        # a scene's 80, * 0.04 A, over an idle 0.1-0.3 A; sites/demo/devices.yaml)
        for _ in range(150):
            rep = json.loads(run("describe", "device", "fan_01", "--server", url, "-o", "json").stdout)
            rep = rep["twin"]["reported"]
            if rep.get("power", {}).get("value") is True and rep["current"]["value"] > 1.2:
                break
            time.sleep(0.2)
        assert rep["power"]["value"] is True and rep["current"]["value"] > 1.2, rep
        text = run("describe", "device", "fan_01", "--server", url).stdout
        assert "power = true (spec false)  set by api:ops (command set_state" in text
        # runtime writes are not revisions: the files plan to nothing, re-applying keeps them
        plan = json.loads(run("plan", str(ROOT / "sites" / "demo"), "-o", "json").stdout)
        assert [c for c in plan["changes"] if c["action"] != "keep"] == [], plan
        assert run("apply", str(ROOT / "sites" / "demo")).returncode == 0
        env.pop("TWIN_TOKEN")  # the local registry holds the same ledger and the overrides
        local = json.loads(run("describe", "device", "fan_01", "-o", "json").stdout)
        assert any(c["id"] == cmd["id"] and c["status"] == "success" for c in local["commands"])
        assert local["overrides"]["power"]["value"] is True
        # the demo's MQTT device: a separate client that logged in with its provisioned key
        key_file = tmp_path / "state" / "simulators" / "air_quality_01.key"
        assert key_file.read_text().startswith("dk_")
        env["TWIN_TOKEN"] = token
        for _ in range(100):
            aq = json.loads(run("describe", "device", "air_quality_01", "--server", url, "-o", "json").stdout)
            if {"co2", "pm25"} <= set(aq["twin"]["reported"]):
                break
            time.sleep(0.2)
        assert 450 <= aq["twin"]["reported"]["co2"]["value"] <= 1100, aq["twin"]
        assert aq["twin"]["status"] == "online"
    finally:
        up.stop()
