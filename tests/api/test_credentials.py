"""Credential lifecycles through the real HTTP API: long-lived tokens revoked (logout, by id,
all of a user's at once), users disabled and re-created, login throttling and the aggregation
of failed logins in the audit log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from runtime.helpers import eventually, sim_device

from twin.api import auth

from .conftest import PASSWORD, Api, loose_settings, serving


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_state(api: Api) -> Any:
    return api.engine.service_info["api"]["app"].state


def cli_token(api: Api, user: str) -> tuple[str, str]:
    """What `twin token create USER` does: (record id, token)."""
    u = api.registry.get_user(user)
    assert u is not None
    rec, token = auth.create_api_token(
        api.registry, auth.load_secret(api.state_dir), u, ttl=30 * 86400.0
    )
    return rec.id, token


async def status(c: httpx.AsyncClient, token: str) -> int:
    return (await c.get("/api/v1/devices", headers=bearer(token))).status_code


async def login(c: httpx.AsyncClient, user: str, password: str = PASSWORD) -> httpx.Response:
    return await c.post("/api/v1/auth/login", json={"username": user, "password": password})


async def test_logout_with_a_long_lived_token_revokes_it(api: Api) -> None:
    tid, token = cli_token(api, "oper")
    async with api.client(None) as c:
        assert await status(c, token) == 200
        r = await c.post("/api/v1/auth/logout", headers=bearer(token))
        assert r.status_code == 200 and r.json()["revoked"] == tid, r.text
        assert await status(c, token) == 401
    rec = api.registry.get_api_token(tid)
    assert rec is not None and rec.revoked_at is not None


async def test_tokens_listed_and_revoked_by_id(api: Api) -> None:
    tid, token = cli_token(api, "viewer")
    async with api.client("admin") as admin:
        items = (await admin.get("/api/v1/tokens", params={"user": "viewer"})).json()["items"]
        assert [t["id"] for t in items] == [tid] and items[0]["revoked_at"] is None
        assert (await admin.delete(f"/api/v1/tokens/{tid}")).status_code == 200
        assert (await admin.delete("/api/v1/tokens/nope")).status_code == 404
        assert await status(admin, token) == 401
    async with api.client("oper") as oper:
        assert (await oper.get("/api/v1/tokens")).status_code == 403


async def test_revoke_every_token_of_a_user(api: Api) -> None:
    _, long_lived = cli_token(api, "oper")
    async with api.client(None) as c:
        r = await login(c, "oper")
        assert r.status_code == 200
        access, refresh = r.json()["access_token"], r.json()["refresh_token"]
        assert await status(c, access) == 200 and await status(c, long_lived) == 200
    async with api.client("admin") as admin:
        r = await admin.post("/api/v1/users/oper/revoke-tokens")
        assert r.status_code == 200 and r.json()["generation"] == 2
        assert (await admin.post("/api/v1/users/ghost/revoke-tokens")).status_code == 404
    async with api.client(None) as c:
        assert await status(c, access) == 401
        assert await status(c, long_lived) == 401
        assert await status(c, api.tokens["oper"]) == 401  # issued before too
        r = await c.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
        assert r.status_code == 401
        r = await login(c, "oper")  # the password still works: a fresh start
        assert r.status_code == 200 and await status(c, r.json()["access_token"]) == 200


async def test_a_deleted_user_recreated_does_not_revive_old_tokens(api: Api) -> None:
    _, long_lived = cli_token(api, "viewer")
    old = api.tokens["viewer"]
    async with api.client("admin") as admin:
        assert (await admin.delete("/api/v1/users/viewer")).status_code == 200
        r = await admin.post(
            "/api/v1/users", json={"name": "viewer", "password": PASSWORD, "role": "viewer"}
        )
        assert r.status_code == 201
    async with api.client(None) as c:
        assert await status(c, old) == 401
        assert await status(c, long_lived) == 401
        assert (await login(c, "viewer")).status_code == 200


async def test_disable_and_enable_a_user(api: Api) -> None:
    token = api.tokens["oper"]
    async with api.client("admin") as admin:
        assert (await admin.post("/api/v1/users/oper/disable")).status_code == 200
        assert await status(admin, token) == 401
        assert (await login(admin, "oper")).status_code == 401
        items = (await admin.get("/api/v1/users")).json()["items"]
        assert {u["name"]: u["disabled"] for u in items}["oper"] is True
        assert (await admin.post("/api/v1/users/oper/enable")).status_code == 200
        assert await status(admin, token) == 200
        assert (await admin.post("/api/v1/users/ghost/disable")).status_code == 404


async def test_a_scoped_admin_manages_only_the_credentials_inside_its_sites(api: Api) -> None:
    api.registry.put_user(auth.make_user("admin_b", PASSWORD, "admin", ("plant-b",)))
    admin_b = api.registry.get_user("admin_b")
    assert admin_b is not None
    token_b = auth.issue_access_token(auth.load_secret(api.state_dir), admin_b)
    tid, _ = cli_token(api, "oper")  # an unscoped operator's token
    tid_b, _ = cli_token(api, "oper_b")  # a plant-b operator's token
    api.tokens["admin_b"] = token_b
    async with api.client("admin_b") as c:
        for path in ("/api/v1/users/admin/disable", "/api/v1/users/oper/revoke-tokens"):
            assert (await c.post(path)).status_code == 403, path
        assert (await c.delete(f"/api/v1/tokens/{tid}")).status_code == 403
        assert [t["id"] for t in (await c.get("/api/v1/tokens")).json()["items"]] == [tid_b]
        assert (await c.post("/api/v1/users/oper_b/revoke-tokens")).status_code == 200
        assert (await c.post("/api/v1/users/oper_b/disable")).status_code == 200
    assert api.registry.get_user("oper_b").disabled  # type: ignore[union-attr]
    assert not api.registry.get_user("admin").disabled  # type: ignore[union-attr]


async def test_a_token_without_user_id_is_refused(api: Api) -> None:
    import jwt

    claims = {"sub": "admin", "role": "admin", "typ": "access", "exp": 2**40}
    old = jwt.encode(claims, auth.load_secret(api.state_dir), algorithm="HS256")
    async with api.client(None) as c:
        assert await status(c, old) == 401


async def test_a_device_re_created_under_a_deleted_ones_name_refuses_the_old_key(
    api: Api,
) -> None:
    url = "/api/v1/ingest/push1"
    doc = sim_device("push1", binding={"http": {}}, heartbeat={"interval": "5s", "timeout": "60s"})
    async with api.client("admin") as admin:
        r = await admin.post("/api/v1/devices/push1/keys")
        assert r.status_code == 201
        old = {"X-Device-Key": r.json()["key"]}
        await eventually(lambda: api.engine.hub.running("push1"))
        reading = {"values": {"temperature": 1}}
        assert (await admin.post(url, json=reading, headers=old)).status_code == 200
        assert (await admin.delete("/api/v1/devices/push1")).status_code == 200
        assert (await admin.post("/api/v1/devices", json=doc)).status_code == 201, doc
        await eventually(lambda: api.engine.hub.running("push1"))
        r = await admin.post(url, json=reading, headers=old)
        assert r.status_code == 401, r.text
        keys = (await admin.get("/api/v1/devices/push1/keys")).json()["items"]
        assert keys and all(k["revoked_at"] is not None for k in keys)
        r = await admin.post("/api/v1/devices/push1/keys")
        new = {"X-Device-Key": r.json()["key"]}
        assert (await admin.post(url, json=reading, headers=new)).status_code == 200


async def test_an_open_websocket_closes_when_its_token_is_revoked(api: Api) -> None:
    from trio_websocket import ConnectionClosed, open_websocket_url

    _, token = cli_token(api, "viewer")
    ws_url = api.engine.service_info["api"]["ws"]
    async with open_websocket_url(f"{ws_url}?token={token}") as ws:
        assert json.loads(await ws.get_message())["kind"] == "hello"
        async with api.client("admin") as admin:
            assert (await admin.post("/api/v1/users/viewer/revoke-tokens")).status_code == 200
        with trio.fail_after(60):  # a bound for the test to fail, not the promise (10 s)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()  # the sim devices' readings, until closed
        assert closed.value.reason.code == 1008, closed.value.reason


# -- throttling --------------------------------------------------------------------------------
@pytest.fixture
async def strict_api(tmp_path: Path) -> AsyncIterator[Api]:
    settings = loose_settings(
        tmp_path / "state",
        login_free_per_user=3,
        login_free_per_address=8,
        login_audit_window=3600.0,
    )
    async with serving(tmp_path / "state", settings) as a:
        yield a


async def test_failed_logins_are_throttled_per_user(strict_api: Api) -> None:
    async with strict_api.client(None) as c:
        codes = [(await login(c, "oper", "wrong")).status_code for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429], codes
        r = await login(c, "oper")  # the right password too, while locked out
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert (await login(c, "viewer")).status_code == 200  # other users are not locked


async def test_unknown_users_are_throttled_like_known_ones(strict_api: Api) -> None:
    async with strict_api.client(None) as c:
        codes = [(await login(c, "nobody", "wrong")).status_code for _ in range(4)]
        assert codes == [401, 401, 401, 429], codes


async def test_a_flood_runs_argon2_only_for_the_free_attempts(strict_api: Api) -> None:
    """300 concurrent wrong passwords from one address over many names: only the address's 8
    free attempts reach argon2, plus one each time a lock-out (1 s, doubling) ends while the
    flood goes on (at most 11 more for any flood shorter than 2^11 s); the rest is 429 with
    Retry-After."""
    codes: list[int] = []
    async with strict_api.client(None) as c:

        async def attempt(i: int) -> None:
            r = await login(c, f"user{i % 50}", "wrong")
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
            codes.append(r.status_code)

        async with trio.open_nursery() as n:
            for i in range(300):
                n.start_soon(attempt, i)
    assert len(codes) == 300 and set(codes) <= {401, 429}
    assert codes.count(401) <= 8 + 11, codes.count(401)
    # the engine still answers other requests
    async with strict_api.client("viewer") as c:
        assert (await c.get("/api/v1/devices")).status_code == 200


async def test_failed_logins_are_one_audit_row_per_user_and_window(strict_api: Api) -> None:
    async with strict_api.client(None) as c:
        for _ in range(6):
            await login(c, "oper", "wrong")  # 3 x 401, then 3 x 429
        assert (await login(c, "viewer")).status_code == 200
    st = api_state(strict_api)
    st.flush_login_audit(all=True)  # what the window's end (or shutdown) does
    await strict_api.engine.writer.flushed()
    rows = strict_api.registry.audit_log(actor="oper")
    assert len(rows) == 1, rows
    assert rows[0].detail["failures"] == 3 and rows[0].detail["by_status"] == {"401": 3}
    assert rows[0].detail["address"] == "127.0.0.1"
    # refused attempts: one row per address, whatever the names tried
    (refused,) = strict_api.registry.audit_log(actor="*")
    assert refused.detail["by_status"] == {"429": 3} and refused.detail["users"] == {"oper": 3}
    # a successful login is still a row of its own
    assert [r.result for r in strict_api.registry.audit_log(actor="viewer")] == ["200"]
