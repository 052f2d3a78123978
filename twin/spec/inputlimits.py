"""Bounds on structured input: what a spec document or an API body may contain.

Documents reach the engine as YAML files (``twin validate/plan/apply``), as JSON through the
API (``POST /apply``, every JSON request body) and as WebSocket messages. Whatever their
origin, they must be data the rest of the engine can walk, store and print:

* **no non-finite numbers**: YAML's ``.nan``/``.inf`` and JSON's ``NaN``/``Infinity`` are
  refused (they pass range checks such as ``minimum: -90`` and then turn every JSON output
  invalid, or make ``json.dumps(allow_nan=False)`` fail later, far from the cause);
* **no lone surrogates** (JSON's ``"\\ud800"``): such a string cannot be encoded as UTF-8 and
  breaks the registry, the log and every response that carries it;
* **bounded nesting** (:data:`MAX_DEPTH`): deeply nested data overflows recursive walkers
  (schema validation, ``json.dumps``, deep copies) with a ``RecursionError``;
* **bounded YAML alias expansion** (:data:`ALIAS_BASE` + :data:`ALIAS_PER_NODE` per node
  written out): a 1 KB "billion laughs" file expands to ~10⁹ nodes; aliases are fine for
  sharing defaults, not for multiplying data.

:func:`value_problems` walks parsed data and names each offence by its path;
:func:`loads` parses JSON text strictly (raising :class:`InputRefused`, a ``ValueError``, with
one line). Neither imports anything beyond the standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

MAX_DEPTH = 64
"""Containers (mappings and lists) may nest this many levels deep in a document or body."""

ALIAS_BASE = 100_000
ALIAS_PER_NODE = 10
"""YAML aliases may add at most ALIAS_BASE + ALIAS_PER_NODE x (nodes written out) nodes to a
file (each alias counts every node of what it refers to, aliases inside it expanded)."""

Path = tuple[str | int, ...]


class InputRefused(ValueError):
    """Input that is not acceptable data; ``str()`` is one line (no echo of the input)."""

    def __init__(self, message: str, path: Path = ()) -> None:
        self.path = path
        self.message = message
        where = format_path(path)
        super().__init__(f"{where}: {message}" if where else message)


def format_path(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def printable(text: str, limit: int = 60) -> str:
    """``text`` safe to put in a message: lone surrogates escaped, cut to ``limit``."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return out if len(out) <= limit else out[:limit] + "..."


def _bad_string(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def value_problems(data: Any, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, str]]:
    """Every non-finite number, lone surrogate (in keys and values) and container nested
    deeper than ``max_depth`` in ``data``, as ``(path, message)``. Shared subtrees (YAML
    aliases) are walked once."""
    seen: set[int] = set()
    # an explicit stack: deep data must not overflow the walker that is checking it
    stack: list[tuple[Any, Path]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        t = type(value)
        if t is float:
            if not math.isfinite(value):
                yield path, f"{value!r} is not a finite number"
        elif t is str:
            if _bad_string(value):
                yield path, f"string {printable(value)!r} is not valid Unicode (lone surrogate)"
        elif t is dict or t is list:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if len(path) >= max_depth:
                yield path, f"nested more than {max_depth} levels deep"
                continue
            if t is dict:
                for k, v in reversed(list(value.items())):
                    if isinstance(k, str) and _bad_string(k):
                        yield (*path, printable(k)), "key is not valid Unicode (lone surrogate)"
                        continue
                    stack.append((v, (*path, k)))
            else:
                for i in range(len(value) - 1, -1, -1):
                    stack.append((value[i], (*path, i)))


def _refuse_constant(name: str) -> Any:
    raise InputRefused(f"{name} is not a finite number (JSON numbers must be finite)")


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON strictly: no NaN/Infinity, no lone surrogates, nesting at most ``max_depth``.

    Raises :class:`InputRefused` (one line, the input is not echoed); malformed JSON raises
    ``json.JSONDecodeError`` as ``json.loads`` does. Bytes are decoded as ``json.loads``
    would (UTF-8/16/32 by their first bytes) but strictly: ``json.loads`` lets encoded lone
    surrogates through ('surrogatepass'); here they are an :class:`InputRefused`."""
    if isinstance(text, bytes | bytearray):
        raw = bytes(text)
        try:
            text = raw.decode(json.detect_encoding(raw))
        except UnicodeDecodeError:
            raise InputRefused("not valid Unicode text (UTF-8 expected)") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise InputRefused(f"JSON nested more than {max_depth} levels deep") from None
    for path, message in value_problems(data, max_depth):
        raise InputRefused(message, path)
    return data


def dumps(value: Any, **kw: Any) -> str:
    """``json.dumps`` that refuses NaN/Infinity (``ValueError``) instead of printing invalid
    JSON; for every JSON the engine writes out."""
    return json.dumps(value, allow_nan=False, **kw)
