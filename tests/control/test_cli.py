"""`twin simulate`, `twin scene list|trace`, `twin command list|get` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twin.registry import open_registry
from twin.registry.base import CommandRecord, SceneTrace

ROOT = Path(__file__).resolve().parents[2]


def twin(state: Path, *args: str, code: int = 0) -> str:
    env = {**os.environ, "TWIN_STATE_DIR": str(state), "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "twin.cli", "--state-dir", str(state), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc.stdout


def test_simulate_demo(tmp_path: Path) -> None:
    out = twin(
        tmp_path,
        "simulate",
        "sites/demo",
        "--scenario",
        "sites/demo/scenarios/hot-afternoon.csv",
        code=3,
    )
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "fan-on-when-hot fired" in line)
    assert lines[first].startswith("12:01:00")
    assert "command fan_01 set_state" in lines[first + 1]
    assert any("conflict on fan_01 speed" in line for line in lines)
    out = twin(tmp_path, "simulate", "sites/demo", "--scenario", "sites/demo/scenarios/night.csv")
    assert "command cam_gate_01 ptz" in out
    assert "no conflicts, no trigger loops" in out


def test_scene_and_command_reading_commands(tmp_path: Path) -> None:
    twin(tmp_path, "apply", "sites/demo", "-m", "demo")
    reg = open_registry(None, tmp_path)
    reg.insert_command(
        CommandRecord(
            id="cmd_1",
            seq=1,
            device="fan_01",
            type="set_state",
            params={"state": True},
            status="success",
            timeout=30,
            deadline=130,
            created_at=100,
            updated_at=101,
            transitions=(("pending", 100.0), ("sent", 100.5), ("success", 101.0)),
            source="api:oper",
        )
    )
    reg.save_scene_trace(
        SceneTrace(
            "run_1",
            "fan-on-when-hot",
            100,
            101,
            "success",
            {
                "run_id": "run_1",
                "scene": "fan-on-when-hot",
                "status": "success",
                "started_at": 100,
                "duration": 0.01,
                "trigger": {"type": "device_data", "value": 31},
                "conditions": [{"path": "conditions/0", "type": "time", "result": True}],
                "steps": [
                    {
                        "path": "actions/0",
                        "type": "command",
                        "outcome": "ok",
                        "duration": 0.001,
                        "result": {"command": "cmd_1"},
                    }
                ],
            },
        )
    )
    reg.close()
    out = twin(tmp_path, "scene", "list")
    assert "fan-on-when-hot" in out and "gate-patrol" in out
    out = twin(tmp_path, "scene", "trace", "fan-on-when-hot")
    assert "run_1" in out and "actions/0 command" in out and "conditions/0 time" in out
    out = twin(tmp_path, "command", "list", "fan_01")
    assert "cmd_1" in out and "success" in out
    out = twin(tmp_path, "command", "get", "cmd_1")
    assert "pending" in out and "sent" in out and "success" in out
    err = subprocess.run(
        [
            sys.executable,
            "-m",
            "twin.cli",
            "--state-dir",
            str(tmp_path),
            "command",
            "send",
            "fan_01",
            "reboot",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TWIN_SERVER"},
    )
    assert err.returncode == 1 and "needs a running engine" in err.stderr
