"""`twin up` as a real process: Ctrl-C stops it cleanly, a restart picks up exactly where it
was (device statuses, alarms, users and tokens live in the state dir)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx

from cli.procs import CLI, ROOT, start_up, wait_for

FREE_PORTS = ("--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0")


def test_up_restart_keeps_statuses_alarms_and_tokens(tmp_path: Path) -> None:
    env = {**os.environ, "TWIN_STATE_DIR": str(tmp_path / "state"), "TWIN_AUTHOR": "tester"}
    env.pop("TWIN_REGISTRY", None)
    env.pop("TWIN_TOKEN", None)

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *a], env=env, capture_output=True, text=True, timeout=60)

    up = start_up(env, str(ROOT / "sites" / "demo"), *FREE_PORTS)
    url = up.url
    try:
        added = run("user", "add", "ops", "--role", "operator", "--password", "long enough pw")
        assert added.returncode == 0, added.stderr
        made = run("token", "create", "ops")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        keyed = run("device-key", "create", "door_sensor_01")
        assert keyed.returncode == 0, keyed.stderr
        device_key = keyed.stdout.strip().splitlines()[-1]
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url + "/api/v1", headers=auth, timeout=30) as c:

            def status(device: str) -> str:
                r = c.get(f"/devices/{device}/status")
                assert r.status_code == 200, r.text
                return str(r.json()["status"])

            wait_for(lambda: status("fan_01") == "online", "fan_01 online")
            # the HTTP device reports a fault through its own key: status fault + an alarm
            r = c.post(
                "/ingest/door_sensor_01",
                headers={"X-Device-Key": device_key},
                json={"events": [{"type": "fault", "data": {"message": "door jammed"}}]},
            )
            assert r.status_code == 200, r.text
            wait_for(lambda: status("door_sensor_01") == "fault", "door_sensor_01 fault")

            def door_alarms() -> list[dict[str, Any]]:
                r = c.get("/alarms", params={"device": "door_sensor_01", "state": "active"})
                assert r.status_code == 200, r.text
                return list(r.json()["items"])

            alarms = wait_for(door_alarms, "the fault alarm")
            assert [(a["type"], a["severity"]) for a in alarms] == [("fault", "critical")]
            before = {d: status(d) for d in ("fan_01", "door_sensor_01")}
    finally:
        code = up.stop()
    assert code == 0

    # restart without a path: the registry in the state dir is the site
    up = start_up(env, *FREE_PORTS)
    url = up.url
    try:
        with httpx.Client(
            base_url=url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as c:
            # the token issued before the restart still works
            r = c.get("/devices/door_sensor_01/status")
            assert r.status_code == 200, r.text
            # a device that has not talked since the restart keeps its persisted status
            assert r.json()["status"] == before["door_sensor_01"] == "fault"
            wait_for(
                lambda: c.get("/devices/fan_01/status").json()["status"] == "online",
                "fan_01 online again",
            )
            r = c.get("/alarms", params={"device": "door_sensor_01", "state": "active"})
            assert [(a["id"], a["type"]) for a in r.json()["items"]] == [
                (alarms[0]["id"], "fault")
            ]  # the same alarm, not a duplicate
            # the status history written before the restart is there
            r = c.get("/devices/door_sensor_01/status/history")
            assert r.status_code == 200, r.text
            assert "fault" in [h["status"] for h in r.json()["items"]]
        assert "ops" in run("user", "list").stdout
    finally:
        code = up.stop()
    assert code == 0
