"""Selectors over normalised documents: ``tag=hvac,site=plant-a,floor=2,type!=camera``.

Keys: ``name``, ``site``, ``group`` (matches the group and every group nested below it),
``tag``, ``type``, ``model``, ``kind``; any other key is a label. ``status`` is matched by
callers that know device status (it is not part of the spec).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RESERVED = {"name", "site", "group", "tag", "type", "model", "kind", "status"}


@dataclass(frozen=True)
class Term:
    key: str
    value: str
    negate: bool = False


def parse_selector(text: str | None) -> list[Term]:
    """Parse ``a=b,c!=d``; raises ValueError with a readable message."""
    terms: list[Term] = []
    if not text:
        return terms
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "!=" in part:
            k, v = part.split("!=", 1)
            neg = True
        elif "=" in part:
            k, v = part.split("=", 1)
            k = k.rstrip("=")
            neg = False
        else:
            raise ValueError(f"selector term {part!r} is not key=value or key!=value")
        k, v = k.strip(), v.strip()
        if not k:
            raise ValueError(f"selector term {part!r} has no key")
        terms.append(Term(k, v, neg))
    return terms


def group_ancestry(groups: Mapping[str, Mapping[str, Any]], group: str | None) -> list[str]:
    """``[group, parent, grandparent, ...]``, stopping at unknown groups or cycles."""
    out: list[str] = []
    while group and group not in out:
        out.append(group)
        g = groups.get(group)
        group = (g.get("spec") or {}).get("parent") if g else None
    return out


def matches(
    doc: Mapping[str, Any],
    terms: list[Term],
    *,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    status: str | None = None,
) -> bool:
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    for t in terms:
        if t.key == "tag":
            ok = t.value in (meta.get("tags") or [])
        elif t.key == "group":
            if doc.get("kind") == "DeviceGroup":
                chain = group_ancestry(groups or {}, meta.get("name"))
            else:
                chain = group_ancestry(groups or {}, meta.get("group"))
            ok = t.value in chain
        elif t.key in ("name", "site"):
            ok = str(meta.get(t.key)) == t.value
        elif t.key in ("type", "model"):
            ok = str(spec.get(t.key)) == t.value
        elif t.key == "kind":
            ok = doc.get("kind") == t.value
        elif t.key == "status":
            ok = status == t.value
        else:
            ok = str((meta.get("labels") or {}).get(t.key)) == t.value
        if ok == t.negate:
            return False
    return True
