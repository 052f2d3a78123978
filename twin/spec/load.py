"""Load a site: read YAML files, validate every document, return the normalised spec set.

``load_site(paths)`` reads files and folders (recursively, ``*.yaml``/``*.yml``, in sorted
order), validates each document against its kind's JSON Schema, checks references across
documents, and raises ``SpecError`` with **every** problem found, each located as
``file:line:col``. Nothing is returned half-valid.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twin.errors import Location, Problem, SpecError
from twin.spec.schema import known_kinds, schema_problems
from twin.spec.yamlload import YamlDocument, load_documents

API_VERSION = "flux.iot/v1"

Key = tuple[str, str]


@dataclass
class Document:
    """One validated document with its source, for located errors and `describe`."""

    kind: str
    name: str
    body: dict[str, Any]
    source: YamlDocument

    @property
    def key(self) -> Key:
        return (self.kind, self.name)

    @property
    def location(self) -> Location:
        return self.source.where(())

    def where(self, *path: str | int) -> Location:
        return self.source.where(path)

    def problem(self, path: Sequence[str | int], message: str, hint: str | None = None) -> Problem:
        from twin.spec.paths import format_path

        return Problem(self.source.where(tuple(path)), message, self.kind, self.name,
                       format_path(path) or None, hint)


@dataclass
class LoadedSpecs:
    documents: dict[Key, Document] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    invalid: set[Key] = field(default_factory=set)
    """Documents that failed their schema: they exist for references, but are not checked deeper."""

    @property
    def specs(self) -> dict[Key, dict[str, Any]]:
        return {key: doc.body for key, doc in sorted(self.documents.items())}

    def of_kind(self, kind: str) -> dict[str, Document]:
        return {name: d for (k, name), d in self.documents.items() if k == kind}


def find_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*")
                if f.suffix in (".yaml", ".yml") and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                problems.append(Problem(Location(str(path), 1, 1), "no *.yaml files in this folder"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(Location(str(path), 1, 1), "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique, problems


def normalise(body: dict[str, Any]) -> dict[str, Any]:
    """Shorthands expanded (``binding: http`` → ``binding: {http: {}}``), nulls dropped."""
    spec = body.get("spec")
    if isinstance(spec, dict):
        binding = spec.get("binding")
        if isinstance(binding, str):
            spec["binding"] = {binding: {}}
        elif isinstance(binding, dict):
            for proto, opts in list(binding.items()):
                if opts is None:
                    binding[proto] = {}
    meta = body.get("metadata")
    if isinstance(meta, dict):
        for k in ("tags", "labels"):
            if meta.get(k) is None:
                meta.pop(k, None)
    return body


def load_site(
    paths: Iterable[str | Path] | str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    strict: bool = True,
) -> LoadedSpecs:
    """Load and validate. Raises SpecError with every problem (when ``strict``)."""
    from twin.spec.refs import reference_problems

    if isinstance(paths, str | Path):
        paths = [paths]
    files, problems = find_files(paths)
    loaded = LoadedSpecs(files=[str(f) for f in files])
    kinds = known_kinds()
    for i, f in enumerate(files):
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(Location(str(f), 1, 1), f"cannot read file: {exc}"))
            continue
        docs, yaml_problems = load_documents(text, str(f))
        problems.extend(yaml_problems)
        for doc in docs:
            _take(doc, kinds, loaded, problems)
        if progress is not None:
            progress(i + 1, len(files))
    problems.extend(reference_problems(loaded))
    if problems and strict:
        raise SpecError(problems, hint="fix the problems above and run `twin validate` again")
    return loaded


def _take(doc: YamlDocument, kinds: list[str], loaded: LoadedSpecs, problems: list[Problem]) -> None:
    data = doc.data
    if not isinstance(data, dict):
        problems.append(Problem(doc.where(()), "a document must be a mapping with apiVersion, kind, "
                                "metadata and spec"))
        return
    kind = data.get("kind")
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    name = name if isinstance(name, str) else None
    if not isinstance(kind, str):
        problems.append(Problem(doc.where(("kind",)) if "kind" in data else doc.where(()),
                                "missing or invalid 'kind'",
                                hint="every document names its kind, e.g. kind: Device "
                                "(`twin validate --help` lists the kinds)"))
        return
    if kind not in kinds:
        close = difflib.get_close_matches(kind, kinds, n=1)
        problems.append(Problem(doc.where(("kind",)), f"unknown kind {kind!r}", kind=None,
                                hint=f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(kinds)}"))
        return
    if data.get("apiVersion") != API_VERSION:
        # reported by the schema too, but say it once, clearly, and keep going
        pass
    body = normalise(copy.deepcopy(data))
    doc.data = body
    errs = schema_problems(doc, kind, name)
    if errs:
        problems.extend(errs)
        if name is None:
            return
    if name is None:
        return
    key = (kind, name)
    if key in loaded.documents:
        first = loaded.documents[key]
        problems.append(Problem(doc.where(("metadata", "name")), f"duplicate {kind} name {name!r}",
                                kind, name, "metadata.name", hint=f"first defined at {first.location}"))
        return
    loaded.documents[key] = Document(kind, name, body, doc)
    if errs:
        loaded.invalid.add(key)
