"""``/api/v1/auth``: log in (user name + password → access and refresh tokens), refresh an
access token, log out (revokes the session)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from twin.api import auth
from twin.api.deps import PREFIX, State, Viewer
from twin.errors import AuthError

router = APIRouter(prefix=PREFIX, tags=["auth"])


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1000)


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=500)


@router.post("/auth/login")
async def login(request: Request, st: State, body: LoginRequest) -> dict[str, Any]:
    request.scope["state"]["actor"] = body.username
    reg = st.engine.registry
    user = await st.call(reg.get_user, body.username)
    ok = (
        user is not None
        and not user.disabled
        and await st.hash_call(auth.verify_secret, user.password_hash, body.password)
    )
    if not ok or user is None:
        raise HTTPException(401, "wrong user name or password")
    client = request.client.host if request.client else ""
    refresh = await st.call(
        auth.create_session, reg, user, client=client, ttl=st.settings.refresh_ttl
    )
    sid = refresh.partition(".")[0]
    token = auth.issue_access_token(st.secret, user, ttl=st.settings.access_ttl, session=sid)
    return {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": int(st.settings.access_ttl),
        "refresh_token": refresh,
        "role": user.role,
        "sites": list(user.sites),
    }


@router.post("/auth/refresh")
async def refresh(request: Request, st: State, body: RefreshRequest) -> dict[str, Any]:
    try:
        session, user = await st.call(auth.check_refresh, st.engine.registry, body.refresh_token)
    except AuthError as exc:
        raise HTTPException(401, str(exc)) from None
    request.scope["state"]["actor"] = user.name
    token = auth.issue_access_token(st.secret, user, ttl=st.settings.access_ttl, session=session.id)
    return {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": int(st.settings.access_ttl),
    }


@router.post("/auth/logout")
async def logout(st: State, p: Viewer) -> dict[str, Any]:
    if p.session:
        await st.call(st.engine.registry.revoke_session, p.session, time.time())
        st.forget(session=p.session)
    return {"revoked": p.session}
