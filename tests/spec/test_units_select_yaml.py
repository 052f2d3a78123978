from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twin.errors import Location
from twin.spec.select import group_ancestry, matches, parse_selector
from twin.spec.units import format_duration, parse_duration
from twin.spec.yamlload import load_documents


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10), ("5m", 300), ("2h", 7200), ("7d", 604800), ("1w", 604800),
    ("1h30m", 5400), ("1.5s", 1.5), ("15", 15), (3, 3), (0.25, 0.25)])
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["2x", "", "s", "-1s", "1 s", "1h-5m", True, -3, "inf"])
def test_bad_durations(bad) -> None:
    with pytest.raises(ValueError, match="duration|not allowed"):
        parse_duration(bad)


def test_inf() -> None:
    assert parse_duration("inf", allow_inf=True) == math.inf
    assert format_duration(math.inf) == "inf"


@given(st.integers(0, 10**9))
def test_format_roundtrip(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


def test_yaml_locations_and_merge_keys() -> None:
    text = "a: &x {b: 1}\nc:\n  <<: *x\n  d: [1, 2]\n"
    docs, problems = load_documents(text, "f.yaml")
    assert problems == []
    (doc,) = docs
    assert doc.data == {"a": {"b": 1}, "c": {"b": 1, "d": [1, 2]}}
    assert doc.where(("c", "d", 1)) == Location("f.yaml", 4, 10)
    assert doc.where(("c", "zzz")) == Location("f.yaml", 3, 3)  # nearest existing ancestor
    assert doc.key_where(("c", "d")) == Location("f.yaml", 4, 3)


def test_yaml_timestamps_stay_strings_and_empty_docs_are_skipped() -> None:
    docs, problems = load_documents("---\n---\nwhen: 2024-01-02\n---\n", "f.yaml")
    assert problems == [] and [d.data for d in docs] == [{"when": "2024-01-02"}]


def test_selectors() -> None:
    groups = {"plant": {"spec": {}}, "line-1": {"spec": {"parent": "plant"}},
              "cell": {"spec": {"parent": "line-1"}}}
    doc = {"kind": "Device", "metadata": {"name": "d", "site": "s", "group": "cell", "tags": ["hvac"],
                                          "labels": {"floor": "2"}},
           "spec": {"type": "sensor", "model": "m"}}
    assert group_ancestry(groups, "cell") == ["cell", "line-1", "plant"]
    ok = ["tag=hvac", "group=plant", "group=cell", "floor=2", "type=sensor,model=m", "site=s",
          "tag!=x", "status=online"]
    for sel in ok:
        assert matches(doc, parse_selector(sel), groups=groups, status="online"), sel
    for sel in ["tag=x", "group=other", "floor=3", "type!=sensor", "status=offline", "name=e"]:
        assert not matches(doc, parse_selector(sel), groups=groups, status="online"), sel
    with pytest.raises(ValueError):
        parse_selector("justakey")
