"""Bounds on spec documents and JSON input: alias bombs, nesting, non-finite numbers, lone
surrogates — each refused with a located (or path-named) one-line problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twin.errors import Location, SpecError
from twin.spec.inputlimits import MAX_DEPTH, InputRefused, loads, value_problems
from twin.spec.load import load_site, validate_specs
from twin.spec.yamlload import load_documents


def billion_laughs(levels: int = 9) -> str:
    """The classic: each level is nine aliases of the one before (9**9 strings, ~1 KB)."""
    lines = ["apiVersion: flux.iot/v1", "kind: Site", "metadata:", "  name: bomb", "  labels:"]
    lines.append('    l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    lines.append(f"    x: *l{levels - 1}")
    lines.append("spec: {title: boom}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_located() -> None:
    text = billion_laughs()
    assert len(text) < 1200
    docs, problems = load_documents(text, "bomb.yaml")
    assert docs == []
    (p,) = problems
    assert "alias bomb" in p.message
    # located at the alias that crossed the bound, with its path inside the document
    assert p.location is not None and p.location.file == "bomb.yaml" and p.location.line >= 6
    assert p.path is not None and p.path.startswith("metadata.labels.l")
    assert f"{p.location.line}:{p.location.col}" in str(p)


def test_many_aliases_of_small_defaults_are_fine() -> None:
    """Sharing defaults with merge keys in a big file stays well inside the bound."""
    head = "defaults: &d {type: sensor, model: m, heartbeat: {interval: 10s, timeout: 30s}}\n"
    body = "".join(f"d{i}: {{<<: *d, name: n{i}}}\n" for i in range(5000))
    docs, problems = load_documents(head + body, "many.yaml")
    assert problems == []
    assert docs[0].data["d4999"]["heartbeat"] == {"interval": "10s", "timeout": "30s"}


def test_alias_budget_is_per_file_not_per_document() -> None:
    """Many small bombs in one file (anchors restart per document) add up."""
    one = billion_laughs(levels=4)  # 9**4 = 6,561 strings: well under the bound alone
    docs, problems = load_documents(one, "one.yaml")
    assert problems == [] and len(docs) == 1
    docs, problems = load_documents("---\n".join([one] * 10), "many.yaml")
    assert len(problems) == 1 and "alias bomb" in problems[0].message


def test_deep_yaml_nesting_is_refused_located() -> None:
    text = "a: " + "[" * 500 + "]" * 500 + "\n"
    _docs, problems = load_documents(text, "deep.yaml")
    (p,) = problems
    assert f"nested more than {MAX_DEPTH} levels deep" in p.message
    assert p.location == Location("deep.yaml", 1, 3 + MAX_DEPTH)  # the 65th level


def test_non_finite_numbers_in_yaml_are_located(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text("apiVersion: flux.iot/v1\nkind: Site\nmetadata: {name: s1}\n"
                 "spec:\n  title: x\n  location: {lat: .nan, lon: -.inf}\n")
    with pytest.raises(SpecError) as err:
        load_site(f)
    got = sorted(str(p) for p in err.value.problems)
    assert got == [f"{f}:6:19: Site s1: spec.location.lat: nan is not a finite number",
                   f"{f}:6:30: Site s1: spec.location.lon: -inf is not a finite number"]


def test_documents_from_memory_name_the_path() -> None:
    site = {"apiVersion": "flux.iot/v1", "kind": "Site", "metadata": {"name": "s1"},
            "spec": {"title": "a\ud800b", "location": {"lat": float("nan"), "lon": 1.0}}}
    with pytest.raises(SpecError) as err:
        validate_specs([site])
    got = sorted(str(p) for p in err.value.problems)
    assert got == ["Site s1: spec.location.lat: nan is not a finite number",
                   "Site s1: spec.title: string 'a\\\\ud800b' is not valid Unicode (lone surrogate)"]


@pytest.mark.parametrize(("text", "message"), [
    ('{"lat": NaN}', "NaN is not a finite number"),
    ('{"lat": -Infinity}', "-Infinity is not a finite number"),
    ('{"lat": 1e400}', "lat: inf is not a finite number"),
    ('{"t": "\\ud800"}', "t: string '\\\\ud800' is not valid Unicode"),
    ('{"\\udfff": 1}', "key is not valid Unicode"),
    ("[" * 1000 + "]" * 1000, f"nested more than {MAX_DEPTH} levels deep"),
    ("[" * 100_000 + "]" * 100_000, f"nested more than {MAX_DEPTH} levels deep"),
])
def test_strict_json(text: str, message: str) -> None:
    with pytest.raises(InputRefused) as err:
        loads(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_strict_json_accepts_ordinary_data() -> None:
    data = {"a": [1, 2.5, "é", {"b": None, "c": True}], "n": -(2**70)}
    assert loads(json.dumps(data).encode()) == data
    nested: list = []
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    assert loads(json.dumps(nested)) == nested


def test_value_problems_walks_shared_subtrees_once() -> None:
    shared: list = ["x"] * 10
    for _ in range(30):  # 10 * 2**30 leaves if walked as a tree
        shared = [shared, shared]
    assert list(value_problems({"a": shared})) == []
