"""The parse cache: unchanged files are not parsed again, and nothing changes but speed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from twin.errors import SpecError
from twin.spec import load_site
from twin.spec.yamlload import YamlDocument

DEMO = Path(__file__).resolve().parents[2] / "sites" / "demo"


def test_cache_hits_give_identical_specs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(DEMO, site)
    cache = tmp_path / "cache"
    cold = load_site(site, cache_dir=cache)
    assert len(list(cache.iterdir())) == len(list(site.glob("*.yaml")))  # one entry per file
    warm = load_site(site, cache_dir=cache)
    assert warm.specs == cold.specs == load_site(site).specs
    assert all(d.source.lazy for d in warm.documents.values())


def test_cached_document_with_a_new_reference_error_is_located(tmp_path: Path) -> None:
    """devices.yaml stays cached (unchanged) but its model disappears: the error is located."""
    site = tmp_path / "site"
    shutil.copytree(DEMO, site)
    cache = tmp_path / "cache"
    load_site(site, cache_dir=cache)
    models = site / "models.yaml"
    models.write_text(models.read_text().replace("name: th-sensor-v2", "name: th-sensor-v3"))
    with pytest.raises(SpecError) as info:
        load_site(site, cache_dir=cache)
    first = info.value.problems[0]
    assert (first.location.file, first.location.line, first.location.col) == (str(site / "devices.yaml"), 12, 10)
    assert first.message == "unknown DeviceModel 'th-sensor-v2'"


def test_invalid_files_are_not_cached_and_corrupt_entries_are_misses(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: flux.iot/v1\nkind: Site\nmetadata: {name: BAD}\n")
    cache = tmp_path / "cache"
    with pytest.raises(SpecError):
        load_site(bad, cache_dir=cache)
    assert not cache.exists() or not list(cache.iterdir())
    good = tmp_path / "good.yaml"
    good.write_text("apiVersion: flux.iot/v1\nkind: Site\nmetadata: {name: ok}\n")
    load_site(good, cache_dir=cache)
    (entry,) = cache.iterdir()
    entry.write_bytes(b"\x00garbage")
    assert load_site(good, cache_dir=cache).specs[("Site", "ok")]["metadata"]["name"] == "ok"


def test_lazy_document_reparses_for_marks(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("a: 1\n---\nb:\n  c: 2\n")
    doc = YamlDocument({"b": {"c": 2}}, str(f), 1, lazy=True)
    assert str(doc.where(("b", "c"))) == f"{f}:4:6"


def test_validate_specs_in_memory_reports_paths_without_locations() -> None:
    from twin.spec import validate_specs

    good = load_site(DEMO).specs
    assert validate_specs(good.values()).specs == good
    docs = [dict(d) for d in good.values()]
    bad = next(d for d in docs if d["metadata"]["name"] == "fan_01")
    bad["spec"] = {**bad["spec"], "desired": {"speed": 500}, "modle": "x"}
    with pytest.raises(SpecError) as info:
        validate_specs(docs)
    assert [str(p) for p in info.value.problems] == [
        "Device fan_01: spec.desired.speed: 500 is above the maximum 100",
        "Device fan_01: spec.modle: unknown field 'modle'",
    ]


def test_twinignore_skips_non_spec_yaml(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(DEMO, site)
    (site / "scenarios").mkdir(exist_ok=True)
    (site / "scenarios" / "hot.yaml").write_text("- {t: 0, device: temp_sensor_01, temperature: 31}\n")
    (site / "notes.yaml").write_text("just: notes\n")
    with pytest.raises(SpecError):
        load_site(site)
    (site / ".twinignore").write_text("# not specs\nsimulators/\nscenarios/\nnotes.yaml\n")
    loaded = load_site(site)
    assert not any("scenarios" in f or "notes" in f for f in loaded.files)
