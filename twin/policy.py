"""Authorization: who may do which verb to which kind in which site. The one place that decides.

Every REST route, ``/apply``, the WebSocket feed, the MQTT broker's ACL
(:mod:`twin.runtime.mqtt_auth`) and scene actions (:mod:`twin.control`) ask this module; none
carries its own rule. It is pure (no I/O, imports only :mod:`twin.errors`) and sits at the
bottom of the layers so that the API, the runtime and the control layer can all use it.

Subjects
    Anything with a ``role`` (``viewer`` < ``operator`` < ``admin``; anything else ranks below
    viewer) and ``sites`` (a tuple; empty = every site, "unscoped"): the API's
    :class:`~twin.api.auth.Principal`, the broker's ``MqttPrincipal``, a :class:`Subject`.

Targets
    A :class:`Target` is a kind plus the sites the object occupies:

    - ``{"plant-a"}`` — an object of one site (``metadata.site``; a ``Site``'s site is its own
      name; a user's sites are the sites it is scoped to);
    - ``None`` — every site: a shared document without a site (a ``DeviceModel``), an unscoped
      user, a broker topic outside any site. Only unscoped subjects reach these;
    - ``frozenset()`` — not bound to a site at all (the broker's ``$SYS`` tree).

    A subject *covers* a target when it is unscoped, or the target's sites are a non-empty
    subset of the subject's (``frozenset()`` is covered by everyone).

Decisions — :func:`decide` (and :func:`check`, which raises :class:`PermissionDenied`)
    ``decide(subject, verb, old=..., new=...)`` judges the stored object (``old``) **and** the
    new one (``new``): moving an object between sites needs rights on both; creating has no
    ``old``, deleting no ``new``. Allowed when the subject's role reaches :data:`REQUIRED` for
    (kind, verb) and it covers every target given. Users are special in one more way: nobody
    grants a role above their own (a scoped admin cannot make an unscoped user — that user
    would cover every site, see above).

========================== ======== ========= =========================================
kind                       read     operate   write (create, update, delete)
========================== ======== ========= =========================================
Site, DeviceGroup,         viewer   operator  operator
DeviceModel, Device,
Dashboard, Report,
RetentionPolicy, EdgeNode
Scene                      viewer   operator  operator; admin when ``spec.reach`` lets
                                              it act in other sites (see below)
                                              (a retention pass: admin)
Plugin                     viewer   —         admin (it runs code in the engine, sandboxed)
Alarm                      viewer   operator  —
Command                    viewer   operator  —
DeviceKey                  admin    —         admin
User, Session, Audit       admin    —         admin
Broker (``$SYS``)          operator —         —
Topic (raw MQTT topics)    viewer   —         admin
========================== ======== ========= =========================================

``operate`` is acting on what exists without changing the spec: sending and cancelling
commands, running a scene, acknowledging and clearing alarms, a retention pass.

Scenes: operators may write scenes. A scene acts on the world with the engine's authority, so
its actions stay inside the scene's own site (:func:`scene_may_act`) — no more than the
operator who wrote it could do by hand there (outbound webhooks are limited separately, to the
hosts the engine's configuration allows: :mod:`twin.control.webhooks`). A scene may act in other
sites only when its ``spec.reach`` lists them, and writing such a scene is judged as an
*admin* write over the scene's site plus every reached site (so only an admin of all of them
can allow it); reading or running such a scene needs the reached sites too, since what it does
happens there. ``twin validate`` reports an action on a device outside the scene's reach, with
file and line. A scene without a site is a shared document: only unscoped subjects write it,
and its actions may reach every site.

Edges: an edge node authenticates with its own key (a device key of the pseudo device
``edge:<name>``) on ``/api/v1/edge-link/<name>/...`` only; what it uploads is judged by
:func:`edge_may_report` (data only for the devices its EdgeNode owns).

``/apply`` judges only the documents its plan creates, updates or deletes (normalised, on the
stored and the new version): re-applying unchanged shared documents such as the demo's
``DeviceModel`` needs no unscoped rights; changing them does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from twin.errors import TwinError

ROLES = ("viewer", "operator", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}


class Verb(StrEnum):
    READ = "read"
    OPERATE = "operate"
    WRITE = "write"


READ, OPERATE, WRITE = Verb.READ, Verb.OPERATE, Verb.WRITE

SPEC_KINDS = (
    "Site",
    "DeviceGroup",
    "DeviceModel",
    "Device",
    "Scene",
    "RetentionPolicy",
    "Dashboard",
    "Report",
    "NotificationRule",
    "EdgeNode",
)
ADMIN_KINDS = ("DeviceKey", "User", "Session", "Audit")

# (kind, verb) -> the least role; a pair that is missing is never allowed
REQUIRED: dict[tuple[str, Verb], str] = {
    **{(k, READ): "viewer" for k in SPEC_KINDS},
    **{(k, OPERATE): "operator" for k in SPEC_KINDS},
    **{(k, WRITE): "operator" for k in SPEC_KINDS},
    ("RetentionPolicy", OPERATE): "admin",  # a retention pass deletes data
    ("Plugin", READ): "viewer",
    ("Plugin", WRITE): "admin",  # code the engine runs (sandboxed): codecs, transforms, scene steps
    ("Alarm", READ): "viewer",
    ("Alarm", OPERATE): "operator",
    ("Command", READ): "viewer",
    ("Command", OPERATE): "operator",
    **{(k, READ): "admin" for k in ADMIN_KINDS},
    **{(k, WRITE): "admin" for k in ADMIN_KINDS},
    ("Broker", READ): "operator",
    ("Topic", READ): "viewer",
    ("Topic", WRITE): "admin",
}


class Subject(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def sites(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Actor:
    """A plain subject (tests, the CLI)."""

    role: str
    sites: tuple[str, ...] = ()


class PermissionDenied(TwinError):
    """The policy refused (HTTP 403; MQTT "not authorised")."""


@dataclass(frozen=True)
class Target:
    """An object as the policy sees it: its kind, the sites it occupies (None: every site;
    empty: none), and for users the role it carries."""

    kind: str
    sites: frozenset[str] | None
    role: str | None = None
    # a Scene's reach beyond its own site (judged as an admin write)
    reach: frozenset[str] = frozenset()

    @classmethod
    def of(cls, kind: str, site: str | None, **kw: Any) -> Target:
        """An object of one site (None: a shared object, i.e. every site)."""
        return cls(kind, None if site is None else frozenset({site}), **kw)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


def rank(role: str | None) -> int:
    return RANK.get(role or "", -1)


def at_least(role: str, least: str) -> bool:
    return rank(role) >= RANK[least]


def covers(scope: Iterable[str], sites: frozenset[str] | None) -> bool:
    """Does a subject scoped to ``scope`` (empty: every site) reach an object in ``sites``?"""
    scope = tuple(scope)
    if not scope:
        return True
    if sites is None:
        return False
    return sites <= set(scope)


def _describe(sites: frozenset[str] | None) -> str:
    if sites is None:
        return "every site (a shared object)"
    return ", ".join(sorted(sites)) or "no site"


def decide(
    who: Subject, verb: Verb | str, *, old: Target | None = None, new: Target | None = None
) -> Decision:
    """May ``who`` do ``verb`` to the object stored as ``old`` / becoming ``new``?"""
    verb = Verb(verb)
    targets = [t for t in (old, new) if t is not None]
    if not targets:
        raise ValueError("decide() needs the stored object, the new one, or both")
    scope = tuple(who.sites)
    for t in targets:
        least = REQUIRED.get((t.kind, verb))
        if least is None:
            return Decision(False, f"nobody may {verb} a {t.kind}")
        if t.kind == "Scene" and verb is WRITE and t.reach - (t.sites or frozenset()):
            least = "admin"  # reaching beyond its own site is an admin's grant
        if not at_least(who.role, least):
            what = f"{verb} {t.kind}" + (" with spec.reach" if least == "admin" and t.reach else "")
            return Decision(False, f"needs role {least} to {what} (you are {who.role or 'nobody'})")
        sites = t.sites if not t.reach or t.sites is None else t.sites | t.reach
        if not covers(scope, sites):
            return Decision(
                False,
                f"not allowed for site {_describe(sites)} (your sites: {', '.join(scope)})",
            )
        if t.kind == "User" and t.role is not None and rank(t.role) > rank(who.role):
            return Decision(False, f"cannot grant role {t.role} above your own ({who.role})")
    return Decision(True)


def allows(
    who: Subject, verb: Verb | str, *, old: Target | None = None, new: Target | None = None
) -> bool:
    return decide(who, verb, old=old, new=new).allowed


def check(
    who: Subject, verb: Verb | str, *, old: Target | None = None, new: Target | None = None
) -> None:
    """:func:`decide`, raising :class:`PermissionDenied` with the reason when refused."""
    d = decide(who, verb, old=old, new=new)
    if not d.allowed:
        raise PermissionDenied(d.reason)


# -- targets from what the engine stores ----------------------------------------------------------
def doc_site(doc: Mapping[str, Any]) -> str | None:
    """The site of a spec document: ``metadata.site``; a ``Site``'s own name."""
    meta = doc.get("metadata") or {}
    if not isinstance(meta, Mapping):
        return None
    if doc.get("kind") == "Site":
        name = meta.get("name")
        return str(name) if name is not None else None
    site = meta.get("site")
    return str(site) if site is not None else None


