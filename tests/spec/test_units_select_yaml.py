from __future__ import annotations

import math

import pytest
from hypothesis import example, given
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
    with pytest.raises(ValueError, match=r"duration|not allowed"):
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


TRICKY = ["yes", "No", "on", "OFF", "~", "null", "0x1F", "0o17", "017", "1_000", "1:30", "1e3",
          "1.5e-3", ".inf", "-.Inf", ".nan", "+12", "2024-01-02", "2024-01-02T10:00:00Z", "<<",
          "'quoted'", '"dq"', "true", "False", "", "- x", "a: b", "#c", "&a", "*a", "!!str 5"]
scalar_text = st.sampled_from(TRICKY) | st.text("abc019:.-_ ", max_size=6)


def _render(value, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "\n" + "\n".join(f"{pad}k{i}:{' ' if not isinstance(v, dict | list) or not v else ''}"
                                f"{_render(v, indent + 2)}" for i, v in enumerate(value.values()))
    if isinstance(value, list):
        if not value:
            return "[]"
        return "\n" + "\n".join(f"{pad}- {_render(v, indent + 2).lstrip()}" for v in value)
    return value


yaml_trees = st.recursive(scalar_text, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text("ab", min_size=1, max_size=2), inner, max_size=3),
                          max_leaves=10)


@given(st.dictionaries(st.text("xyz", min_size=1, max_size=3), yaml_trees, min_size=1, max_size=4))
@example({"x": "0000-"})  # a string to PyYAML: the test's date check once said "date"
def test_event_builder_agrees_with_pyyaml(tree) -> None:
    """Our event-driven builder must give exactly what yaml.safe_load gives (YAML 1.1 rules)."""
    import datetime

    import yaml

    text = "".join(f"{k}:{' ' if not isinstance(v, dict | list) or not v else ''}{_render(v, 2)}\n"
                   for k, v in tree.items())
    try:
        expected = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        docs, problems = load_documents(text, "f.yaml")
        assert problems  # both reject
        return

    def norm(x):
        if isinstance(x, dict):
            return {(str(k).lower() if isinstance(k, bool) else str(k)): norm(v) for k, v in x.items()}
        if isinstance(x, list):
            return [norm(v) for v in x]
        if isinstance(x, datetime.date):
            return "<date>"
        if isinstance(x, float) and x != x:
            return "<nan>"
        return x

    docs, problems = load_documents(text, "f.yaml")
    if expected is None:
        assert docs == []
        return
    if problems:  # only duplicate keys may differ: PyYAML silently keeps the last one
        assert all("duplicate key" in p.message for p in problems)
        return
    got = docs[0].data

    def resolve(text: str) -> str:
        return yaml.resolver.Resolver().resolve(yaml.ScalarNode, text, (True, False))

    def dates(x):  # we keep timestamps as their text
        if isinstance(x, dict):
            return {k: dates(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dates(v) for v in x]
        if isinstance(x, str) and resolve(x) == "tag:yaml.org,2002:timestamp":
            return "<date>"  # what PyYAML would have made a date (not just any '0000-')
        if isinstance(x, float) and x != x:
            return "<nan>"
        return x

    assert dates(got) == norm(expected)
