"""Plugin documents: the module file embedded in the spec, and static checks of the module.

A ``kind: Plugin`` names its module by a path relative to its YAML file (``wasm: codecs/acme.wasm``
or ``starlark: derive.star``), inside the site folder (no absolute paths, no ``..``). When the
site is loaded, the file is read and stored in the document as ``spec.module`` (``file``,
``sha256``, ``size``, base64 ``data``): the revision holds the module itself, so ``twin plan``
shows a changed module as a changed hash, ``twin rollback`` restores the old module, and an
engine on another machine runs exactly what was applied.

Every Plugin document (from a file or from an API write) is checked here before it can be
planned: the hash matches the data, a Wasm module compiles (wasmtime validates it), exports
``memory``, ``alloc`` and its role's functions with the ABI's types (``twin/plugins/abi.py``),
and imports nothing unless granted (``capabilities: [wasi]`` allows WASI preview 1 only); a
Starlark script parses and defines its role's functions. A module that fails is refused with
the file and the reason, so a running engine keeps the old one.

This module is pure (no Trio); it only uses wasmtime and starlark to *check* modules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from twin.errors import Problem
from twin.spec.documents import Document, LoadedSpecs

MAX_MODULE_BYTES = 16 * 1024 * 1024

ROLE_FUNCTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # role: (required entry points, optional entry points)
    "codec": (("decode",), ("encode",)),
    "transform": (("transform",), ()),
    "condition": (("condition",), ()),
    "action": (("action",), ()),
}
"""The ABI entry points of each role (``spec.functions`` may map them to other export names)."""

WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")

SIZE_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(text: str) -> int:
    """``16MiB`` -> 16777216 (the schema checked the form)."""
    m = re.fullmatch(r"(\d+)(KiB|MiB|GiB)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (use e.g. 512KiB, 16MiB)")
    return int(m.group(1)) * SIZE_UNITS[m.group(2)]


def module_kind(spec: Mapping[str, Any]) -> str:
    return "wasm" if "wasm" in spec else "starlark"


def entry_points(spec: Mapping[str, Any]) -> dict[str, str]:
    """ABI entry point -> export/function name, for the plugin's role (required and optional)."""
    required, optional = ROLE_FUNCTIONS.get(str(spec.get("role")), ((), ()))
    names = dict(spec.get("functions") or {})
    return {fn: str(names.get(fn, fn)) for fn in (*required, *optional)}


