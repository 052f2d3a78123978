"""`kind: Plugin` in a site folder: the module file read, hashed and stored with the revision;
`twin plan` shows a changed module by its hash; a module that does not load is refused at
`twin validate` with file:line and the reason; `twin plugin test` and `twin plugin build`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.modules import ACME_WAT, DERIVE_STAR, WASI_IMPORT, acme_wasm, codec_wat, wat
from twin.errors import SpecError
from twin.spec import load_site

ROOT = Path(__file__).resolve().parents[2]

PLUGINS = """apiVersion: flux.iot/v1
kind: Plugin
metadata: {name: acme}
spec:
  wasm: plugins/acme.wasm
  role: codec
  limits: {fuel: 20000, time: 50ms, memory: 1MiB}
---
apiVersion: flux.iot/v1
kind: Plugin
metadata: {name: derive}
spec:
  starlark: plugins/derive.star
  role: transform
"""

DEVICE = """apiVersion: flux.iot/v1
kind: Device
metadata: {name: th8}
spec:
  type: sensor
  transform: derive
  binding: {mqtt: {codec: acme}}
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    s = tmp_path / "site"
    (s / "plugins").mkdir(parents=True)
    (s / "plugins" / "acme.wasm").write_bytes(acme_wasm())
    shutil.copy(DERIVE_STAR, s / "plugins" / "derive.star")
    (s / "plugins.yaml").write_text(PLUGINS)
    (s / "device.yaml").write_text(DEVICE)
    return s


def messages(exc: SpecError) -> list[str]:
    return [f"{p.location}: {p.message}" for p in exc.problems]


