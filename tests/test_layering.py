"""Layers import downward only (DESIGN §6), checked on the source with ast.

cli → api, edge → runtime engine (composition root) → control → twin state/monitor →
bindings, mqtt, registry, timeseries → spec → errors. Imports under ``if TYPE_CHECKING:``
do not count (they carry no code). Nothing in twin/ imports streamlit; twin/spec never
imports trio.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TWIN = Path(__file__).resolve().parents[1] / "twin"

# package -> packages it must never import (at run time)
FORBIDDEN: dict[str, set[str]] = {
    "files": {"plugins", "errors", "spec", "registry", "timeseries", "mqtt", "bindings", "sim", "runtime",
              "control", "api", "edge", "cli"},
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
