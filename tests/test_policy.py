"""The authorization policy (twin/policy.py) on its own: the whole matrix of role x scope x
kind x verb x where the object is (own site, other site, moving in or out, shared), and the
rules that are not a plain table: granting users, scenes that reach other sites."""

from __future__ import annotations

import itertools

import pytest

from twin import policy
from twin.policy import OPERATE, READ, WRITE, Actor, Target

ROLES = ("viewer", "operator", "admin")
SCOPES = {"unscoped": (), "plant-a": ("plant-a",)}

# the documented table (twin/policy.py docstring), written out independently of REQUIRED
SPEC = ("Site", "DeviceGroup", "DeviceModel", "Device", "Scene", "RetentionPolicy", "Dashboard",
        "Report", "EdgeNode")
LEAST: dict[tuple[str, str], str | None] = {}
for kind in SPEC:
    LEAST[(kind, "read")] = "viewer"
    LEAST[(kind, "operate")] = "operator"
    LEAST[(kind, "write")] = "operator"
LEAST[("RetentionPolicy", "operate")] = "admin"
for kind in ("Alarm", "Command"):
    LEAST[(kind, "read")], LEAST[(kind, "operate")], LEAST[(kind, "write")] = (
        "viewer", "operator", None)
for kind in ("DeviceKey", "User", "Session", "Audit"):
    LEAST[(kind, "read")], LEAST[(kind, "operate")], LEAST[(kind, "write")] = (
        "admin", None, "admin")
KINDS = sorted({k for k, _ in LEAST})

A, B = frozenset({"plant-a"}), frozenset({"plant-b"})
# where: (stored sites, new sites); "-" = no such version (create / delete); None = shared
PLACES: dict[str, tuple[object, object]] = {
    "own": (A, A),
    "other": (B, B),
    "move-in": (B, A),  # another site's object moved into mine
    "move-out": (A, B),
    "create-own": ("-", A),
    "create-other": ("-", B),
    "delete-other": (B, "-"),
    "shared": (None, None),
}
# the places a plant-a subject reaches (an unscoped one reaches all of them)
REACHED_BY_PLANT_A = {"own", "create-own"}


def target(kind: str, sites: object) -> Target | None:
    if sites == "-":
        return None
    assert sites is None or isinstance(sites, frozenset)
    return Target(kind, sites, role="viewer" if kind == "User" else None)


CASES = list(itertools.product(ROLES, SCOPES, KINDS, ("read", "operate", "write"), PLACES))


@pytest.mark.parametrize(("role", "scope", "kind", "verb", "place"), CASES)
def test_matrix(role: str, scope: str, kind: str, verb: str, place: str) -> None:
    who = Actor(role, SCOPES[scope])
    old, new = (target(kind, s) for s in PLACES[place])
    if verb != "write" and (old is None or new is None):
        old = new = old or new  # reads and operations act on what exists
    least = LEAST[(kind, verb)]
    role_ok = least is not None and ROLES.index(role) >= ROLES.index(least)
    site_ok = scope == "unscoped" or place in REACHED_BY_PLANT_A
    decision = policy.decide(who, verb, old=old, new=new)
    assert decision.allowed is (role_ok and site_ok), decision.reason
    if not decision.allowed:
        assert decision.reason  # a refusal always says why
        with pytest.raises(policy.PermissionDenied):
            policy.check(who, verb, old=old, new=new)


def test_matrix_is_complete() -> None:
    assert {k for k, _ in policy.REQUIRED} | {"Broker", "Topic"} >= set(KINDS)
    assert len(CASES) == 3 * 2 * len(KINDS) * 3 * len(PLACES)


@pytest.mark.parametrize(
    ("granter", "new_user", "allowed"),
    [
        (Actor("admin"), Target("User", None, role="admin"), True),
        (Actor("admin", ("plant-a",)), Target("User", None, role="admin"), False),  # unscoped
        (Actor("admin", ("plant-a",)), Target("User", None, role="viewer"), False),
        (Actor("admin", ("plant-a",)), Target("User", A, role="admin"), True),
        (Actor("admin", ("plant-a",)), Target("User", A | B, role="viewer"), False),
        (Actor("admin", ("plant-a", "plant-b")), Target("User", A | B, role="operator"), True),
        (Actor("operator"), Target("User", A, role="viewer"), False),
    ],
)
def test_nobody_grants_beyond_their_own(granter: Actor, new_user: Target, allowed: bool) -> None:
    assert policy.allows(granter, WRITE, new=new_user) is allowed


