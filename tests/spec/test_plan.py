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
        FieldChange(("a", "c", 1), 2, 3),  # lists element by element
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
    """Replay field changes on ``old``: must yield ``new`` (the diff is complete and exact).

    At each list: removals (old indices) first, then additions (new indices), then the changes
    inside the elements (new indices), as ``diff_fields`` documents."""
    import copy

    if not changes:
        return copy.deepcopy(old)
    for ch in changes:
        if not ch.path:
            return copy.deepcopy(ch.new)
    by_head: dict[Any, list[FieldChange]] = {}
    for ch in changes:
        by_head.setdefault(ch.path[0], []).append(ch)
    out = copy.deepcopy(old)
    if isinstance(out, dict):
        for k, chs in by_head.items():
            if len(chs) == 1 and len(chs[0].path) == 1 and chs[0].new is MISSING:
                del out[k]
            elif len(chs) == 1 and len(chs[0].path) == 1 and chs[0].old is MISSING:
                out[k] = copy.deepcopy(chs[0].new)
            else:
                out[k] = apply_fields(out[k], [FieldChange(c.path[1:], c.old, c.new) for c in chs])
        return out
    assert isinstance(out, list), (old, changes)
    removed = {c.path[0] for c in changes if len(c.path) == 1 and c.new is MISSING}
    added = {c.path[0]: c.new for c in changes if len(c.path) == 1 and c.old is MISSING}
    items = [x for i, x in enumerate(out) if i not in removed]
    for j in sorted(added):
        items.insert(j, copy.deepcopy(added[j]))
    for j, chs in by_head.items():
        inner = [FieldChange(c.path[1:], c.old, c.new) for c in chs
                 if not (len(c.path) == 1 and (c.old is MISSING or c.new is MISSING))]
        if inner:
            items[j] = apply_fields(items[j], inner)
    return items


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
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b, strict=True))
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


def scene(triggers: list[Any], actions: list[Any] | None = None) -> dict[str, Any]:
    return {"kind": "Scene", "metadata": {"name": "fan-on-when-hot"},
            "spec": {"triggers": triggers, "actions": actions or []}}


def test_a_changed_list_is_diffed_element_by_element() -> None:
    """The issue's plan: `~ spec.triggers: [{"device": ... → [...` hid a 30 → 28."""
    t = {"type": "device_data", "device": "temp_sensor_01", "point": "temperature", "operator": ">"}
    old = scene([{**t, "value": 30}], [{"type": "command", "device": "fan_01"}])
    new = scene([{**t, "value": 28}], [{"type": "command", "device": "fan_01"}])
    p = make_plan({("Scene", "x"): old}, {("Scene", "x"): new})
    assert p.changes[0].fields == (FieldChange(("spec", "triggers", 0, "value"), 30, 28),)


def test_list_insert_and_remove_are_shown_as_such() -> None:
    a, b, c, d = ({"device": n, "value": 1} for n in "abcd")
    assert diff_fields([a, b, c], [a, d, b, c]) == [FieldChange((1,), MISSING, d)]
    assert diff_fields([a, b, c], [a, c]) == [FieldChange((1,), b, MISSING)]
    assert diff_fields([1, 2, 3], [1, 3, 4]) == [FieldChange((1,), 2, MISSING), FieldChange((2,), MISSING, 4)]


def test_list_items_with_a_name_are_matched_by_name() -> None:
    old = [{"name": "temps", "metric": "avg"}, {"name": "power", "metric": "max"}]
    # power changed, temps moved after a new item: matched by name, not by position
    new = [{"name": "alarms"}, {"name": "temps", "metric": "avg"}, {"name": "power", "metric": "min"}]
    assert diff_fields(old, new, ("spec", "panels")) == [
        FieldChange(("spec", "panels", 0), MISSING, {"name": "alarms"}),
        FieldChange(("spec", "panels", 2, "metric"), "max", "min"),
    ]
    # a renamed item is another item: removed and added, not a change of its fields
    assert diff_fields([{"id": 1, "v": 1}], [{"id": 2, "v": 1}]) == [
        FieldChange((0,), {"id": 1, "v": 1}, MISSING), FieldChange((0,), MISSING, {"id": 2, "v": 1})]
    # types count: 1 → 1.0 inside a list is a change
    assert diff_fields([[1]], [[1.0]]) == [FieldChange((0, 0), 1, 1.0)]


def test_plan_output_shows_the_element_that_changed() -> None:
    from twin.cli.output import plan_lines

    t = {"type": "device_data", "device": "temp_sensor_01", "point": "temperature", "operator": ">"}
    p = make_plan({("Scene", "x"): scene([{**t, "value": 30}])},
                  {("Scene", "x"): scene([{**t, "value": 28}, {**t, "operator": "<", "value": 5}])})
    lines = [line.plain for line in plan_lines(p)]
    assert lines[1] == "    ~ spec.triggers[0].value: 30 → 28"
    assert lines[2].startswith('    + spec.triggers[1]: {"device": "temp_sensor_01", "operator": "<"')
    assert len(lines) == 3


named = st.lists(st.fixed_dictionaries({"name": st.sampled_from("abcdef")},
                                       optional={"v": json_value}), max_size=5,
                 unique_by=lambda x: x["name"])


@settings(max_examples=300)
@given(named, named)
def test_named_list_diff_replays_to_new(old: list[Any], new: list[Any]) -> None:
    changes = diff_fields(old, new)
    assert apply_fields(old, changes) == new
    assert (changes == []) == (old == new and _same_types(old, new))
    # an item present on both sides is never reported removed or added unless it moved
    moved_or_kept = {x["name"] for x in old} & {x["name"] for x in new}
    touched = {(c.old if c.new is MISSING else c.new)["name"] for c in changes
               if len(c.path) == 1 and MISSING in (c.old, c.new)}
    order_old = [x["name"] for x in old if x["name"] in moved_or_kept]
    order_new = [x["name"] for x in new if x["name"] in moved_or_kept]
    if order_old == order_new:
        assert not touched & moved_or_kept
