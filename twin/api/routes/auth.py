"""``/api/v1/auth``: log in (user name + password → access and refresh tokens), refresh an
access token, log out (revokes the session, or the long-lived token used).

Logins are throttled per user name and per address (:mod:`twin.api.throttle`: 429 with
``Retry-After`` before any argon2 work); argon2 runs in a worker thread, against a dummy hash
for an unknown user, so the answer and its timing say nothing about which names exist."""

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
    client = request.client.host if request.client else ""
    wait = st.logins.begin(body.username, client)
    if wait:
        raise HTTPException(
            429,
            "too many failed logins: try again later",
            headers={"Retry-After": st.logins.retry_after(wait)},
        )
    ok = False
    try:
        user = await st.call(reg.get_user, body.username)
        ok = bool(await st.hash_call(auth.verify_login, user, body.password))
    finally:
        st.logins.end(body.username, client, ok)
    if not ok or user is None:
        raise HTTPException(401, "wrong user name or password")
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
    """Revoke what the bearer token stands on: its login session (and so the refresh token),
    or, for a token from ``twin token create``, that token."""
    if p.session:
        await st.call(st.engine.registry.revoke_session, p.session, time.time())
        st.forget(session=p.session)
        return {"revoked": p.session, "kind": "session"}
    if p.api_token:
        await st.call(st.engine.registry.revoke_api_token, p.api_token, time.time())
        st.forget(token=p.api_token)
        return {"revoked": p.api_token, "kind": "token"}
    raise HTTPException(400, "this token has no session or record to revoke")
