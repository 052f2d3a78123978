"""Apply and rollback: the plan computed against the registry head, applied atomically.

The registry is passed in (any ``twin.registry.base.Registry``); this module never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twin.errors import ConflictError
from twin.spec.documents import LoadedSpecs
from twin.spec.gcpause import gc_paused
from twin.spec.plan import Plan, make_plan

if TYPE_CHECKING:  # the spec layer only needs the registry's shape, never its code
    from twin.registry.base import Key, Registry, Revision

Specs = dict["Key", dict[str, Any]]


@dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    revision: Revision | None  # None when nothing changed
    base: int


def plan_against(registry: Registry, loaded: LoadedSpecs, *, prune: bool = False) -> tuple[Plan, int]:
    head = registry.head()
    base = head.number if head else 0
    with gc_paused():
        current = registry.specs(base) if base else {}
        return make_plan(current, loaded.specs, prune=prune), base


def apply_specs(
    registry: Registry,
    loaded: LoadedSpecs,
    *,
    prune: bool = False,
    author: str,
    message: str = "",
    source: str = "cli",
) -> ApplyResult:
    """Plan against the head and apply it in one registry transaction (all or nothing).

    Raises ConflictError if another apply lands between the plan and the write.
    """
    plan, base = plan_against(registry, loaded, prune=prune)
    if plan.empty:
        return ApplyResult(plan, None, base)
    revision = registry.apply(plan.result, base=base, author=author, message=message, source=source)
    return ApplyResult(plan, revision, base)


def rollback(registry: Registry, number: int, *, author: str, message: str = "") -> ApplyResult:
    """Make a new revision whose content equals revision ``number``'s."""
    target = registry.revision(number)  # NotFoundError if absent
    head = registry.head()
    base = head.number if head else 0
    current = registry.specs(base) if base else {}
    wanted = registry.specs(target.number)
    plan = make_plan(current, wanted, prune=True)
    if plan.empty:
        return ApplyResult(plan, None, base)
    revision = registry.apply(
        plan.result, base=base, author=author,
        message=message or f"rollback to revision {number}", source="rollback",
    )
    return ApplyResult(plan, revision, base)


def validate_set(specs: Mapping[Key, Mapping[str, Any]]) -> Specs:
    """Validate a whole spec set; return its normalised form. Raises SpecError."""
    from twin.spec import validate_specs

    return validate_specs(doc for _, doc in sorted(specs.items())).specs


def apply_change(
    registry: Registry,
    change: Callable[[Specs], Specs],
    *,
    author: str,
    message: str,
    source: str = "api",
    attempts: int = 3,
    judge: Callable[[Specs, Specs], None] | None = None,
) -> tuple[Revision | None, Specs]:
    """Read the head, ``change`` it, validate, apply against that head (retry on conflict).
    Returns (None, specs) when the change leaves the content as it is.

    ``judge(current, wanted)`` (both normalised) may refuse the change by raising before
    anything is written: the API's authorization policy judges what the change touches."""
    for attempt in range(attempts):
        head = registry.head()
        base = head.number if head else 0
        current: Specs = registry.specs(base) if base else {}
        wanted = validate_set(change({k: dict(v) for k, v in current.items()}))
        if judge is not None:
            judge(current, wanted)
        try:
            return registry.apply(
                wanted, base=base, author=author, message=message, source=source
            ), wanted
        except ConflictError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
