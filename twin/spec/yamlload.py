"""Line-annotated YAML loading.

``load_documents(text, file)`` parses a multi-document YAML stream with libyaml (when present)
and returns, for each document, the plain data and a map from JSON path (a tuple of keys and
indices) to the ``Location`` of the node at that path. Duplicate keys are errors, located at
the second occurrence. Anchors/aliases are resolved like PyYAML does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from twin.errors import Location, Problem

try:  # libyaml is ~10x faster; fall back to pure Python when it is missing
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

Path = tuple[str | int, ...]


@dataclass
class YamlDocument:
    data: Any
    file: str
    index: int  # position of the document in its file (0-based)
    locations: dict[Path, Location] = field(default_factory=dict)
    key_locations: dict[Path, Location] = field(default_factory=dict)

    def where(self, path: Path) -> Location:
        """The location of ``path``, or of its nearest existing ancestor."""
        p = tuple(path)
        while p:
            loc = self.locations.get(p)
            if loc is not None:
                return loc
            p = p[:-1]
        return self.locations.get((), Location(self.file, 1, 1))

    def key_where(self, path: Path) -> Location:
        """The location of the *key* of ``path`` (for "unknown key" errors), else the value."""
        return self.key_locations.get(tuple(path)) or self.where(path)


class _Builder:
    """Turns a composed node tree into plain data while recording locations."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        self.loader = _Loader("")
        self.locations: dict[Path, Location] = {}
        self.key_locations: dict[Path, Location] = {}

    def loc(self, node: yaml.Node) -> Location:
        m = node.start_mark
        return Location(self.file, m.line + 1, m.column + 1)

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.locations[path] = self.loc(node)
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # resolves << merge keys
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node, deep=True)
                if isinstance(key, list | dict):
                    self.problems.append(
                        Problem(self.loc(key_node), "a mapping key must be a scalar", path=_fmt(path))
                    )
                    continue
                if not isinstance(key, str):
                    key = str(key).lower() if isinstance(key, bool) else str(key)
                if key in out:
                    first = self.key_locations.get((*path, key))
                    self.problems.append(
                        Problem(
                            self.loc(key_node),
                            f"duplicate key {key!r}",
                            path=_fmt((*path, key)),
                            hint=f"first defined at {first}" if first else None,
                        )
                    )
                    continue
                self.key_locations[(*path, key)] = self.loc(key_node)
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        value = self.loader.construct_object(node, deep=True)
        if hasattr(value, "isoformat"):  # dates/timestamps stay strings in specs
            return str(node.value)
        return value


def _fmt(path: Path) -> str:
    from twin.spec.paths import format_path

    return format_path(path)


def load_documents(text: str, file: str) -> tuple[list[YamlDocument], list[Problem]]:
    """Parse every document in ``text``. Syntax errors are returned as problems, located."""
    problems: list[Problem] = []
    docs: list[YamlDocument] = []
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        what = exc.problem or exc.context or "invalid YAML"
        problems.append(Problem(loc, f"YAML syntax error: {what}"))
        return [], problems
    except yaml.YAMLError as exc:
        problems.append(Problem(Location(file, 1, 1), f"YAML error: {exc}"))
        return [], problems
    for index, node in enumerate(nodes):
        if node is None:
            continue
        builder = _Builder(file, problems)
        try:
            data = builder.build(node, ())
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark
            loc = Location(file, mark.line + 1, mark.column + 1) if mark else builder.loc(node)
            problems.append(Problem(loc, f"YAML error: {exc.problem}"))
            continue
        if data is None:
            continue
        docs.append(YamlDocument(data, file, index, builder.locations, builder.key_locations))
    return docs, problems
