"""Validate and apply spec documents that arrive through the API.

Validation reuses the spec layer's public ``load_site`` (schema + references, every problem
located) on a temporary file; problems are reported with ``request`` as the file name.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twin.errors import ConflictError, Problem, SpecError
from twin.registry.base import Key, Registry, Revision

Specs = dict[Key, dict[str, Any]]


def validate(specs: Mapping[Key, Mapping[str, Any]]) -> Specs:
    """Validate a whole spec set; return its normalised form. Raises SpecError."""
    from twin.spec import load_site

    with tempfile.TemporaryDirectory(prefix="twin-api-") as tmp:
        path = Path(tmp) / "request.yaml"
        path.write_text(
            "\n---\n".join(json.dumps(doc, ensure_ascii=False) for _, doc in sorted(specs.items()))
            or "{}",
            encoding="utf-8",
        )
        try:
            loaded = load_site(path)
        except SpecError as exc:
            raise SpecError(
                [_relocate(p, str(path)) for p in exc.problems], hint=exc.hint
            ) from None
        return loaded.specs


def _relocate(problem: Problem, tmpfile: str) -> Problem:
    loc = problem.location
    if loc is not None and loc.file == tmpfile:
        loc = type(loc)("request", loc.line, loc.col)
    return Problem(loc, problem.message, problem.kind, problem.name, problem.path, problem.hint)


def apply_change(
    registry: Registry,
    change: Callable[[Specs], Specs],
    *,
    author: str,
    message: str,
    attempts: int = 3,
) -> tuple[Revision | None, Specs]:
    """Read the head, ``change`` it, validate, apply against that head (retry on conflict)."""
    for attempt in range(attempts):
        head = registry.head()
        base = head.number if head else 0
        current: Specs = registry.specs(base) if base else {}
        wanted = validate(change({k: dict(v) for k, v in current.items()}))
        try:
            return registry.apply(
                wanted, base=base, author=author, message=message, source="api"
            ), wanted
        except ConflictError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
