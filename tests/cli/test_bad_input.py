"""Bad input through the real `twin` command: refused with located problems, never a hang,
a crash or invalid JSON output."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from runtime.helpers import apply

from tests.spec.test_inputlimits import billion_laughs

ROOT = Path(__file__).resolve().parents[2]


def _limit_memory() -> None:  # before the fix, `apply` of the bomb grew to 2.7 GB
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {**os.environ, "TWIN_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    e.pop("TWIN_REGISTRY", None)
    return e


def twin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twin.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)


def test_alias_bomb_is_refused_by_validate_plan_and_apply(env, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    for cmd in ("validate", "plan", "apply"):
        proc = twin(env, cmd, str(bomb))
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        (line, *_) = proc.stderr.splitlines()
        assert line.startswith(f"{bomb}:") and "metadata.labels.l" in line, line
        assert "alias bomb" in line
    proc = twin(env, "validate", str(bomb), "-o", "json")
    (problem,) = json.loads(proc.stdout)["problems"]
    assert problem["file"] == str(bomb) and problem["line"] >= 6 and problem["path"]
    assert twin(env, "history", "-o", "json").stdout.strip() == "[]"


def test_nan_and_infinity_in_a_spec_are_located(env, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("apiVersion: flux.iot/v1\nkind: Site\nmetadata: {name: s1}\n"
                    "spec:\n  title: x\n  location: {lat: .nan, lon: .inf}\n")
    proc = twin(env, "apply", str(site))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{site}:6:19: Site s1: spec.location.lat: nan is not a finite number" in proc.stderr
    assert f"{site}:6:30: Site s1: spec.location.lon: inf is not a finite number" in proc.stderr


def test_json_output_never_prints_nan(env, tmp_path: Path) -> None:
    """A NaN that slipped into the registry (say, stored before validation refused it) is an
    error with a hint on `-o json`, not invalid JSON on stdout."""
    from twin.registry import open_registry

    reg = open_registry(None, tmp_path / "state")
    site = {"apiVersion": "flux.iot/v1", "kind": "Site", "metadata": {"name": "s1"},
            "spec": {"title": "x", "location": {"lat": float("nan"), "lon": 1.0}}}
    apply(reg, site)
    reg.close()
    proc = twin(env, "describe", "site", "s1", "-o", "json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot print this as JSON" in proc.stderr and "NaN" not in proc.stdout
    proc = twin(env, "get", "sites", "-o", "json")
    assert proc.returncode == 1 and "cannot print this as JSON" in proc.stderr
    proc = twin(env, "get", "sites", "-o", "yaml")  # YAML can say it: .nan
    assert proc.returncode == 0 and "lat: .nan" in proc.stdout


@pytest.mark.parametrize("param", ["x=NaN", "x=Infinity", "x=1e999"])
def test_command_params_refuse_non_finite_numbers(env, param: str) -> None:
    proc = twin(env, "command", "send", "d1", "reboot", "-p", param, "--server", "http://127.0.0.1:9")
    assert proc.returncode == 1
    assert "--param x:" in proc.stderr and "not a finite number" in proc.stderr
    proc = twin(env, "command", "send", "d1", "reboot", "--timeout", "nan", "--server",
                "http://127.0.0.1:9")
    assert proc.returncode == 1 and "--timeout nan: not a finite number" in proc.stderr


def test_simulation_scenario_alias_bomb_is_refused(env, tmp_path: Path) -> None:
    """`twin simulate` reads scenario YAML within the same bounds as specs (it used
    yaml.safe_load, and printing the reading's value expanded the bomb)."""
    levels = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    scenario = tmp_path / "bomb.yaml"
    scenario.write_text("defs:\n" + "".join(f"  {line}\n" for line in levels)
                        + "events:\n  - {at: 10, device: temp_sensor_01, point: temperature,"
                        " value: *l8}\n")
    proc = twin(env, "simulate", "sites/demo", "--scenario", str(scenario))
    assert proc.returncode != 0, proc.stdout[-500:]
    assert "alias bomb" in proc.stderr and f"{scenario}:" in proc.stderr
