"""Which pairs of RetentionPolicy selectors are provably disjoint (allowed together) and which
may overlap (an error at validation; only the first by name runs). Validation's located
errors are in the spec corpus (tests/spec/corpus/41_retention_overlap)."""

from __future__ import annotations

from typing import Any

import pytest

from twin.timeseries.retention import RetentionPolicy, validate_doc


def pol(select: dict[str, Any], site: str | None = "plant-a") -> RetentionPolicy:
    meta: dict[str, Any] = {"name": "p"}
    if site:
        meta["site"] = site
    return RetentionPolicy.from_doc(
        {
            "apiVersion": "flux.iot/v1",
            "kind": "RetentionPolicy",
            "metadata": meta,
            "spec": {"select": select, "tiers": [{"resolution": "raw", "keep": "1d"}]},
        }
    )


DISJOINT = [
    (pol({}), pol({}, site="plant-b"), "different site"),
    (pol({"site": ["a", "b"]}, None), pol({"site": "c"}, None), "different site"),
    (pol({"metric": ["t", "h"]}), pol({"metric": "p"}), "different metric"),
    (pol({"device": "d1"}), pol({"device": ["d2", "d3"]}), "different device"),
    (pol({"group": "line-1"}), pol({"group": "line-2"}), "different group"),
    (pol({"tag": "floor=1"}), pol({"tag": ["hvac", "floor=2"]}), "different label floor"),
]
OVERLAPPING = [
    (pol({}), pol({})),  # both select the whole site
    (pol({}), pol({"metric": "t"})),  # one narrower than the other
    (pol({"metric": ["t", "h"]}), pol({"metric": ["h", "p"]})),  # share "h"
    (pol({"tag": "hvac"}), pol({"tag": "critical"})),  # a device can carry both tags
    (pol({"tag": "floor=1"}), pol({"tag": "room=1"})),  # different label keys
    (pol({"device": "d1"}), pol({"metric": "t"})),  # different fields constrained
    (pol({}, None), pol({"site": "plant-b"}, None)),  # no site: every site
]


@pytest.mark.parametrize(("a", "b", "why"), DISJOINT)
def test_provably_disjoint(a: RetentionPolicy, b: RetentionPolicy, why: str) -> None:
    assert a.disjoint_from(b) == why
    assert b.disjoint_from(a) == why


@pytest.mark.parametrize(("a", "b"), OVERLAPPING)
def test_may_overlap(a: RetentionPolicy, b: RetentionPolicy) -> None:
    assert a.disjoint_from(b) is None
    assert b.disjoint_from(a) is None


def test_tier_meaning_is_checked_by_the_shared_rule() -> None:
    doc = {
        "apiVersion": "flux.iot/v1",
        "kind": "RetentionPolicy",
        "metadata": {"name": "p"},
        "spec": {
            "tiers": [
                {"resolution": "raw", "keep": "7d"},
                {"resolution": "1h", "keep": "30m"},
                {"resolution": "90m", "keep": "1d"},
            ]
        },
    }
    assert validate_doc(doc) == [
        "spec.tiers[1].keep: keep 30m is shorter than the resolution 1h: no window would survive",
        "spec.tiers[2].resolution: 90m must be a multiple of the previous tier's 1h",
    ]
