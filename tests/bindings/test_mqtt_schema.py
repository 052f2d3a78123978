"""specs/binding-mqtt.schema.json: the extended options validate, mistakes are located."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from twin.errors import SpecError
from twin.spec import load_site

DEMO = Path(__file__).resolve().parents[2] / "sites" / "demo"

GOOD = """\
apiVersion: flux.iot/v1
kind: Device
metadata: {name: mq1, site: plant-a}
spec:
  type: sensor
  model: th-sensor-v2
  binding:
    mqtt:
      broker: embedded
      prefix: "plant/{site}/{device}"
      topics: {telemetry: "sensors/{device}/+", desired: "plant/{device}/set"}
      format: raw
      point: temperature
      ts_field: time
      qos: 1
      retain: false
      retained: true
      command_timeout: 10s
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: mq0, site: plant-a}
spec: {type: sensor, model: th-sensor-v2, binding: {mqtt: {}}}
"""

BAD = """\
apiVersion: flux.iot/v1
kind: Device
metadata: {name: mq2, site: plant-a}
spec:
  type: sensor
  model: th-sensor-v2
  binding:
    mqtt: {command_timeout: soon, topics: {command: "a/#"}}
"""


def _site(tmp_path: Path, devices: str) -> Path:
    for name in ("site.yaml", "models.yaml", "plugins.yaml"):  # a model names a plugin
        shutil.copy(DEMO / name, tmp_path / name)
    shutil.copytree(DEMO / "plugins", tmp_path / "plugins")
    (tmp_path / "devices.yaml").write_text(devices)
    return tmp_path


def test_extended_options_validate(tmp_path: Path) -> None:
    loaded = load_site([_site(tmp_path, GOOD)])
    assert loaded is not None


def test_mistakes_are_located(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_site([_site(tmp_path, BAD)])
    msgs = [str(p) for p in info.value.problems]
    assert any("command_timeout" in m and "is not a duration" in m for m in msgs), msgs
    assert any("topics.command" in m and "does not match" in m for m in msgs), msgs
