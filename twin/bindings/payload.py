"""Small helpers for reading device payloads, shared by the bindings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def extract(doc: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``a.b.0.c``) in decoded JSON; KeyError if absent."""
    cur = doc
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(path)
    return cur
