"""Line-annotated YAML loading.

``load_documents(text, file)`` parses a multi-document YAML stream with libyaml (when present)
and returns, for each document, the plain data and a map from JSON path (a tuple of keys and
indices) to the ``Location`` of the node at that path. Duplicate keys are errors, located at
the second occurrence. Anchors/aliases are resolved like PyYAML does, within bounds (see
``twin.spec.inputlimits``): aliases may not expand a file beyond ``ALIAS_BASE +
ALIAS_PER_NODE x`` the nodes written out (a "billion laughs" file is refused, located at the
alias that crosses the bound), and nesting is at most ``MAX_DEPTH`` levels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from twin.errors import Location, Problem
from twin.spec.inputlimits import ALIAS_BASE, ALIAS_PER_NODE, MAX_DEPTH

try:  # libyaml is ~10x faster; fall back to pure Python when it is missing
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

Path = tuple[str | int, ...]


@dataclass
class YamlDocument:
    """One document: its data, and the YAML node of every path (locations are made on demand)."""

    data: Any
    file: str
    index: int  # position of the document in its file (0-based)
    nodes: dict[Path, Any] = field(default_factory=dict)  # path -> libyaml start mark
    key_nodes: dict[Path, Any] = field(default_factory=dict)
    bad_values: list[tuple[Path, str]] = field(default_factory=list)
    """Non-finite numbers (``.nan``, ``.inf``) found while building: (path, message)."""

    lazy: bool = False
    """Built from the parse cache without marks: the file is parsed again on the first ``where``."""
    in_memory: bool = False
    """Not from a file (an API write): problems carry the document path but no location."""

    def _loc(self, mark: Any) -> Location:
        return Location(self.file, mark.line + 1, mark.column + 1)

    def _ensure_marks(self) -> None:
        if not self.lazy:
            return
        self.lazy = False
        with open(self.file, encoding="utf-8") as f:
            docs, _ = load_documents(f.read(), self.file)
        for doc in docs:
            if doc.index == self.index:
                self.nodes, self.key_nodes = doc.nodes, doc.key_nodes

    def where(self, path: Path) -> Location | None:
        """The location of ``path``, or of its nearest existing ancestor."""
        if self.in_memory:
            return None
        self._ensure_marks()
        p = tuple(path)
        while p:
            node = self.nodes.get(p)
            if node is not None:
                return self._loc(node)
            p = p[:-1]
        node = self.nodes.get(())
        return self._loc(node) if node is not None else Location(self.file, 1, 1)

    def key_where(self, path: Path) -> Location | None:
        """The location of the *key* of ``path`` (for "unknown key" errors), else the value."""
        self._ensure_marks()
        node = self.key_nodes.get(tuple(path))
        return self._loc(node) if node is not None else self.where(path)


@dataclass
class _Budget:
    """Alias expansion of one file's finished documents: nodes written out, nodes added by
    aliases (the document being built keeps its own counts)."""

    written: int = 0
    aliased: int = 0


class _Builder:
    """Builds plain data straight from libyaml's event stream, recording each path's node.

    Composing a node tree first (``yaml.compose_all``) costs ~6x more than parsing; building
    from events keeps PyYAML's YAML 1.1 semantics (same resolver, same scalar constructors,
    merge keys, anchors) at a fraction of the cost. Marks are kept per path and turned into
    ``Location`` only when a problem is reported.
    """

    _resolvers = Resolver.yaml_implicit_resolvers

    def __init__(self, file: str, problems: list[Problem], budget: _Budget | None = None) -> None:
        self.file = file
        self.problems = problems
        self.constructor = SafeConstructor()
        self.nodes: dict[Path, Any] = {}
        self.key_nodes: dict[Path, Any] = {}
        self.anchors: dict[str, Any] = {}
        self.budget = budget or _Budget()
        self.expanded = 0  # nodes of this document as if every alias were written out
        self.aliased = 0  # of which added by aliases
        self.bad_values: list[tuple[Path, str]] = []
        self.sizes: dict[str, int] = {}  # anchor -> expanded nodes of its value

    def loc(self, mark: Any) -> Location:
        return Location(self.file, mark.line + 1, mark.column + 1)

    def scalar(self, ev: yaml.ScalarEvent) -> Any:
        tag = ev.tag
        if tag is None or tag == "!":
            if not ev.implicit[0]:  # quoted: a string
                return ev.value
            value = ev.value
            for t, regexp in self._resolvers.get(value[:1] if value else "", ()):
                if regexp.match(value):
                    tag = t
                    break
            else:
                return value
        if tag == "tag:yaml.org,2002:str":
            return ev.value
        if tag in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"):
            return ev.value  # dates stay strings in specs
        node = yaml.ScalarNode(tag, ev.value, None, None, ev.style)
        return self.constructor.construct_object(node, deep=True)

    def document(self, events: Iterator[yaml.Event], first: yaml.Event) -> Any:
        self.anchors = {}
        self.sizes = {}
        self.bad_values = []
        self.expanded = self.aliased = 0
        data = self.value(events, first, ())
        self.budget.written += self.expanded - self.aliased
        self.budget.aliased += self.aliased
        return data

    def value(self, events: Iterator[yaml.Event], ev: yaml.Event, path: Path) -> Any:
        self.nodes[path] = ev.start_mark
        before = self.expanded
        self.expanded = before + 1
        if isinstance(ev, yaml.ScalarEvent):
            out: Any = self.scalar(ev)
            if type(out) is float and not math.isfinite(out):
                self.bad_values.append((path, f"{out!r} is not a finite number"))
        elif isinstance(ev, yaml.AliasEvent):
            self.expanded = before
            return self.alias(ev, path)
        elif len(path) >= MAX_DEPTH:
            raise _BuildError(ev.start_mark, f"nested more than {MAX_DEPTH} levels deep", path)
        elif isinstance(ev, yaml.SequenceStartEvent):
            out = []
            for item in events:
                if isinstance(item, yaml.SequenceEndEvent):
                    break
                out.append(self.value(events, item, (*path, len(out))))
        elif isinstance(ev, yaml.MappingStartEvent):
            out = self.mapping(events, path)
        else:  # pragma: no cover - libyaml guarantees the grammar
            raise _BuildError(ev.start_mark, f"unexpected {type(ev).__name__}")
        anchor = getattr(ev, "anchor", None)
        if anchor:
            if anchor in self.anchors:  # as PyYAML's composer: an anchor is defined once
                raise _BuildError(ev.start_mark, f"duplicate anchor &{anchor}", path)
            self.anchors[anchor] = out
            self.sizes[anchor] = self.expanded - before
        return out

    def alias(self, ev: yaml.AliasEvent, path: Path) -> Any:
        """What the alias refers to, counted; refuse the file when aliases multiply it (an
        alias bomb). Counting costs nothing for documents without aliases."""
        anchor = str(ev.anchor)
        if anchor not in self.anchors:
            raise _BuildError(ev.start_mark, f"unknown alias *{anchor}", path)
        size = self.sizes.get(anchor, 1)
        self.expanded += size
        self.aliased += size
        budget = self.budget
        limit = ALIAS_BASE + ALIAS_PER_NODE * (budget.written + self.expanded - self.aliased)
        if budget.aliased + self.aliased > limit:
            raise _BuildError(
                ev.start_mark,
                f"aliases expand this file beyond {limit:,} nodes (*{anchor} adds "
                f"{size:,}): refused as a YAML alias bomb; aliases may add at most "
                f"{ALIAS_BASE:,} nodes plus {ALIAS_PER_NODE} per node written out",
                path,
            )
        return self.anchors[anchor]

    def mapping(self, events: Iterator[Any], path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merges: list[Any] = []
        for kev in events:
            if isinstance(kev, yaml.MappingEndEvent):
                break
            is_scalar = isinstance(kev, yaml.ScalarEvent)
            if is_scalar and kev.value == "<<" and kev.implicit[0] and kev.tag in (None, "!"):
                merged = self.value(events, next(events), (*path, "<<"))
                merges.extend(merged if isinstance(merged, list) else [merged])
                continue
            key = self.scalar(kev) if is_scalar else self.value(events, kev, (*path, "<key>"))
            vev = next(events)
            if isinstance(key, list | dict):
                self.problems.append(Problem(self.loc(kev.start_mark), "a mapping key must be a scalar",
                                             path=_fmt(path)))
                self.value(events, vev, (*path, "<key>"))
                continue
            if not isinstance(key, str):
                key = str(key).lower() if isinstance(key, bool) else str(key)
            if key in out:
                first = self.key_nodes.get((*path, key))
                self.problems.append(
                    Problem(self.loc(kev.start_mark), f"duplicate key {key!r}",
                            path=_fmt((*path, key)),
                            hint=f"first defined at {self.loc(first)}" if first else None))
                self.value(events, vev, (*path, "<duplicate>"))
                continue
            self.key_nodes[(*path, key)] = kev.start_mark
            out[key] = self.value(events, vev, (*path, key))
        for source in merges:  # explicit keys win; earlier merge sources win over later ones
            if not isinstance(source, dict):
                continue
            for k, v in source.items():
                out.setdefault(k, v)
        return out


class _BuildError(Exception):
    def __init__(self, mark: Any, message: str, path: Path = ()) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message
        self.path = path


def _fmt(path: Path) -> str:
    from twin.spec.paths import format_path

    return format_path(path)


def load_documents(text: str, file: str) -> tuple[list[YamlDocument], list[Problem]]:
    """Parse every document in ``text``. Syntax errors are returned as problems, located."""
    problems: list[Problem] = []
    docs: list[YamlDocument] = []
    events = yaml.parse(text, Loader=_Loader)
    budget = _Budget()
    index = 0
    try:
        for ev in events:
            if not isinstance(ev, yaml.DocumentStartEvent):
                continue
            builder = _Builder(file, problems, budget)
            first = next(events)
            if isinstance(first, yaml.DocumentEndEvent):
                continue
            try:
                data = builder.document(events, first)
            except _BuildError as exc:
                problems.append(Problem(builder.loc(exc.mark), f"YAML error: {exc.message}",
                                        syntax=True, path=_fmt(exc.path) or None))
                return docs, problems
            except yaml.constructor.ConstructorError as exc:
                mark = exc.problem_mark
                loc = builder.loc(mark) if mark else builder.loc(first.start_mark)
                problems.append(Problem(loc, f"YAML error: {exc.problem}", syntax=True))
                data = None
            next(events)  # DocumentEnd
            if data is not None:
                docs.append(YamlDocument(data, file, index, builder.nodes, builder.key_nodes,
                                         builder.bad_values))
            index += 1
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        what = exc.problem or exc.context or "invalid YAML"
        problems.append(Problem(loc, f"YAML syntax error: {what}", syntax=True))
        return [], problems
    except yaml.YAMLError as exc:
        problems.append(Problem(Location(file, 1, 1), f"YAML error: {exc}", syntax=True))
        return [], problems
    return docs, problems


def load_data(text: str, file: str) -> Any:
    """The data of a YAML file that is not a spec (a simulation scenario, a simulator
    declaration), read within the spec loader's bounds: alias expansion, nesting, finite
    numbers, no duplicate keys. ``ValueError`` naming each problem, located, otherwise; None
    for an empty file. (``yaml.safe_load`` would hand a 1 KB alias bomb to whatever walks it.)"""
    docs, problems = load_documents(text, file)
    problems += [Problem(doc.where(path), message, path=_fmt(path) or None)
                 for doc in docs for path, message in doc.bad_values]
    if problems:
        raise ValueError("; ".join(str(p) for p in problems[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    if len(docs) > 1:
        raise ValueError(f"{file}: one YAML document expected, found {len(docs)}")
    return docs[0].data if docs else None
