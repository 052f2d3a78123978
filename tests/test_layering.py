"""Layers import downward only (DESIGN §6), checked on the source with ast.

cli → api, edge → runtime engine (composition root) → control → twin state/monitor →
bindings, mqtt, registry, timeseries → spec → errors. Imports under ``if TYPE_CHECKING:``
do not count (they carry no code). Nothing in twin/ imports streamlit; twin/spec never
imports trio. No import cycle between the modules of twin/ (test_no_import_cycles).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TWIN = Path(__file__).resolve().parents[1] / "twin"

# package -> packages it must never import (at run time)
FORBIDDEN: dict[str, set[str]] = {
    "files": {"plugins", "errors", "spec", "registry", "timeseries", "mqtt", "bindings", "sim", "runtime",
              "control", "api", "edge", "cli"},
    # segment files of append-only logs (the WAL, the edge outbox): beside files, below all
    "storage": {"plugins", "policy", "errors", "spec", "registry", "timeseries", "mqtt", "bindings", "sim",
                "runtime", "control", "api", "edge", "cli"},
    # the authorization policy: pure, below everything that asks it
    "policy": {"plugins", "spec", "registry", "timeseries", "mqtt", "bindings", "sim", "runtime", "control",
               "api", "edge", "cli"},
    "errors": {"plugins", "policy", "spec", "registry", "timeseries", "mqtt", "bindings", "sim", "runtime", "control",
               "api", "edge", "cli"},
    "spec": {"plugins", "registry", "timeseries", "mqtt", "bindings", "sim", "runtime", "control", "api",
             "edge", "cli"},
    # plugins (sandboxed codecs, transforms, scene steps): above spec, below bindings
    "plugins": {"registry", "timeseries", "mqtt", "bindings", "sim", "runtime", "control", "api",
                "edge", "cli"},
    "registry": {"plugins", "timeseries", "mqtt", "bindings", "sim", "runtime", "control", "api", "edge", "cli"},
    "timeseries": {"plugins", "registry", "mqtt", "bindings", "sim", "runtime", "control", "api", "edge", "cli"},
    "mqtt": {"plugins", "registry", "timeseries", "bindings", "sim", "runtime", "control", "api", "edge", "cli"},
    "bindings": {"registry", "timeseries", "runtime", "control", "api", "edge", "cli"},
    # video (twin/video): camera sources and pipelines, beside the bindings it serves
    "video": {"registry", "timeseries", "mqtt", "runtime", "control", "api", "edge", "cli"},
    "sim": {"registry", "timeseries", "runtime", "control", "api", "edge", "cli"},
    "control": {"api", "edge", "cli"},
    # reports and notifications: a service over control's webhooks, the registry and the store
    "reports": {"api", "edge", "cli"},
    "runtime": {"api", "edge", "cli"},
    "api": {"cli"},
    "edge": {"cli"},
}
EXTERNAL_FORBIDDEN = {"streamlit"}
# the engine is the composition root: only it (and what is above it) may import it
ENGINE_MODULES = {"twin.runtime.engine"}
MAY_IMPORT_ENGINE = {"runtime", "api", "edge", "cli"}


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                skip.add(id(sub))
    out = []
    pkg = ".".join(path.relative_to(TWIN.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
    return out


FILES = sorted(TWIN.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(TWIN)) for p in FILES])
def test_layering(path: Path) -> None:
    rel = path.relative_to(TWIN)
    layer = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem
    bad = []
    for line, mod in runtime_imports(path):
        parts = mod.split(".")
        if parts[0] in EXTERNAL_FORBIDDEN:
            bad.append(f"{rel}:{line} imports {mod}")
        if layer == "spec" and parts[0] == "trio":
            bad.append(f"{rel}:{line}: twin/spec must not import trio")
        if parts[0] != "twin" or len(parts) < 2:
            continue
        if parts[1] in FORBIDDEN.get(layer, set()):
            bad.append(f"{rel}:{line}: layer {layer!r} imports {mod} (a layer above it)")
        if mod in ENGINE_MODULES and layer not in MAY_IMPORT_ENGINE:
            bad.append(f"{rel}:{line}: only the composition root's callers may import {mod}")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# No import cycles between modules (inside a package too).
#
# Every import counts except those under ``if TYPE_CHECKING:``: module-level ones AND imports
# inside functions. A lazy import that only dodges a cycle is still a cycle (the two modules
# still need each other); break it with a registry the lower module owns and the upper one
# fills (twin/bindings/registry.py, the CLI's register(app)), or by moving the shared type down
# (twin/spec/documents.py, twin/runtime/device_config.py). Lazy imports kept for start-up time
# (twin/bindings/factory.py, twin/edge/connect.py) are fine: they are not part of a cycle.
# A module that calls importlib.import_module also imports every twin module whose dotted name
# it spells as a string literal (a registry that loads its members by name).
# ``from PKG import NAME`` imports the submodule PKG.NAME when there is one, else PKG itself.

# (importer, imported) edges that close a cycle and must stay for now, each with its reason.
CYCLE_ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(TWIN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in FILES}


def _imported_modules(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """The twin modules ``name`` imports (with the line), TYPE_CHECKING blocks excepted."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(sub) for sub in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    by_name = "import_module" in {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "")
                                  for n in ast.walk(tree)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            whole = False
            for alias in node.names:
                if f"{mod}.{alias.name}" in MODULES:
                    yield node.lineno, f"{mod}.{alias.name}"
                else:
                    whole = True
            if whole and mod in MODULES:
                yield node.lineno, mod
        elif by_name and isinstance(node, ast.Constant) and node.value in MODULES:
            yield node.lineno, str(node.value)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for name, path in MODULES.items():
        for line, mod in _imported_modules(name, path):
            if mod != name and (name, mod) not in CYCLE_ALLOWED:
                graph[name].setdefault(mod, line)
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    report = []
    for component in _cycles(graph):
        members = set(component)
        edges = [f"    {a}:{graph[a][b]} imports {b}" for a in component for b in sorted(graph[a])
                 if b in members]
        report.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not report, "import cycles (a lazy import inside a function counts too):\n" + \
        "\n".join(report)


def test_cycle_check_sees_lazy_and_by_name_imports() -> None:
    """The checker itself: a cycle closed by a function-level import or by
    importlib.import_module("twin....") is found; one through TYPE_CHECKING is not."""
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
    raw = import_graph_raw()
    assert "twin.cli.video_cmds" in raw["twin.cli.main"]  # by name, through importlib
    assert "twin.bindings.coap" in raw["twin.bindings.factory"]  # inside create_binding's loader
    assert "twin.registry.overrides" not in raw["twin.registry.base"]  # under TYPE_CHECKING only
    assert not [e for e in CYCLE_ALLOWED if e[1] not in raw[e[0]]], \
        "an allowed edge no longer exists: drop it from CYCLE_ALLOWED"


def import_graph_raw() -> dict[str, set[str]]:
    return {name: {mod for _, mod in _imported_modules(name, path)} for name, path in MODULES.items()}
