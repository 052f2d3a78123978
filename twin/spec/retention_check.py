"""Checks on ``kind: RetentionPolicy`` documents: tier order, and overlapping selectors.

A series (device, metric) must be governed by **at most one** RetentionPolicy: two policies
that both roll a series up would write its partials twice into a shared tier (every count and
sum doubled), and their ``keep`` values would fight over its raw data. So two policies whose
selectors *can* match the same series are an error at ``twin validate``, reported on the later
document (file order) and naming the other one, unless they are **provably disjoint**:

* some field both selectors constrain — ``site``, ``group``, ``device`` or ``metric`` — has
  value lists with nothing in common (``metric: [temperature]`` vs ``metric: [humidity]``;
  ``site`` defaults to ``metadata.site``); a series has exactly one site, group (the
  device's own ``metadata.group``, as stored), device and metric;
* or one requires the label ``key=a`` and the other ``key=b`` with ``a != b`` (a device has
  one value per label; bare tags cannot contain ``=``).

Still an error (they may overlap): different bare tags (a device can carry both), one selector
narrower than the other (there is no "most specific wins": say which series each policy owns
by splitting the lists), and two policies that select everything. The check is structural on
purpose — it does not look at which devices exist today, so adding a device later never makes
a valid pair ambiguous. The engine applies the same rule when it builds its retention
manager (``twin.timeseries.retention``): of an overlapping pair only the first by name runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twin.errors import Problem
from twin.spec.documents import Document, LoadedSpecs
from twin.spec.units import format_duration, parse_duration

FIELDS = ("site", "group", "device", "metric")


@dataclass(frozen=True)
class SelectorSets:
    """A policy's selector as sets; ``None`` = the field is not constrained."""

    site: frozenset[str] | None = None
    group: frozenset[str] | None = None
    device: frozenset[str] | None = None
    metric: frozenset[str] | None = None
    tag: frozenset[str] = frozenset()

    @classmethod
    def of(cls, select: Mapping[str, Any], default_site: str | None = None) -> SelectorSets:
        def norm(value: Any) -> frozenset[str] | None:
            if value is None:
                return None
            if isinstance(value, str):
                return frozenset([value])
            if isinstance(value, list | tuple | set | frozenset):
                return frozenset(str(v) for v in value)
            return None

        site = select.get("site", default_site)
        return cls(
            site=norm(site),
            group=norm(select.get("group")),
            device=norm(select.get("device")),
            metric=norm(select.get("metric")),
            tag=norm(select.get("tag")) or frozenset(),
        )


def _labels(tags: frozenset[str]) -> dict[str, str]:
    return dict(t.split("=", 1) for t in tags if "=" in t)


def disjoint_reason(a: SelectorSets, b: SelectorSets) -> str | None:
    """Why no series can match both selectors (e.g. ``"different metric"``), or None."""
    for name in FIELDS:
        va: frozenset[str] | None = getattr(a, name)
        vb: frozenset[str] | None = getattr(b, name)
        if va is not None and vb is not None and not (va & vb):
            return f"different {name}"
    la, lb = _labels(a.tag), _labels(b.tag)
    for key in sorted(set(la) & set(lb)):
        if la[key] != lb[key]:
            return f"different label {key}"
    return None


def tier_problems(tiers: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Meaning of a schema-valid tier list: raw first, whole seconds, each resolution a
    multiple of the previous one, parseable keep. ``(path, message)`` pairs."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    if not isinstance(tiers, list):
        return out
    prev: float | None = None
    for i, t in enumerate(tiers):
        if not isinstance(t, Mapping) or "resolution" not in t:
            continue
        path: tuple[str | int, ...] = ("spec", "tiers", i)
        if t["resolution"] == "raw":
            if i != 0:
                out.append(((*path, "resolution"), "raw must be the first tier"))
            continue
        try:
            res = parse_duration(t["resolution"])
        except (ValueError, TypeError) as exc:
            out.append(((*path, "resolution"), str(exc)))
            continue
        if res <= 0 or res != round(res):
            out.append(((*path, "resolution"), "must be a whole number of seconds > 0"))
        elif prev is not None and (res <= prev or res % prev):
            out.append(
                (
                    (*path, "resolution"),
                    f"{t['resolution']} must be a multiple of the previous tier's "
                    f"{format_duration(prev)}",
                )
            )
        prev = res
        if "keep" in t:
            try:
                keep = parse_duration(t["keep"], allow_inf=True)
            except (ValueError, TypeError) as exc:
                out.append(((*path, "keep"), str(exc)))
            else:
                if not math.isinf(keep) and keep < res:
                    out.append(
                        (
                            (*path, "keep"),
                            f"keep {t['keep']} is shorter than the resolution "
                            f"{t['resolution']}: no window would survive",
                        )
                    )
    return out


def _selector(doc: Document) -> SelectorSets | None:
    meta = doc.body.get("metadata")
    spec = doc.body.get("spec")
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        return None
    select = spec.get("select", {})
    if not isinstance(select, Mapping):
        return None
    site = meta.get("site")
    return SelectorSets.of(select, site if isinstance(site, str) else None)


def _order(doc: Document) -> tuple[str, int, str]:
    # file and position in it, without computing locations (cached loads stay lazy)
    return (doc.source.file, doc.source.index, doc.name)


def retention_problems(loaded: LoadedSpecs) -> list[Problem]:
    problems: list[Problem] = []
    policies = sorted(loaded.of_kind("RetentionPolicy").values(), key=_order)
    for doc in policies:
        if doc.key in loaded.invalid:
            continue
        spec = doc.body.get("spec")
        tiers = spec.get("tiers") if isinstance(spec, Mapping) else None
        for tier_path, message in tier_problems(tiers):
            problems.append(doc.problem(tier_path, message))
    sels = [(doc, _selector(doc)) for doc in policies]
    for j, (later, sb) in enumerate(sels):
        if sb is None:
            continue
        for earlier, sa in sels[:j]:
            if sa is None or disjoint_reason(sa, sb) is not None:
                continue
            spec = later.body.get("spec")
            path: tuple[str, ...] = (
                ("spec", "select")
                if isinstance(spec, Mapping) and "select" in spec
                else ("metadata", "name")
            )
            where = earlier.location
            problems.append(
                later.problem(
                    path,
                    f"selector overlaps RetentionPolicy {earlier.name!r}: a series matched by "
                    "both would be rolled up and expired twice",
                    (f"{earlier.name!r} is defined at {where}; " if where else "")
                    + "make them provably disjoint: different site, group, device or metric "
                    "lists, or different values of one label (floor=1 / floor=2)",
                )
            )
    return problems


__all__ = ["SelectorSets", "disjoint_reason", "retention_problems", "tier_problems"]