def scene_reach(doc: Mapping[str, Any]) -> frozenset[str]:
    spec = doc.get("spec") or {}
    reach = spec.get("reach") if isinstance(spec, Mapping) else None
    return frozenset(str(s) for s in reach) if isinstance(reach, list) else frozenset()


def doc_target(doc: Mapping[str, Any] | None) -> Target | None:
    """A spec document as a target (None passes through: nothing stored / nothing new)."""
    if doc is None:
        return None
    kind = str(doc.get("kind") or "")
    reach = scene_reach(doc) if kind == "Scene" else frozenset()
    return Target.of(kind, doc_site(doc), reach=reach)


def user_target(sites: Iterable[str], role: str | None = None) -> Target:
    """A user account: it occupies the sites it is scoped to (none listed: every site)."""
    s = frozenset(sites)
    return Target("User", s or None, role=role)


def check_doc(
    who: Subject,
    verb: Verb | str,
    old: Mapping[str, Any] | None = None,
    new: Mapping[str, Any] | None = None,
) -> None:
    check(who, verb, old=doc_target(old), new=doc_target(new))


def check_changes(
    who: Subject,
    before: Mapping[tuple[str, str], Mapping[str, Any]],
    after: Mapping[tuple[str, str], Mapping[str, Any]],
) -> None:
    """Judge every document a change creates, updates or deletes, on its stored and its new
    version (both normalised); unchanged documents are not judged."""
    refused = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        d = decide(who, WRITE, old=doc_target(old), new=doc_target(new))
        if not d.allowed:
            refused.append(f"{key[0]} {key[1]}: {d.reason}")
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise PermissionDenied(refused[0] + more)


