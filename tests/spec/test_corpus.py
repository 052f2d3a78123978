"""The malformed-document corpus: every file names its exact problems in a sidecar .expect.

Each ``corpus/NN_*.yaml`` is loaded together with the valid documents in ``base/`` and must
produce exactly the lines of ``NN_*.expect``: ``LINE:COL: Kind name: path: message`` and
``    hint: ...`` (``<file>`` stands for the corpus file's own path).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from twin.errors import SpecError
from twin.spec import load_site

HERE = Path(__file__).parent
BASE = HERE / "base"
CASES = sorted((HERE / "corpus").glob("*.yaml"))


def render(problems, file: Path) -> list[str]:
    lines = []
    for p in problems:
        assert p.location is not None and p.location.file == str(file), str(p)
        lines.append(str(p).removeprefix(f"{file}:"))
        if p.hint:
            lines.append("    hint: " + p.hint.replace(str(file), "<file>"))
    return lines


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


def test_base_is_valid() -> None:
    loaded = load_site(BASE)
    assert ("DeviceModel", "th-sensor-v2") in loaded.specs


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_malformed_document(case: Path) -> None:
    expected = case.with_suffix(".expect").read_text(encoding="utf-8").splitlines()
    with pytest.raises(SpecError) as info:
        load_site([BASE, case])
    assert render(info.value.problems, case) == expected


def test_all_problems_in_one_run() -> None:
    """Loading the whole corpus at once reports every file's problems, none swallowed."""
    with pytest.raises(SpecError) as info:
        load_site([BASE, *CASES])
    files = {p.location.file for p in info.value.problems if p.location}
    # cross-file duplicates (many cases name their device d1) add problems, never remove files
    assert files == {str(c) for c in CASES}


def test_fast_validator_agrees_with_jsonschema() -> None:
    """The compiled fast path and jsonschema must agree on every document we have."""
    import fastjsonschema

    from twin.spec.schema import _fast, known_kinds, validator
    from twin.spec.yamlload import load_documents

    checked = 0
    for f in [*CASES, *sorted(BASE.glob("*.yaml")), *sorted((HERE.parents[1] / "sites").rglob("*.yaml"))]:
        docs, _ = load_documents(f.read_text(encoding="utf-8"), str(f))
        for doc in docs:
            kind = doc.data.get("kind") if isinstance(doc.data, dict) else None
            if kind not in known_kinds():
                continue
            reference = not any(True for _ in validator(kind).iter_errors(doc.data))
            try:
                _fast(kind)(doc.data)
                fast = True
            except fastjsonschema.JsonSchemaException:
                fast = False
            assert fast == reference, f"{f}: fast={fast} jsonschema={reference}"
            checked += 1
    assert checked > 60
