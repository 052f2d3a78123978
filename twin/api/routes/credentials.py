"""Credential lifecycles (admins): long-lived API tokens (``/api/v1/tokens``: list, revoke),
and a user's credentials as a whole (``/api/v1/users/{name}/disable``, ``/enable``,
``/revoke-tokens``).

- Disabling a user refuses its logins, its tokens and its MQTT connections (open ones are
  closed within 10 s) until it is enabled again; its tokens are not revoked by it.
- ``revoke-tokens`` bumps the user's generation: every access token issued before (login or
  ``twin token create``) stops working, its sessions and API-token records are revoked, its
  MQTT connections are closed. The user keeps its password and logs in again.
Changes made here hold at once in this API; ones made by the CLI within ``user_cache_ttl``.

Who may: the policy's rule for users (:mod:`twin.policy`, as in ``admin``): a scoped admin
manages only the users, and so the tokens, inside its sites.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException

from twin import policy
from twin.api.deps import PREFIX, Admin, State
from twin.api.routes.admin import user_or_404, user_target, users_in_scope
from twin.registry.base import ApiToken

router = APIRouter(prefix=PREFIX, tags=["admin"])


def token_json(t: ApiToken) -> dict[str, Any]:
    return {
        "id": t.id,
        "user": t.user,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "revoked_at": t.revoked_at,
        "note": t.note,
    }


@router.get("/tokens")
async def get_tokens(st: State, p: Admin, user: str | None = None) -> dict[str, Any]:
    visible = await users_in_scope(st, p)
    rows = await st.call(st.engine.registry.api_tokens, user)
    return {"items": [token_json(t) for t in rows if t.user in visible]}


@router.delete("/tokens/{token_id}")
async def revoke_token(st: State, p: Admin, token_id: str) -> dict[str, Any]:
    reg = st.engine.registry
    token = await st.call(reg.get_api_token, token_id)
    if token is None:
        raise HTTPException(404, f"no token {token_id!r}")
    policy.check(p, policy.WRITE, old=user_target(await user_or_404(st, token.user)))
    await st.call(reg.revoke_api_token, token_id, time.time())
    st.forget(token=token_id)
    return {"revoked": token_id}


async def _set_disabled(st: Any, p: Any, name: str, disabled: bool) -> dict[str, Any]:
    policy.check(p, policy.WRITE, old=user_target(await user_or_404(st, name)))
    if not await st.call(st.engine.registry.set_user_disabled, name, disabled):
        raise HTTPException(404, f"no user {name!r}")
    st.forget(user=name)
    return {"name": name, "disabled": disabled}


@router.post("/users/{name}/disable")
async def disable_user(st: State, p: Admin, name: str) -> dict[str, Any]:
    return await _set_disabled(st, p, name, True)


@router.post("/users/{name}/enable")
async def enable_user(st: State, p: Admin, name: str) -> dict[str, Any]:
    return await _set_disabled(st, p, name, False)


@router.post("/users/{name}/revoke-tokens")
async def revoke_user_tokens(st: State, p: Admin, name: str) -> dict[str, Any]:
    policy.check(p, policy.WRITE, old=user_target(await user_or_404(st, name)))
    generation = await st.call(st.engine.registry.revoke_user_credentials, name, time.time())
    if generation is None:
        raise HTTPException(404, f"no user {name!r}")
    st.forget(user=name)
    return {"name": name, "generation": generation}
