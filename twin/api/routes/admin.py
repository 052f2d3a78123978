"""``/api/v1/users``, ``/api/v1/sessions``, ``/api/v1/audit``: user accounts, login sessions
and the audit log of every mutating call (admins).

A scoped admin sees and manages only the users inside its sites (a user scoped to a subset of
them), their sessions and the audit entries they made; nobody grants a role above their own or
sites beyond their own (an unscoped user covers every site): :mod:`twin.policy`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from twin import policy
from twin.api import auth
from twin.api.deps import PREFIX, Admin, Limit, State
from twin.api.state import ApiState
from twin.registry.base import User

router = APIRouter(prefix=PREFIX, tags=["admin"])


class UserRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,100}$")
    password: str = Field(min_length=8, max_length=1000)
    role: str = Field(pattern="^(viewer|operator|admin)$")
    sites: list[str] = []


def user_target(user: User) -> policy.Target:
    return policy.user_target(user.sites, user.role)


async def users_in_scope(st: ApiState, p: auth.Principal) -> dict[str, User]:
    """The users ``p`` may see, by name."""
    users: list[User] = await st.call(st.engine.registry.users)
    return {u.name: u for u in users if policy.allows(p, policy.READ, old=user_target(u))}


async def user_or_404(st: ApiState, name: str) -> User:
    user: User | None = await st.call(st.engine.registry.get_user, name)
    if user is None:
        raise HTTPException(404, f"no user {name!r}")
    return user


@router.get("/users")
async def get_users(st: State, p: Admin) -> dict[str, Any]:
    users = (await users_in_scope(st, p)).values()
    return {
        "items": [
            {
                "name": u.name,
                "role": u.role,
                "sites": list(u.sites),
                "created_at": u.created_at,
                "disabled": u.disabled,
            }
            for u in users
        ]
    }


@router.post("/users", status_code=201)
async def post_user(st: State, p: Admin, body: UserRequest) -> dict[str, Any]:
    old: User | None = await st.call(st.engine.registry.get_user, body.name)
    policy.check(
        p,
        policy.WRITE,
        old=user_target(old) if old is not None else None,
        new=policy.user_target(body.sites, body.role),
    )
    user = await st.hash_call(auth.make_user, body.name, body.password, body.role, body.sites)
    await st.call(st.engine.registry.put_user, user)
    st.forget(user=user.name)
    return {"name": user.name, "role": user.role, "sites": list(user.sites)}


@router.delete("/users/{name}")
async def delete_user(st: State, p: Admin, name: str) -> dict[str, Any]:
    reg = st.engine.registry
    policy.check(p, policy.WRITE, old=user_target(await user_or_404(st, name)))
    await st.call(reg.delete_user, name)
    st.forget(user=name)
    return {"deleted": name}


@router.get("/sessions")
async def get_sessions(st: State, p: Admin, user: str | None = None) -> dict[str, Any]:
    visible = await users_in_scope(st, p)
    rows = [s for s in await st.call(st.engine.registry.sessions, user) if s.user in visible]
    return {
        "items": [
            {
                "id": s.id,
                "user": s.user,
                "created_at": s.created_at,
                "expires_at": s.expires_at,
                "revoked_at": s.revoked_at,
                "client": s.client,
            }
            for s in rows
        ]
    }


@router.delete("/sessions/{session_id}")
async def delete_session(st: State, p: Admin, session_id: str) -> dict[str, Any]:
    reg = st.engine.registry
    session = await st.call(reg.get_session, session_id)
    if session is None:
        raise HTTPException(404, f"no session {session_id!r}")
    owner = await st.call(reg.get_user, session.user)
    # a session of a user gone: only an unscoped admin reaches it
    target = user_target(owner) if owner is not None else policy.Target("Session", None)
    policy.check(p, policy.WRITE, old=policy.Target("Session", target.sites))
    await st.call(reg.revoke_session, session_id, time.time())
    st.forget(session=session_id)
    return {"revoked": session_id}


@router.get("/audit")
async def get_audit(
    st: State, p: Admin, actor: str | None = None, limit: Limit = 100
) -> dict[str, Any]:
    reg = st.engine.registry
    if policy.allows(p, policy.READ, old=policy.Target("Audit", None)):  # the whole log
        rows = await st.call(reg.audit_log, actor=actor, limit=limit)
    else:  # the entries of the users in scope (and of nobody else, anonymous included)
        visible = await users_in_scope(st, p)
        actors = [actor] if actor is not None else sorted(visible)
        rows = []
        for a in actors:
            if a in visible:
                rows += await st.call(reg.audit_log, actor=a, limit=limit)
        rows = sorted(rows, key=lambda e: (e.timestamp, e.id), reverse=True)[:limit]
    return {
        "items": [
            {
                "id": a.id,
                "timestamp": a.timestamp,
                "actor": a.actor,
                "action": a.action,
                "target": a.target,
                "result": a.result,
                "detail": dict(a.detail),
            }
            for a in rows
        ]
    }
