"""The `twin` command end to end, as a user runs it (a real subprocess), on both registries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.registry.conftest import PG_URL, _drop_schema, _with_schema, pg_unavailable

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sites" / "demo"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, tmp_path: Path):
    e = {**os.environ, "TWIN_STATE_DIR": str(tmp_path / "state"), "TWIN_AUTHOR": "tester",
         "COLUMNS": "200"}
    e.pop("TWIN_REGISTRY", None)
    schema = None
    if request.param == "postgres":
        why = pg_unavailable()
        if why:
            pytest.skip(why)
        schema = f"t_cli_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
        e["TWIN_REGISTRY"] = _with_schema(PG_URL, schema)
    yield e
    if schema:
        _drop_schema(schema)


def twin(env: dict[str, str], *args: str, code: int = 0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "twin.cli", *args], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy_demo(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(DEMO, site)
    return site


EXTRA = """apiVersion: flux.iot/v1
kind: Device
metadata: {name: extra_01, site: plant-a, group: utilities, tags: [temp]}
spec: {type: sensor, model: th-sensor-v2, binding: http}
"""


def test_demo_lifecycle(env, tmp_path: Path) -> None:
    from twin.spec import load_site

    site = copy_demo(tmp_path)
    (site / "extra.yaml").write_text(EXTRA)
    loaded = load_site(site)
    n_docs = len(loaded.documents)
    n_files = len(loaded.files)  # sites/demo/simulators/ is not specs (.twinignore)
    assert n_files == len(list(site.glob("*.yaml")))
    out = twin(env, "validate", str(site)).stdout
    assert f"{n_docs} documents in {n_files} files are valid" in out
    plan = json.loads(twin(env, "plan", str(site), "-o", "json").stdout)
    assert plan["base_revision"] == 0 and plan["counts"]["create"] == n_docs
    applied = json.loads(twin(env, "apply", str(site), "-m", "first", "-o", "json").stdout)
    assert applied["revision"]["revision"] == 1 and applied["revision"]["author"] == "tester"
    # re-applying the same files is a no-op
    again = json.loads(twin(env, "apply", str(site), "-o", "json").stdout)
    assert again["revision"] is None and again["counts"]["create"] == 0
    assert "No changes" in twin(env, "plan", str(site)).stdout

    # edit one device: a field-level update
    devices = site / "devices.yaml"
    devices.write_text(devices.read_text().replace("desired: {sampling_rate: 5}", "desired: {sampling_rate: 7}"))
    plan_text = twin(env, "plan", str(site)).stdout
    assert "~ Device temp_sensor_01" in plan_text
    assert "~ spec.desired.sampling_rate: 5 → 7" in plan_text
    assert "Plan: 0 to create, 1 to update, 0 to delete." in plan_text
    twin(env, "apply", str(site), "-m", "faster")

    # remove a device: left alone without --prune, deleted with it
    (site / "extra.yaml").unlink()
    kept = twin(env, "plan", str(site)).stdout
    assert "= Device extra_01" in kept and "--prune" in kept
    pruned = json.loads(twin(env, "apply", str(site), "--prune", "-o", "json").stdout)
    assert pruned["counts"]["delete"] == 1 and pruned["revision"]["revision"] == 3

    hist = json.loads(twin(env, "history", "-o", "json").stdout)
    assert [h["revision"] for h in hist] == [3, 2, 1]
    assert hist[1]["message"] == "faster" and hist[0]["deleted"] == 1

    diff = json.loads(twin(env, "diff", "1", "3", "-o", "json").stdout)
    assert {(c["action"], c["name"]) for c in diff["changes"]} == {
        ("update", "temp_sensor_01"), ("delete", "extra_01")}

    # rollback makes a new revision with revision 1's content
    twin(env, "rollback", "1")
    hist = json.loads(twin(env, "history", "-o", "json").stdout)
    assert hist[0]["revision"] == 4 and hist[0]["source"] == "rollback"
    assert hist[0]["hash"] == hist[-1]["hash"]
    got = json.loads(twin(env, "get", "device", "extra_01", "-o", "json").stdout)
    assert got[0]["metadata"]["name"] == "extra_01"

    # get with selectors, describe with the group path and the last revision
    hvac = json.loads(twin(env, "get", "devices", "-l", "tag=hvac", "-o", "json").stdout)
    assert sorted(d["metadata"]["name"] for d in hvac) == [
        "fan_01", "fan_02", "temp_sensor_01", "temp_sensor_02", "temp_sensor_03"]
    line1 = json.loads(twin(env, "get", "devices", "-l", "group=line-1,type!=camera", "-o", "json").stdout)
    assert sorted(d["metadata"]["name"] for d in line1) == ["fan_01", "plc_conveyor_01", "temp_sensor_01",
                                                            "temp_sensor_02"]
    table = twin(env, "get", "devices", "-l", "floor=2").stdout
    assert "fan_02" in table and "temp_sensor_03" in table and "fan_01" not in table
    desc = json.loads(twin(env, "describe", "device", "temp_sensor_01", "-o", "json").stdout)
    assert desc["group_path"] == ["plant", "line-1", "cell-1a"]
    assert desc["last_changed_revision"] == 4
    assert desc["model"]["name"] == "th-sensor-v2" and desc["status"] == "offline"
    assert "set_sampling_rate" in desc["model"]["commands"]
    text = twin(env, "describe", "device", "temp_sensor_01").stdout
    assert "group path:   plant → line-1 → cell-1a" in text
    assert "sampling_rate: integer [s] 1..3600 readwrite" in text


def test_invalid_specs_exit_2_and_apply_nothing(env, tmp_path: Path) -> None:
    site = copy_demo(tmp_path)
    models = site / "models.yaml"
    models.write_text(models.read_text().replace("max: 3600, access: readwrite, default: 5",
                                                 "max: 3600, access: read, default: 5"))
    proc = twin(env, "validate", str(site), code=2)
    assert "devices.yaml:23:28: Device temp_sensor_01: spec.desired.sampling_rate: property " \
           "'sampling_rate' of model 'th-sensor-v2' is read-only" in proc.stderr
    # temp_sensor_02 too, and the model's own command that sets it: every problem is reported
    assert "models.yaml:22:29: DeviceModel th-sensor-v2: spec.commands.set_sampling_rate.sets." \
           "sampling_rate: property 'sampling_rate' is read-only" in proc.stderr
    assert "3 problems found" in proc.stderr
    twin(env, "apply", str(site), code=2)
    assert "No revisions yet" in twin(env, "history").stdout
    problems = json.loads(twin(env, "validate", str(site), "-o", "json", code=2).stdout)["problems"]
    assert {(p["line"], p["name"]) for p in problems} == {
        (23, "temp_sensor_01"), (43, "temp_sensor_02"), (22, "th-sensor-v2")}


def test_validate_reports_a_syntax_error_first_and_counts_its_echoes(tmp_path: Path) -> None:
    site = copy_demo(tmp_path)
    models = site / "models.yaml"
    models.write_text(models.read_text().replace("access: readwrite, default: 5}", "access: readwrite", 1))
    e = {**os.environ, "TWIN_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    lines = twin(e, "validate", str(site), code=2).stderr.splitlines()
    assert "models.yaml:13:" in lines[0] and "YAML syntax error" in lines[0], lines
    assert not any("unknown DeviceModel" in line for line in lines), lines
    assert lines[1] == "✗ 1 problem found (17 follow-on problems suppressed)", lines  # 17 devices
    assert "fix the syntax errors first" in lines[2]
    out = json.loads(twin(e, "validate", str(site), "-o", "json", code=2).stdout)
    assert out["suppressed"] == 17 and len(out["problems"]) == 1


def test_errors_are_one_line_with_hint(env) -> None:
    proc = twin(env, "rollback", "9", code=1)
    assert proc.stderr.splitlines() == ["error: no revision 9", "hint: `twin history` lists the revisions"]
    proc = twin(env, "describe", "device", "nope", code=1)
    assert proc.stderr.startswith("error: Device 'nope' not found")
    proc = twin(env, "get", "gizmos", code=1)
    assert "unknown kind 'gizmos'" in proc.stderr and "Traceback" not in proc.stderr
    proc = twin(env, "--debug", "get", "gizmos", code=1)
    assert "Traceback" in proc.stderr
    proc = twin(env, "validate", "/nonexistent/folder", code=2)
    assert "/nonexistent/folder:1:1: no such file or folder" in proc.stderr


def test_concurrent_applies_one_wins(env, tmp_path: Path) -> None:
    """Two shells apply different changes at once: no corruption, the loser gets a conflict."""
    a, b = copy_demo(tmp_path / "a"), copy_demo(tmp_path / "b")
    twin(env, "apply", str(a))
    for site, rate in ((a, "11"), (b, "12")):
        f = site / "devices.yaml"
        f.write_text(f.read_text().replace("desired: {sampling_rate: 5}", f"desired: {{sampling_rate: {rate}}}"))
    results: list[subprocess.CompletedProcess[str]] = []
    barrier = threading.Barrier(2)

    def run(site: Path) -> None:
        barrier.wait()
        results.append(subprocess.run([sys.executable, "-m", "twin.cli", "apply", str(site)], env=env,
                                      capture_output=True, text=True, timeout=120))

    threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results)
    hist = json.loads(twin(env, "history", "-o", "json").stdout)
    if codes == [0, 1]:  # they raced: exactly one conflict, with the re-plan hint
        loser = next(r for r in results if r.returncode == 1)
        assert "conflict" in loser.stderr.lower() or "meanwhile" in loser.stderr.lower()
        assert "twin plan" in loser.stderr
        assert [h["revision"] for h in hist] == [2, 1]
    else:  # one finished before the other planned: both land, in order
        assert codes == [0, 0]
        assert [h["revision"] for h in hist] == [3, 2, 1]
    # whatever happened, the registry holds exactly the content of the last revision
    got = json.loads(twin(env, "get", "device", "temp_sensor_01", "-o", "json").stdout)
    assert got[0]["spec"]["desired"]["sampling_rate"] in (11, 12)
