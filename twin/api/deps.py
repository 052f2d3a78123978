"""What routes share: the URL prefix, the principal the gatekeeper authenticated, role
dependencies (``Viewer``, ``Operator``, ``Admin``), the API state, common query types, and
``change`` (a spec change through the API: a registry revision the engine reloads).

Authentication happens once, in :class:`twin.api.gatekeeper.Gatekeeper`. Authorization is
:mod:`twin.policy`'s: a route declares the least role its verb needs (``p: Operator``, which
answers 403 before the body is even parsed) and asks the policy about the objects it touches
(:func:`authorize`); every spec change goes through :func:`change`, where the policy judges each
document the change creates, updates or deletes, on its stored and its new version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import trio
from fastapi import Depends, HTTPException, Query, Request
from starlette.requests import HTTPConnection

from twin import policy
from twin.api import auth
from twin.api.specio import Specs, apply_change
from twin.api.state import ApiState

PREFIX = "/api/v1"
PUBLIC = {f"{PREFIX}/health", f"{PREFIX}/auth/login", f"{PREFIX}/auth/refresh"}
SIGNED_PREFIX = f"{PREFIX}/video/s/"
"""Signed video links (twin/api/routes/video.py) carry their own credentials in the path."""
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def api_state(conn: HTTPConnection) -> ApiState:
    st: ApiState = conn.app.state.api
    return st


def principal(request: Request) -> auth.Principal:
    p = request.scope.get("state", {}).get("principal")
    if p is None:  # pragma: no cover - the gatekeeper guarantees it
        raise HTTPException(401, "missing bearer token")
    return p


def need(role: str) -> Callable[[Request], auth.Principal]:
    def dep(request: Request) -> auth.Principal:
        p = principal(request)
        if not policy.at_least(p.role, role):
            raise HTTPException(403, f"needs role {role} (you are {p.role})")
        return p

    dep.__name__ = f"need_{role}"
    return dep


State = Annotated[ApiState, Depends(api_state)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]
Since = Annotated[float | None, Query(allow_inf_nan=False, description="unix seconds")]
"""A time in a query string: finite (``?since=nan`` is a 422, not a query that matches nothing)."""
Viewer = Annotated[auth.Principal, Depends(need("viewer"))]
Operator = Annotated[auth.Principal, Depends(need("operator"))]
Admin = Annotated[auth.Principal, Depends(need("admin"))]


def authorize(
    p: auth.Principal,
    verb: policy.Verb,
    old: Mapping[str, Any] | None = None,
    new: Mapping[str, Any] | None = None,
) -> None:
    """Ask the policy about a spec document (stored ``old`` / proposed ``new``); 403 if refused."""
    policy.check_doc(p, verb, old, new)


async def change(
    request: Request, p: auth.Principal, fn: Callable[[Specs], Specs], message: str
) -> dict[str, Any]:
    """Apply ``fn`` to the stored specs as one revision (validated, judged by the policy,
    atomic), record its number in the audit entry, and wait (up to ``reload_wait``) until the engine runs it."""
    st = api_state(request)
    engine = st.engine

    def judge(before: Specs, after: Specs) -> None:
        policy.check_changes(p, before, after)

    rev, _ = await st.call(
        apply_change, engine.registry, fn, author=p.subject, message=message, judge=judge
    )
    if rev is None:
        return {"revision": engine.revision_number, "changed": False}
    request.scope["state"]["audit_detail"] = {"revision": rev.number}
    engine.poke()
    with trio.move_on_after(st.settings.reload_wait):
        await engine.wait_revision(rev.number)
    return {"revision": rev.number, "changed": True}


def metadata_name(doc: Mapping[str, Any]) -> str | None:
    """``metadata.name`` of a spec document in a request body (None when absent); 422 when
    ``metadata`` is not an object (it would otherwise fail deep inside as a 500)."""
    meta = doc.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        raise HTTPException(422, "metadata must be an object")
    name = meta.get("name")
    return name if isinstance(name, str) else None