def visible_sites(who: Subject, wanted: Iterable[str] | None) -> set[str] | None:
    """The sites a listing or a feed may show ``who`` (None: every site): what they asked for,
    narrowed to their scope."""
    scope = tuple(who.sites)
    if not scope:
        return None if wanted is None else set(wanted)
    return set(scope) if wanted is None else set(wanted) & set(scope)


def scene_may_act(scene_site: str | None, reach: Iterable[str], device_site: str | None) -> bool:
    """May a scene of ``scene_site`` (reaching ``reach`` too) act on a device of
    ``device_site``? A site-less scene is a shared document (written by an unscoped subject)
    and may act anywhere."""
    if scene_site is None:
        return True
    return device_site is not None and (device_site == scene_site or device_site in set(reach))


def edge_may_report(edge: str, device: str, owner: str | None) -> bool:
    """May the edge node ``edge`` (authenticated by its key, ``twin edge-key``) report data
    for ``device``, owned by the EdgeNode ``owner`` (None: no edge owns it)? Only for the
    devices it owns: an edge's key never writes another edge's or the cloud's devices."""
    return owner is not None and owner == edge


__all__ = [
    "OPERATE",
    "RANK",
    "READ",
    "REQUIRED",
    "ROLES",
    "WRITE",
    "Actor",
    "Decision",
    "PermissionDenied",
    "Subject",
    "Target",
    "Verb",
    "allows",
    "at_least",
    "check",
    "check_changes",
    "check_doc",
    "covers",
    "decide",
    "doc_site",
    "doc_target",
    "edge_may_report",
    "scene_may_act",
    "scene_reach",
    "user_target",
    "visible_sites",
]