def test_granting_a_role_above_ones_own_is_refused() -> None:
    # the table alone lets an admin write users; the grant rule is what stops escalation
    assert not policy.allows(Actor("operator"), WRITE, new=Target("User", A, role="admin"))
    d = policy.decide(Actor("admin", ("plant-a",)), WRITE, new=Target("User", A, role="root"))
    assert d.allowed  # an unknown role ranks below viewer: it grants nothing
    assert policy.rank("root") < policy.rank("viewer")


def test_scene_reach_is_an_admin_grant_over_every_reached_site() -> None:
    reach_b = Target("Scene", A, reach=B)
    assert policy.allows(Actor("operator", ("plant-a",)), WRITE, new=Target("Scene", A))
    assert not policy.allows(Actor("operator"), WRITE, new=reach_b)  # needs admin
    assert not policy.allows(Actor("admin", ("plant-a",)), WRITE, new=reach_b)  # not over b
    assert policy.allows(Actor("admin", ("plant-a", "plant-b")), WRITE, new=reach_b)
    assert policy.allows(Actor("admin"), WRITE, new=reach_b)
    # removing the reach again is judged on the stored scene too
    assert not policy.allows(
        Actor("admin", ("plant-a",)), WRITE, old=reach_b, new=Target("Scene", A)
    )


@pytest.mark.parametrize(
    ("scene_site", "reach", "device_site", "ok"),
    [
        ("plant-a", (), "plant-a", True),
        ("plant-a", (), "plant-b", False),
        ("plant-a", ("plant-b",), "plant-b", True),
        ("plant-a", (), None, False),
        (None, (), "plant-b", True),  # a shared scene, written by an unscoped subject
    ],
)
def test_scene_actions_stay_in_their_site(
    scene_site: str | None, reach: tuple[str, ...], device_site: str | None, ok: bool
) -> None:
    assert policy.scene_may_act(scene_site, reach, device_site) is ok


def test_changes_judge_only_what_changes_on_both_versions() -> None:
    model = {"kind": "DeviceModel", "metadata": {"name": "m"}, "spec": {"x": 1}}
    dev_b = {"kind": "Device", "metadata": {"name": "d", "site": "plant-b"}, "spec": {}}
    dev_a = {"kind": "Device", "metadata": {"name": "d", "site": "plant-a"}, "spec": {}}
    site_a = {"kind": "Site", "metadata": {"name": "plant-a"}, "spec": {}}
    oper_a = Actor("operator", ("plant-a",))
    before = {("DeviceModel", "m"): model, ("Device", "d"): dev_b, ("Site", "plant-a"): site_a}
    policy.check_changes(oper_a, before, dict(before))  # nothing changes: nothing judged
    changed_site = {**before, ("Site", "plant-a"): {**site_a, "spec": {"title": "A"}}}
    policy.check_changes(oper_a, before, changed_site)  # a Site's site is its own name
    with pytest.raises(policy.PermissionDenied, match="Device d"):
        policy.check_changes(oper_a, before, {**before, ("Device", "d"): dev_a})  # move in
    with pytest.raises(policy.PermissionDenied, match="DeviceModel m"):
        policy.check_changes(oper_a, before, {**before, ("DeviceModel", "m"): {**model, "spec": {}}})
    policy.check_changes(Actor("operator"), before, {**before, ("Device", "d"): dev_a})


def test_visible_sites() -> None:
    assert policy.visible_sites(Actor("viewer"), None) is None
    assert policy.visible_sites(Actor("viewer"), ["plant-b"]) == {"plant-b"}
    scoped = Actor("viewer", ("plant-a",))
    assert policy.visible_sites(scoped, None) == {"plant-a"}
    assert policy.visible_sites(scoped, ["plant-b"]) == set()


def test_verbs() -> None:
    assert {READ, OPERATE, WRITE} == set(policy.Verb)
