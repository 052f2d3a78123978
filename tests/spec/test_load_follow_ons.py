"""A file that cannot be parsed is reported first, and the problems it causes elsewhere (references
to the documents it would have defined) are suppressed and counted, not listed ahead of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from twin.errors import SpecError
from twin.spec import load_site

DEMO = Path(__file__).resolve().parents[2] / "sites" / "demo"


def broken_demo(tmp_path: Path) -> Path:
    site = tmp_path / "demo"
    shutil.copytree(DEMO, site)
    models = site / "models.yaml"
    text = models.read_text()
    # an unclosed flow mapping: every model in the file is lost
    models.write_text(text.replace("min: 1, max: 3600, access: readwrite, default: 5}", "min: 1", 1))
    return site


def test_syntax_error_first_and_its_echoes_suppressed(tmp_path: Path) -> None:
    site = broken_demo(tmp_path)
    # a genuine, unrelated problem in another file is still reported
    scenes = site / "scenes.yaml"
    scenes.write_text(scenes.read_text() + "\n---\napiVersion: flux.iot/v1\nkind: Scene\n"
                      "metadata: {name: typo-scene, site: plant-a}\nspec:\n  triggers:\n"
                      "    - {type: device_data, device: fan_99, point: power, operator: \">\", value: 1}\n"
                      "  actions:\n    - {type: command, device: fan_01, command: set_state, "
                      "params: {state: true}}\n")
    with pytest.raises(SpecError) as info:
        load_site(site)
    exc = info.value
    first = exc.problems[0]
    assert first.syntax and first.location is not None
    assert first.location.file.endswith("models.yaml") and "YAML syntax error" in first.message
    messages = [str(p) for p in exc.problems]
    assert not any("unknown DeviceModel" in m for m in messages), messages
    assert any("unknown Device 'fan_99'" in m for m in messages), messages
    assert exc.suppressed >= 12  # one per demo device naming a model of the broken file
    assert "syntax" in (exc.hint or "")


def test_syntax_errors_sort_before_earlier_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: flux.iot/v1\nkind: Gizmo\nmetadata: {name: x}\n")
    (tmp_path / "b.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_site(tmp_path)
    files = [Path(p.location.file).name for p in info.value.problems if p.location]
    assert files == ["b.yaml", "a.yaml"]
    assert info.value.suppressed == 0


def test_nothing_suppressed_without_a_broken_file(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    shutil.copytree(DEMO, site)
    models = site / "models.yaml"
    models.write_text(models.read_text().replace("name: th-sensor-v2", "name: th-sensor-v3"))
    with pytest.raises(SpecError) as info:
        load_site(site)
    assert info.value.suppressed == 0
    assert sum("unknown DeviceModel 'th-sensor-v2'" in str(p) for p in info.value.problems) >= 3