def module_bytes(spec: Mapping[str, Any]) -> bytes:
    """The module's content from ``spec.module`` (ValueError when absent or corrupt)."""
    module = spec.get("module")
    if not isinstance(module, Mapping) or not isinstance(module.get("data"), str):
        raise ValueError("the module content is missing (spec.module is filled in from the file)")
    try:
        data = base64.b64decode(module["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"spec.module.data is not base64: {exc}") from None
    if hashlib.sha256(data).hexdigest() != module.get("sha256"):
        raise ValueError("spec.module.sha256 does not match the module's content")
    return data


def embed_modules(loaded: LoadedSpecs) -> list[Problem]:
    """Read the module file of every Plugin document loaded from a file into ``spec.module``."""
    problems: list[Problem] = []
    for doc in loaded.of_kind("Plugin").values():
        if doc.source.in_memory or doc.key in loaded.invalid:
            continue
        spec = doc.body.get("spec")
        if not isinstance(spec, dict):
            continue
        field = module_kind(spec)
        rel = spec.get(field)
        if not isinstance(rel, str):
            continue
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            problems.append(doc.problem(("spec", field), f"{rel!r} is outside the site folder",
                                        "give a path relative to the YAML file, inside the folder"))
            continue
        path = Path(doc.source.file).parent / pure
        try:
            size = path.stat().st_size
            if size > MAX_MODULE_BYTES:
                raise ValueError(f"{size} bytes, more than {MAX_MODULE_BYTES}")
            data = path.read_bytes()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(doc.problem(("spec", field), f"cannot read module {str(path)!r}: {reason}",
                                        "build the module first (see README.md#plugins)"
                                        if field == "wasm" else None))
            continue
        spec["module"] = {
            "file": rel,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "data": base64.b64encode(data).decode("ascii"),
        }
    return problems


def plugin_problems(loaded: LoadedSpecs) -> list[Problem]:
    """Module checks of every Plugin, and references to plugins from bindings and models."""
    problems: list[Problem] = []
    plugins = loaded.of_kind("Plugin")
    for doc in plugins.values():
        if doc.key in loaded.invalid:
            continue
        spec = _mapping(doc.body.get("spec"))
        field = module_kind(spec)
        try:
            data = module_bytes(spec)
        except ValueError as exc:
            if "module" in spec or doc.source.in_memory:
                problems.append(doc.problem(("spec", field), str(exc)))
            continue  # a file that could not be read was reported by embed_modules
        reason = check_module(field, data, spec)
        if reason:
            where = spec.get("module", {}).get("file") or spec.get(field)
            problems.append(doc.problem(("spec", field), f"module {where}: {reason}",
                                        "the running engine keeps the module it has"))

    def ref(doc: Document, path: tuple[str, ...], name: Any, role: str) -> None:
        if not isinstance(name, str):
            return
        target = plugins.get(name)
        if target is None:
            problems.append(doc.problem(path, f"unknown Plugin {name!r}",
                                        f"define a kind: Plugin named {name!r} with role: {role}"))
            return
        got = _mapping(target.body.get("spec")).get("role")
        if got != role:
            problems.append(doc.problem(path, f"Plugin {name!r} has role {got!r}, not {role!r}"))

    for doc in loaded.of_kind("DeviceModel").values():
        ref(doc, ("spec", "transform"), _mapping(doc.body.get("spec")).get("transform"), "transform")
    for doc in loaded.of_kind("Device").values():
        spec = _mapping(doc.body.get("spec"))
        ref(doc, ("spec", "transform"), spec.get("transform"), "transform")
        binding = spec.get("binding")
        if isinstance(binding, Mapping):
            for proto, opts in binding.items():
                if isinstance(opts, Mapping) and "codec" in opts:
                    ref(doc, ("spec", "binding", proto, "codec"), opts["codec"], "codec")
                points = opts.get("points") if isinstance(opts, Mapping) else None
                if proto == "opcua" and isinstance(points, Mapping):  # codec points (ByteString)
                    for pname, popts in points.items():
                        if isinstance(popts, Mapping) and "codec" in popts:
                            ref(doc, ("spec", "binding", proto, "points", pname, "codec"),
                                popts["codec"], "codec")
    return problems


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else empty (documents that failed their schema are
    still checked for references, and may hold anything)."""
    return value if isinstance(value, Mapping) else {}


def check_module(field: str, data: bytes, spec: Mapping[str, Any]) -> str | None:
    """Why the module cannot run as this plugin, or None."""
    wanted = entry_points(spec)
    required = set(ROLE_FUNCTIONS.get(str(spec.get("role")), ((), ()))[0])
    if field == "wasm":
        return _check_wasm(bytes(data), tuple(sorted(wanted.items())), frozenset(required),
                           "wasi" in (spec.get("capabilities") or ()))
    return _check_starlark(data, wanted, required)


@lru_cache(maxsize=64)
def _check_wasm(data: bytes, wanted: tuple[tuple[str, str], ...], required: frozenset[str],
                wasi: bool) -> str | None:
    import wasmtime

    try:
        module = wasmtime.Module(_engine(), data)
    except wasmtime.WasmtimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid module"
        return f"not a valid WebAssembly module: {first}"
    for imp in module.imports:
        if wasi and imp.module in WASI_MODULES:
            continue
        grant = " (WASI is granted with capabilities: [wasi])" if imp.module in WASI_MODULES else ""
        return (f"imports {imp.module}.{imp.name}, which is not granted{grant}; plugins get no "
                "imports by default")
    exports = {e.name: e.type for e in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        return "does not export its linear memory as 'memory'"
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    if not _func_is(exports.get("alloc"), [i32], [i32]):
        return "does not export alloc(len: i32) -> i32"
    for entry, export in wanted:
        t = exports.get(export)
        if t is None:
            if entry in required:
                return f"does not export {export!r} (the {entry} entry point)"
            continue
        if not _func_is(t, [i32, i32], [i64]):
            return f"export {export!r} must be ({entry} ptr: i32, len: i32) -> i64 (ptr << 32 | len)"
    if "configure" in exports and not _func_is(exports["configure"], [i32, i32], []):
        return "export 'configure' must be (ptr: i32, len: i32) -> ()"
    return None


def _func_is(t: Any, params: list[Any], results: list[Any]) -> bool:
    import wasmtime

    if not isinstance(t, wasmtime.FuncType):
        return False
    return [str(p) for p in t.params] == [str(p) for p in params] and \
        [str(r) for r in t.results] == [str(r) for r in results]


def _engine() -> Any:
    import wasmtime

    return wasmtime.Engine()  # not kept: a cached one is torn down noisily at exit


def _check_starlark(data: bytes, wanted: Mapping[str, str], required: set[str]) -> str | None:
    import starlark

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    try:
        starlark.parse("plugin.star", text, _dialect())
    except starlark.StarlarkError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return "does not parse: " + (" ".join(lines[:2]) if lines else "syntax error")
    for entry in sorted(required):
        name = wanted[entry]
        if not re.search(rf"^def\s+{re.escape(name)}\s*\(", text, re.MULTILINE):
            return f"does not define {name}() (the {entry} entry point)"
    return None


def _dialect() -> Any:
    import starlark

    d = starlark.Dialect.extended()
    d.enable_load = False  # a plugin is one file: no load()
    return d
