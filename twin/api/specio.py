"""Validate and apply spec documents that arrive through the API.

Validation is the spec layer's ``validate_specs``: the same schema and reference checks as
``twin validate``; problems name the kind, name and path inside the document.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twin.errors import ConflictError
from twin.registry.base import Key, Registry, Revision

Specs = dict[Key, dict[str, Any]]


def validate(specs: Mapping[Key, Mapping[str, Any]]) -> Specs:
    """Validate a whole spec set; return its normalised form. Raises SpecError."""
    from twin.spec import validate_specs

    return validate_specs(doc for _, doc in sorted(specs.items())).specs


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
