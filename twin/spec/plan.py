"""The plan: a pure function of (last applied spec set, new spec set).

``make_plan(current, desired, prune=...)`` lists creates, field-level updates and deletes.
Without ``prune`` objects that are in the registry but not in the files are *kept* (listed as
left alone) and stay in the resulting spec set; with ``prune`` they are deleted.
"""

from __future__ import annotations

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


def diff_fields(old: Any, new: Any, path: tuple[str | int, ...] = ()) -> list[FieldChange]:
    """Field-level differences: mappings are compared key by key, other values whole."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[FieldChange] = []
        for k in sorted(set(old) | set(new), key=str):
            o, n = old.get(k, MISSING), new.get(k, MISSING)
            if o is MISSING or n is MISSING:
                out.append(FieldChange((*path, k), o, n))
            elif o != n or type(o) is not type(n):
                out.extend(diff_fields(o, n, (*path, k)))
        return out
    if old == new and type(old) is type(new):
        return []
    return [FieldChange(path, old, new)]


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
        elif old != new:
            fields = diff_fields(old, new)
            if fields:
                changes.append(Change(Action.UPDATE, kind, name, tuple(fields)))
    return Plan(tuple(changes), result)
