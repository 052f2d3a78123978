"""``/api/v1/users``, ``/api/v1/sessions``, ``/api/v1/audit``: user accounts, login sessions
and the audit log of every mutating call (admins)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from twin.api import auth
from twin.api.deps import PREFIX, Admin, Limit, State

router = APIRouter(prefix=PREFIX, tags=["admin"])


class UserRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,100}$")
    password: str = Field(min_length=8, max_length=1000)
    role: str = Field(pattern="^(viewer|operator|admin)$")
    sites: list[str] = []


@router.get("/users")
async def get_users(st: State, p: Admin) -> dict[str, Any]:
    users = await st.call(st.engine.registry.users)
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
    user = await st.hash_call(auth.make_user, body.name, body.password, body.role, body.sites)
    await st.call(st.engine.registry.put_user, user)
    st.forget(user=user.name)
    return {"name": user.name, "role": user.role, "sites": list(user.sites)}


@router.delete("/users/{name}")
async def delete_user(st: State, p: Admin, name: str) -> dict[str, Any]:
    reg = st.engine.registry
    if await st.call(reg.get_user, name) is None:
        raise HTTPException(404, f"no user {name!r}")
    await st.call(reg.delete_user, name)
    st.forget(user=name)
    return {"deleted": name}


@router.get("/sessions")
async def get_sessions(st: State, p: Admin, user: str | None = None) -> dict[str, Any]:
    rows = await st.call(st.engine.registry.sessions, user)
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
    if await st.call(reg.get_session, session_id) is None:
        raise HTTPException(404, f"no session {session_id!r}")
    await st.call(reg.revoke_session, session_id, time.time())
    st.forget(session=session_id)
    return {"revoked": session_id}


@router.get("/audit")
async def get_audit(
    st: State, p: Admin, actor: str | None = None, limit: Limit = 100
) -> dict[str, Any]:
    rows = await st.call(st.engine.registry.audit_log, actor=actor, limit=limit)
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
