"""The plan is a pure function of (last applied, new): tested exhaustively, with hypothesis."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from twin.spec.plan import MISSING, Action, FieldChange, diff_fields, make_plan


def dev(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "flux.iot/v1", "kind": "Device",
            "metadata": {"name": name, "site": "s"}, "spec": {"type": "sensor", **spec}}


def test_empty_to_empty_is_empty() -> None:
    p = make_plan({}, {})
    assert p.empty and p.changes == () and dict(p.result) == {}


def test_create_update_keep_delete() -> None:
    cur = {("Device", "a"): dev("a"), ("Device", "b"): dev("b"), ("Device", "c"): dev("c")}
    new = {("Device", "a"): dev("a"), ("Device", "b"): dev("b", model="m"), ("Device", "d"): dev("d")}
    p = make_plan(cur, new)
    assert [(c.action, c.name) for c in p.changes] == [
        (Action.UPDATE, "b"), (Action.KEEP, "c"), (Action.CREATE, "d")]
    assert p.of(Action.UPDATE)[0].fields == (FieldChange(("spec", "model"), MISSING, "m"),)
    assert set(p.result) == {("Device", k) for k in "abcd"}  # c kept without --prune
    pp = make_plan(cur, new, prune=True)
    assert [(c.action, c.name) for c in pp.changes] == [
        (Action.UPDATE, "b"), (Action.DELETE, "c"), (Action.CREATE, "d")]
    assert set(pp.result) == {("Device", k) for k in "abd"}
    assert pp.counts == {"create": 1, "update": 1, "delete": 1, "keep": 0}


def test_only_kept_objects_is_empty_plan() -> None:
    cur = {("Device", "a"): dev("a")}
    p = make_plan(cur, {})
    assert p.empty and p.counts["keep"] == 1 and dict(p.result) == cur


def test_kinds_are_ordered_sites_first() -> None:
    new = {("Device", "a"): dev("a"), ("Site", "s"): {"kind": "Site"},
           ("DeviceModel", "m"): {}, ("DeviceGroup", "g"): {}, ("Scene", "x"): {}}
    kinds = [c.kind for c in make_plan({}, new).changes]
    assert kinds == ["Site", "DeviceGroup", "DeviceModel", "Device", "Scene"]


def test_field_diff_is_nested_and_typed() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    new = {"a": {"b": 1.0, "c": [1, 3], "e": True}}
    assert diff_fields(old, new) == [
        FieldChange(("a", "b"), 1, 1.0),  # int → float is a change
        FieldChange(("a", "c"), [1, 2], [1, 3]),
        FieldChange(("a", "e"), MISSING, True),
        FieldChange(("d",), 1, MISSING),
    ]


json_scalar = st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab", max_size=2)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text("xyz", min_size=1, max_size=2), inner, max_size=3),
                          max_leaves=8)
keys = st.tuples(st.sampled_from(["Device", "DeviceGroup", "Site"]), st.text("abc", min_size=1, max_size=2))
specsets = st.dictionaries(keys, st.dictionaries(st.sampled_from(["metadata", "spec"]), json_value), max_size=6)


def apply_fields(old: Any, changes: list[FieldChange]) -> Any:
    """Replay field changes on ``old``: must yield ``new`` (the diff is complete and exact)."""
    import copy

    out = copy.deepcopy(old)
    for ch in changes:
        if not ch.path:
            out = copy.deepcopy(ch.new)
            continue
        target = out
        for part in ch.path[:-1]:
            target = target[part]
        if ch.new is MISSING:
            del target[ch.path[-1]]
        else:
            target[ch.path[-1]] = copy.deepcopy(ch.new)
    return out


@settings(max_examples=300)
@given(json_value, json_value)
def test_diff_replays_to_new(old: Any, new: Any) -> None:
    changes = diff_fields(old, new)
    assert apply_fields(old, changes) == new
    assert (changes == []) == (old == new and _same_types(old, new))


def _same_types(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return all(_same_types(a[k], b[k]) for k in a)
    return True


@settings(max_examples=300)
@given(specsets, specsets, st.booleans())
def test_plan_properties(cur: dict, new: dict, prune: bool) -> None:
    p = make_plan(cur, new, prune=prune)
    # the result is the new set, plus the old objects left alone without --prune
    expected = dict(new) if prune else {**{k: v for k, v in cur.items() if k not in new}, **new}
    assert dict(p.result) == expected
    # every key appears at most once; creates/deletes/keeps exactly where they should
    seen = [c.key for c in p.changes]
    assert len(seen) == len(set(seen))
    for c in p.changes:
        if c.action is Action.CREATE:
            assert c.key in new and c.key not in cur
        elif c.action is Action.DELETE:
            assert prune and c.key in cur and c.key not in new
        elif c.action is Action.KEEP:
            assert not prune and c.key in cur and c.key not in new
        else:
            assert apply_fields(cur[c.key], list(c.fields)) == new[c.key]
    # planning the result against itself is a no-op; planning is deterministic
    assert make_plan(p.result, p.result, prune=True).changes == ()
    assert make_plan(cur, new, prune=prune) == p