def test_module_is_embedded_with_its_hash(site: Path) -> None:
    loaded = load_site(site)
    spec = loaded.specs[("Plugin", "acme")]["spec"]
    data = acme_wasm()
    import hashlib

    assert spec["module"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert spec["module"]["size"] == len(data) and spec["module"]["file"] == "plugins/acme.wasm"


@pytest.mark.parametrize(("module", "reason"), [
    (b"\x00asm\x01\x00\x00\x00junk", "not a valid WebAssembly module"),
    (wat(WASI_IMPORT), "imports wasi_snapshot_preview1.fd_write, which is not granted"),
    (wat(codec_wat("(i64.const 0)", entry="other")), "does not export 'decode'"),
    (wat('(module (memory (export "memory") 1))'), "does not export alloc"),
])
def test_a_module_that_does_not_load_is_refused_located(site: Path, module: bytes, reason: str) -> None:
    (site / "plugins" / "acme.wasm").write_bytes(module)
    with pytest.raises(SpecError) as err:
        load_site(site)
    (msg,) = messages(err.value)
    assert msg.startswith(f"{site / 'plugins.yaml'}:5:") and reason in msg
    assert "module plugins/acme.wasm" in msg


def test_starlark_syntax_error_and_missing_function(site: Path) -> None:
    (site / "plugins" / "derive.star").write_text("def transform(readings, config)\n  return 1\n")
    with pytest.raises(SpecError) as err:
        load_site(site)
    assert "does not parse" in messages(err.value)[0]
    (site / "plugins" / "derive.star").write_text("def other(readings, config):\n  return []\n")
    with pytest.raises(SpecError) as err:
        load_site(site)
    assert "does not define transform()" in messages(err.value)[0]


def test_missing_file_escape_and_references(site: Path) -> None:
    text = PLUGINS.replace("plugins/acme.wasm", "../acme.wasm").replace("plugins/derive.star", "nope.star")
    (site / "plugins.yaml").write_text(text)
    (site / "device.yaml").write_text(DEVICE.replace("codec: acme", "codec: derive")
                                      .replace("transform: derive", "transform: ghost"))
    with pytest.raises(SpecError) as err:
        load_site(site)
    text = "\n".join(messages(err.value))
    assert "'../acme.wasm' is outside the site folder" in text
    assert "cannot read module" in text and "nope.star" in text
    assert "unknown Plugin 'ghost'" in text
    assert "Plugin 'derive' has role 'transform', not 'codec'" in text


def cli(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "twin.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {**os.environ, "TWIN_STATE_DIR": str(tmp_path / "state"), "TWIN_AUTHOR": "tester",
         "COLUMNS": "200"}
    e.pop("TWIN_REGISTRY", None)
    return e


def test_plan_shows_a_changed_module_by_hash_and_apply_versions_it(site: Path, env: dict[str, str]) -> None:
    cli(env, "apply", str(site))
    old = __import__("hashlib").sha256(acme_wasm()).hexdigest()
    new_module = acme_wasm().replace(b"temperature", b"temperaturX")
    (site / "plugins" / "acme.wasm").write_bytes(new_module)
    new = __import__("hashlib").sha256(new_module).hexdigest()
    plan = cli(env, "plan", str(site)).stdout
    assert "~ Plugin acme" in plan
    assert f"spec.module.sha256: {old[:20]}" in plan.replace('"', "") and new[:12] in plan
    assert "module.data" not in plan  # the content itself is not printed
    cli(env, "apply", str(site))
    # rollback restores the old module (it is in the revision, not only on disk)
    cli(env, "rollback", "1")
    out = cli(env, "plugin", "test", "acme", "--hex", "a501086610a20bc3", "--json").stdout
    assert json.loads(out)["output"][0][1] == "temperature"


def test_plugin_test_prints_output_and_cost(site: Path, env: dict[str, str], tmp_path: Path) -> None:
    sample = tmp_path / "sample.bin"
    sample.write_bytes(bytes.fromhex("a501086610a20bc3"))
    out = cli(env, "plugin", "test", "acme", "--input", str(sample), "--path", str(site)).stdout
    assert "temperature" in out and "21.5" in out and "42.58" in out and "3.011" in out
    assert "µs per call" in out and "fuel" in out
    data = json.loads(cli(env, "plugin", "test", "acme", "--input", str(sample), "--path", str(site),
                          "--json").stdout)
    assert data["output"][0] == [0, "temperature", 21.5, 0.0, True]
    assert data["cost"]["fuel_per_call"] > 0 and data["cost"]["micros_per_call"] > 0
    readings = tmp_path / "r.json"
    readings.write_text('[{"point": "temperature", "value": 20, "ts": 5}, {"point": "humidity", "value": 50, "ts": 5}]')
    out = cli(env, "plugin", "test", "derive", "--input", str(readings), "--path", str(site)).stdout
    assert "dew_point" in out and "10" in out
    # a plugin that fails: exit 1, the failure named
    (site / "plugins" / "acme.wasm").write_bytes(wat(codec_wat("(loop $l (br $l)) (i64.const 0)")))
    res = cli(env, "plugin", "test", "acme", "--input", str(sample), "--path", str(site), code=1)
    assert "fuel exhausted" in res.stderr


def test_plugin_build_rebuilds_the_demo_codec(tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "acme.wat"
    shutil.copy(ACME_WAT, src)
    cli(env, "plugin", "build", str(src))
    assert (tmp_path / "acme.wasm").read_bytes() == acme_wasm()
    # the shipped .wasm is the build of the shipped .wat
    assert (ACME_WAT.with_suffix(".wasm")).read_bytes() == acme_wasm()
    bad = tmp_path / "bad.wat"
    bad.write_text("(module (func (export \"f\") (i32.add)))")
    res = cli(env, "plugin", "build", str(bad), code=1)
    assert "error:" in res.stderr and "Traceback" not in res.stderr


def test_malformed_documents_do_not_break_the_plugin_checks() -> None:
    """Documents that failed their schema are still checked for references: any shape."""
    from twin.spec import validate_specs

    docs = [
        {"apiVersion": "flux.iot/v1", "kind": "Device", "metadata": {"name": "d"}, "spec": []},
        {"apiVersion": "flux.iot/v1", "kind": "DeviceModel", "metadata": {"name": "m"}, "spec": "x"},
        {"apiVersion": "flux.iot/v1", "kind": "Plugin", "metadata": {"name": "p"}, "spec": [1]},
        {"apiVersion": "flux.iot/v1", "kind": "Device", "metadata": {"name": "e"},
         "spec": {"type": "sensor", "binding": {"mqtt": {"codec": "p"}}, "transform": "p"}},
        {"apiVersion": "flux.iot/v1", "kind": "Scene", "metadata": {"name": "s"},
         "spec": {"triggers": [{"type": "manual"}], "actions": [{"type": "plugin", "plugin": "p"}]}},
    ]
    with pytest.raises(SpecError) as err:
        validate_specs(docs)
    assert all(p.message for p in err.value.problems)
