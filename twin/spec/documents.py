"""The loaded documents of a site: one ``Document`` (kind, name, body, source for located
problems) and the ``LoadedSpecs`` set the checks walk. Below load.py and every per-kind check
(refs, scenes, dashboards, ...), so they share it without importing the loader back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twin.errors import Location, Problem
from twin.spec.paths import format_path
from twin.spec.yamlload import YamlDocument

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
    def location(self) -> Location | None:
        return self.source.where(())

    def where(self, *path: str | int) -> Location | None:
        return self.source.where(path)

    def problem(self, path: Sequence[str | int], message: str, hint: str | None = None) -> Problem:
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
