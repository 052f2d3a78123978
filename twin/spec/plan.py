"""The plan: a pure function of (last applied spec set, new spec set).

``make_plan(current, desired, prune=...)`` lists creates, field-level updates and deletes.
Without ``prune`` objects that are in the registry but not in the files are *kept* (listed as
left alone) and stay in the resulting spec set; with ``prune`` they are deleted.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Key = tuple[str, str]

KIND_ORDER = ["Site", "DeviceGroup", "DeviceModel", "Device"]


def kind_rank(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind), "") if kind in KIND_ORDER else (len(KIND_ORDER), kind)


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    KEEP = "keep"  # in the registry, not in the files, and --prune not given


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class FieldChange:
    path: tuple[str | int, ...]
    old: Any
    new: Any


@dataclass(frozen=True)
class Change:
    action: Action
    kind: str
    name: str
    fields: tuple[FieldChange, ...] = ()

    @property
    def key(self) -> Key:
        return (self.kind, self.name)


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    result: Mapping[Key, Mapping[str, Any]] = field(repr=False)
    """The spec set that applying this plan makes the desired state."""

    def of(self, action: Action) -> list[Change]:
        return [c for c in self.changes if c.action is action]

    @property
    def counts(self) -> dict[str, int]:
        return {a.value: len(self.of(a)) for a in Action}

    @property
    def empty(self) -> bool:
        """True when applying would change nothing (kept objects are not changes)."""
        return all(c.action is Action.KEEP for c in self.changes)


IDENTITY_KEYS = ("name", "id", "alias")
"""Keys that identify an item of a list of mappings: such items are matched by identity, so
inserting, removing or moving one shows as that, not as a change to every item after it."""


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``1`` and ``1.0`` or ``True`` differ)."""
    return a == b and _same_types(a, b)


def _same_types(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, Mapping):
        return all(_same_types(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b, strict=True))
    return True


def diff_fields(old: Any, new: Any, path: tuple[str | int, ...] = ()) -> list[FieldChange]:
    """Field-level differences: mappings key by key, lists element by element, other values whole.

    For lists, elements are aligned (by identity key — ``name``, ``id``, ``alias`` — when every
    item has a distinct one, else by value) and each change is one of:

    - ``FieldChange((*path, i), old_item, MISSING)``: the element at *old* index ``i`` was removed;
    - ``FieldChange((*path, j), MISSING, new_item)``: an element was added at *new* index ``j``;
    - changes below ``(*path, j)``: the element now at *new* index ``j`` was changed in place.

    Replayed in that order (removals, then additions, then in-place changes) the changes turn
    ``old`` into ``new`` exactly; the tests check that.
    """
    if same(old, new):
        return []
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[FieldChange] = []
        for k in sorted(set(old) | set(new), key=str):
            o, n = old.get(k, MISSING), new.get(k, MISSING)
            if o is MISSING or n is MISSING:
                out.append(FieldChange((*path, k), o, n))
            else:
                out.extend(diff_fields(o, n, (*path, k)))
        return out
    if isinstance(old, list) and isinstance(new, list):
        return _diff_lists(old, new, path)
    return [FieldChange(path, old, new)]


def _diff_lists(old: list[Any], new: list[Any], path: tuple[str | int, ...]) -> list[FieldChange]:
    ident = _identity_key(old, new)
    if ident is not None:
        a: list[Any] = [(type(x[ident]).__name__, x[ident]) for x in old]
        b: list[Any] = [(type(x[ident]).__name__, x[ident]) for x in new]
    else:
        a, b = [_canonical(x) for x in old], [_canonical(x) for x in new]
    out: list[FieldChange] = []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":  # same identity (or same value): compare in place
            for i, j in zip(range(i1, i2), range(j1, j2), strict=True):
                out.extend(diff_fields(old[i], new[j], (*path, j)))
            continue
        paired = 0 if ident is not None or op != "replace" else min(i2 - i1, j2 - j1)
        for k in range(paired):  # no identity: the n-th replaced item changed into the n-th new
            out.extend(diff_fields(old[i1 + k], new[j1 + k], (*path, j1 + k)))
        out.extend(FieldChange((*path, i), old[i], MISSING) for i in range(i1 + paired, i2))
        out.extend(FieldChange((*path, j), MISSING, new[j]) for j in range(j1 + paired, j2))
    return out


def _identity_key(old: list[Any], new: list[Any]) -> str | None:
    items = [*old, *new]
    if not items or not all(isinstance(x, Mapping) for x in items):
        return None
    for key in IDENTITY_KEYS:
        ids = [x.get(key) for x in items]
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in ids):
            continue
        if len(set(ids[:len(old)])) == len(old) and len(set(ids[len(old):])) == len(new):
            return key
    return None


def _canonical(value: Any) -> str:
    """A text that two values share exactly when ``same`` holds (types included)."""
    if isinstance(value, Mapping):
        inner = ",".join(f"{k!r}:{_canonical(v)}" for k, v in sorted(value.items(), key=lambda kv: repr(kv[0])))
        return "{" + inner + "}"
    if isinstance(value, list):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    return f"{type(value).__name__}:{value!r}"


def make_plan(
    current: Mapping[Key, Mapping[str, Any]],
    desired: Mapping[Key, Mapping[str, Any]],
    *,
    prune: bool = False,
) -> Plan:
    changes: list[Change] = []
    result: dict[Key, Mapping[str, Any]] = {}
    for key in sorted(set(current) | set(desired), key=lambda k: (kind_rank(k[0]), k[1])):
        kind, name = key
        old = current.get(key)
        new = desired.get(key)
        if new is None:
            assert old is not None
            if prune:
                changes.append(Change(Action.DELETE, kind, name))
            else:
                changes.append(Change(Action.KEEP, kind, name))
                result[key] = old
            continue
        result[key] = new
        if old is None:
            changes.append(Change(Action.CREATE, kind, name))
        else:
            fields = diff_fields(old, new)
            if fields:
                changes.append(Change(Action.UPDATE, kind, name, tuple(fields)))
    return Plan(tuple(changes), result)
