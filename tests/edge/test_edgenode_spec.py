"""``kind: EdgeNode``: schema errors and cross-document checks, located at file:line:column."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from twin.errors import SpecError
from twin.spec import load_site
from twin.spec.edge_check import edge_owned, overflow_policy, parse_size

DEMO = Path(__file__).resolve().parents[2] / "sites" / "demo"

EDGE = """\
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {name: gw-1, site: plant-a}
spec:
  devices: {group: cell-1a}
  uplink: {url: "http://127.0.0.1:8080", transport: https, key: {secret: gw-1-key}}
  buffer:
    max_bytes: 64MB
    overflow: {drop: [telemetry, scene_trace], never: [command_result, alarm]}
"""


def _site(tmp_path: Path, edge: str) -> Path:
    site = tmp_path / "site"
    shutil.copytree(DEMO, site)
    (site / "edge.yaml").write_text(edge)
    return site


def test_valid_edge_owns_its_group(tmp_path: Path) -> None:
    loaded = load_site(_site(tmp_path, EDGE))
    specs = {k: d.body for k, d in loaded.documents.items()}
    owned = edge_owned(specs)
    groups = {n: d.body["metadata"].get("group") for (k, n), d in loaded.documents.items()
              if k == "Device"}
    assert owned and set(owned.values()) == {"gw-1"}
    assert set(owned) == {n for n, g in groups.items() if g == "cell-1a"}
    assert overflow_policy(specs[("EdgeNode", "gw-1")]["spec"]) == (
        ("telemetry", "scene_trace"), ("command_result", "alarm"))


def test_schema_and_reference_errors_are_located(tmp_path: Path) -> None:
    bad = (EDGE.replace("64MB", "64 parsecs")
           .replace("group: cell-1a", "group: cell-9z")
           .replace("never: [command_result, alarm]", "never: [telemetry, alarm]")
           .replace('key: {secret: gw-1-key}', 'key: hunter2'))
    with pytest.raises(SpecError) as info:
        load_site(_site(tmp_path, bad))
    text = [str(p) for p in info.value.problems]
    edge = [t for t in text if "edge.yaml:" in t]
    assert any("edge.yaml:8:" in t and "max_bytes" in t for t in edge), edge
    assert any("edge.yaml:6:" in t and "secret reference" in t for t in edge), edge
    assert any("unknown DeviceGroup 'cell-9z'" in t for t in edge), edge
    assert any("'telemetry' is both dropped and never dropped" in t for t in edge), edge


def test_a_device_owned_twice_is_refused(tmp_path: Path) -> None:
    two = EDGE + "---\n" + EDGE.replace("gw-1", "gw-2").replace(
        "group: cell-1a", "names: [temp_sensor_01]")
    with pytest.raises(SpecError) as info:
        load_site(_site(tmp_path, two))
    assert any("'temp_sensor_01' is owned by EdgeNode" in str(p) for p in info.value.problems)


def test_parse_size() -> None:
    assert parse_size("64MB") == 64_000_000
    assert parse_size("2GiB") == 2 << 30
    assert parse_size(1000) == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_mqtt_transport_needs_a_broker_url(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_site(_site(tmp_path, EDGE.replace("transport: https", "transport: mqtt")))
    assert any("does not fit transport 'mqtt'" in str(p) for p in info.value.problems)
    mqtt = EDGE.replace("transport: https", "transport: mqtt").replace(
        "http://127.0.0.1:8080", "mqtts://127.0.0.1:8883")
    assert ("EdgeNode", "gw-1") in load_site(_site(tmp_path / "m", mqtt)).documents
