"""The authorization policy through the real HTTP API: each finding of the audit (issue 11 §3)
reproduced and refused, scenes decided the same way by their routes and by /apply, scoped
admins kept inside their sites, and a table of role x scope x verb x site over real routes.

Users (tests/api/conftest.py): admin, oper, viewer (unscoped); oper_a, admin_a (plant-a);
oper_b (plant-b). Devices t1, t2 are in plant-a, b1 in plant-b."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from control.test_webhooks import Peer
from runtime.helpers import sim_device

from twin.api import auth
from twin.control.webhooks import WebhookPolicy
from twin.spec import load_site

from .conftest import PASSWORD, Api, start_api

DEMO = Path(__file__).resolve().parents[2] / "sites" / "demo"


def scene(name: str, site: str, device: str = "t1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Scene",
        "metadata": {"name": name, "site": site},
        "spec": {
            "triggers": [{"type": "manual"}],
            "actions": [
                {"type": "set_desired", "device": device, "property": "sampling_rate", "value": 7}
            ],
            **spec,
        },
    }


async def execute(c: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """Run a scene by hand and wait for its trace (the control service loads a new scene within
    its reload interval: 404 until then)."""
    with trio.fail_after(30):
        while True:
            r = await c.post(f"/api/v1/scenes/{name}/execute?wait=true")
            if r.status_code != 404:
                assert r.status_code == 202, r.text
                trace: dict[str, Any] = r.json()["trace"]
                return trace
            await trio.sleep(0.1)


async def test_scoped_operator_cannot_move_another_sites_device_in_through_apply(
    api: Api,
) -> None:
    b1 = api.engine.device_doc("b1")
    assert b1 is not None
    moved = copy.deepcopy(dict(b1))
    moved["metadata"]["site"] = "plant-a"
    async with api.client("oper_a") as c:
        r = await c.post("/api/v1/apply", json={"documents": [moved]})
        assert r.status_code == 403, r.text
        assert "Device b1" in r.json()["detail"] and "plant-b" in r.json()["detail"]
        # nor out of its own site into another one
        t1 = copy.deepcopy(dict(api.engine.device_doc("t1") or {}))
        t1["metadata"]["site"] = "plant-b"
        t1["metadata"].pop("group", None)  # its group is plant-a's
        r = await c.post("/api/v1/apply", json={"documents": [t1]})
        assert r.status_code == 403, r.text
        r = await c.put("/api/v1/devices/t1", json=t1)
        assert r.status_code == 403, r.text
    assert (api.engine.device_doc("b1") or {})["metadata"]["site"] == "plant-b"
    assert (api.engine.device_doc("t1") or {})["metadata"]["site"] == "plant-a"
    # an unscoped operator holds both sites: the move is allowed
    async with api.client("oper") as c:
        r = await c.post("/api/v1/apply", json={"documents": [moved]})
        assert r.status_code == 200 and r.json()["updated"] == 1, r.text


async def test_scoped_admin_cannot_take_over_another_sites_scene(api: Api) -> None:
    async with api.client("admin") as c:
        r = await c.post("/api/v1/scenes", json=scene("b-scene", "plant-b", device="b1"))
        assert r.status_code == 201, r.text
    taken = scene("b-scene", "plant-a")
    async with api.client("admin_a") as c:
        r = await c.put("/api/v1/scenes/b-scene", json=taken)
        assert r.status_code == 403, r.text
        r = await c.post("/api/v1/apply", json={"documents": [taken]})
        assert r.status_code == 403, r.text
        r = await c.delete("/api/v1/scenes/b-scene")
        assert r.status_code == 403, r.text
    stored = api.engine.specs[("Scene", "b-scene")]
    assert stored["metadata"]["site"] == "plant-b"


async def test_scenes_are_decided_the_same_by_their_routes_and_by_apply(api: Api) -> None:
    for user, site, expected in [
        ("viewer", "plant-a", 403),
        ("oper_a", "plant-b", 403),
        ("oper_b", "plant-a", 403),
        ("oper_a", "plant-a", None),  # operators write scenes of their sites
    ]:
        async with api.client(user) as c:
            doc = scene(f"s-{user}-{site}", site, device="t1" if site == "plant-a" else "b1")
            via_route = await c.post("/api/v1/scenes", json=doc)
            doc2 = scene(f"a-{user}-{site}", site, device="t1" if site == "plant-a" else "b1")
            via_apply = await c.post("/api/v1/apply", json={"documents": [doc2]})
            if expected is None:
                assert via_route.status_code == 201, via_route.text
                assert via_apply.status_code == 200, via_apply.text
            else:
                assert (via_route.status_code, via_apply.status_code) == (403, 403), (
                    user,
                    site,
                    via_route.text,
                    via_apply.text,
                )


async def test_scene_actions_stay_in_their_site_unless_an_admin_allows_more(api: Api) -> None:
    cross = scene("cross", "plant-a", device="b1")
    async with api.client("admin") as c:
        r = await c.post("/api/v1/apply", json={"documents": [cross]})
        assert r.status_code == 422, r.text
        assert any("outside the scene's site plant-a" in p for p in r.json()["problems"]), r.text
    reaching = scene("cross", "plant-a", device="b1", reach=["plant-b"])
    for user in ("oper", "oper_a", "admin_a"):  # an operator, or an admin of plant-a only
        async with api.client(user) as c:
            r = await c.post("/api/v1/scenes", json=reaching)
            assert r.status_code == 403, (user, r.text)
    async with api.client("admin") as c:
        r = await c.post("/api/v1/scenes", json=reaching)
        assert r.status_code == 201, r.text
        trace = await execute(c, "cross")
        assert trace is not None and trace["status"] == "success", trace
    # a scoped operator of plant-a may no longer change the scene that reaches plant-b
    async with api.client("oper_a") as c:
        r = await c.put("/api/v1/scenes/cross", json=scene("cross", "plant-a"))
        assert r.status_code == 403, r.text


async def test_scoped_admin_stays_inside_its_sites(api: Api) -> None:
    async with api.client("admin") as c:
        r = await c.post(
            "/api/v1/users",
            json={"name": "bob_b", "password": PASSWORD, "role": "operator", "sites": ["plant-b"]},
        )
        assert r.status_code == 201, r.text
    # sessions of a plant-a and a plant-b user; audit entries by both
    async with api.client(None) as anon:
        for user in ("oper_a", "oper_b"):
            r = await anon.post(
                "/api/v1/auth/login", json={"username": user, "password": PASSWORD}
            )
            assert r.status_code == 200, r.text
    async with api.client("oper_b") as c:
        assert (await c.post("/api/v1/devices/b1/maintenance", json={"on": True})).is_success
    async with api.client("oper_a") as c:
        assert (await c.post("/api/v1/devices/t1/maintenance", json={"on": True})).is_success
    await api.engine.writer.flushed()
    async with api.client("admin_a") as c:
        # no unscoped user, no user of other sites, no role above its own
        for body in (
            {"name": "root2", "password": PASSWORD, "role": "admin"},
            {"name": "x_b", "password": PASSWORD, "role": "viewer", "sites": ["plant-b"]},
            {"name": "x_ab", "password": PASSWORD, "role": "viewer", "sites": ["plant-a", "plant-b"]},
            {"name": "oper_b", "password": PASSWORD, "role": "viewer", "sites": ["plant-a"]},
        ):
            r = await c.post("/api/v1/users", json=body)
            assert r.status_code == 403, (body, r.text)
        r = await c.post(
            "/api/v1/users",
            json={"name": "carol_a", "password": PASSWORD, "role": "admin", "sites": ["plant-a"]},
        )
        assert r.status_code == 201, r.text
        assert (await c.delete("/api/v1/users/bob_b")).status_code == 403
        assert (await c.delete("/api/v1/users/admin")).status_code == 403
        # device keys of other sites: neither listed, created nor revoked
        assert (await c.get("/api/v1/devices/b1/keys")).status_code == 403
        assert (await c.post("/api/v1/devices/b1/keys")).status_code == 403
        assert (await c.delete("/api/v1/devices/b1/keys/k")).status_code == 403
        assert (await c.get("/api/v1/devices/t1/keys")).status_code == 200
        # users, sessions, audit: only those of plant-a users
        users = {u["name"] for u in (await c.get("/api/v1/users")).json()["items"]}
        assert users == {"oper_a", "admin_a", "carol_a"}
        sessions = (await c.get("/api/v1/sessions")).json()["items"]
        assert {s["user"] for s in sessions} == {"oper_a"}
        r = await c.get("/api/v1/sessions", params={"user": "oper_b"})
        assert r.json()["items"] == []
        audit = (await c.get("/api/v1/audit")).json()["items"]
        actors = {a["actor"] for a in audit}
        assert "oper_a" in actors and actors <= {"oper_a", "admin_a", "carol_a"}, actors
        assert (await c.get("/api/v1/audit", params={"actor": "oper_b"})).json()["items"] == []
    async with api.client("admin") as c:  # the unscoped admin sees everything
        audit = (await c.get("/api/v1/audit")).json()["items"]
        assert {"oper_a", "oper_b", "admin"} <= {a["actor"] for a in audit}
        assert len((await c.get("/api/v1/users")).json()["items"]) >= 8
        sessions = (await c.get("/api/v1/sessions")).json()["items"]
        other = next(s for s in sessions if s["user"] == "oper_b")
    async with api.client("admin_a") as c:
        r = await c.delete(f"/api/v1/sessions/{other['id']}")
        assert r.status_code == 403, r.text


async def test_scene_webhook_reaches_only_allowed_hosts(api: Api) -> None:
    """The SSRF of the audit: a scene's webhook made the engine POST to any host. Now nothing
    is allowed unless configured (TWIN_WEBHOOK_ALLOW / twin up --webhook-allow)."""
    peer = Peer()
    try:
        hook = scene("hook", "plant-a")
        hook["spec"]["actions"] = [
            {"type": "webhook", "url": f"http://127.0.0.1:{peer.port}/internal", "body": {"x": 1}}
        ]
        async with api.client("oper_a") as c:
            assert (await c.post("/api/v1/scenes", json=hook)).status_code == 201
            trace = await execute(c, "hook")
            assert trace["status"] == "failed", trace
            assert "not allowed" in json.dumps(trace["steps"]), trace
            assert peer.requests == []
            control = api.engine.service_info["control"]
            control.webhooks = WebhookPolicy.parse("127.0.0.1/32")  # an admin lists it
            trace = await execute(c, "hook")
            assert trace["status"] == "success", trace
            assert [(m, path, body) for m, path, _, body in peer.requests] == [
                ("POST", "/internal", {"x": 1})
            ]
    finally:
        peer.close()


# role x scope x verb x site over real routes: (method, path, body, verb)
ROUTES: list[tuple[str, str, Any, str]] = [
    ("GET", "/api/v1/devices/{d}", None, "read"),
    ("GET", "/api/v1/devices/{d}/status", None, "read"),
    ("POST", "/api/v1/devices/{d}/maintenance", {"on": False}, "operate"),
    ("PATCH", "/api/v1/devices/{d}/twin/desired", {"sampling_rate": 3}, "operate"),
    ("DELETE", "/api/v1/devices/{d}/keys/nope", None, "admin"),
    ("GET", "/api/v1/devices/{d}/keys", None, "admin"),
]
RANK = {"viewer": 0, "operator": 1, "admin": 2}
NEEDS = {"read": "viewer", "operate": "operator", "admin": "admin"}
WHO = {  # user -> (role, sites)
    "viewer": ("viewer", None),
    "oper": ("operator", None),
    "admin": ("admin", None),
    "oper_a": ("operator", {"plant-a"}),
    "admin_a": ("admin", {"plant-a"}),
}


@pytest.mark.parametrize("user", sorted(WHO))
async def test_route_table(api: Api, user: str) -> None:
    role, sites = WHO[user]
    async with api.client(user) as c:
        for method, path, body, verb in ROUTES:
            for device, site in (("t1", "plant-a"), ("b1", "plant-b")):
                url = path.format(d=device)
                kw = {"json": body} if body is not None else {}
                r = await c.request(method, url, **kw)
                allowed = RANK[role] >= RANK[NEEDS[verb]] and (sites is None or site in sites)
                if allowed:
                    assert r.status_code != 403, (user, method, url, r.text)
                    assert r.status_code < 500, (user, method, url, r.text)
                else:
                    assert r.status_code == 403, (user, method, url, r.status_code, r.text)
    # a new device: in its own site only; moving between sites needs both
    async with api.client(user) as c:
        for name, site in (("n_a", "plant-a"), ("n_b", "plant-b")):
            r = await c.post("/api/v1/devices", json=sim_device(f"{name}_{user}", site_=site))
            allowed = RANK[role] >= 1 and (sites is None or site in sites)
            assert r.status_code == (201 if allowed else 403), (user, name, r.text)


async def test_readme_operator_applies_the_demo_through_the_api(tmp_path: Path) -> None:
    """Issue 12 item 2, the README's sequence: `twin up sites/demo`, then `twin user add alice
    --role operator --site plant-a`, `TWIN_TOKEN=$(twin token create alice)`, `twin apply
    sites/demo --server $TWIN_SERVER` (was: HTTP 403 "not allowed for site None", the shared
    DeviceModels). Only what the plan changes is judged: re-applying succeeds; alice may change
    a plant-a device; changing a shared DeviceModel needs an unscoped user."""
    loaded = load_site([DEMO])
    async with trio.open_nursery() as nursery:
        api = await start_api(nursery, tmp_path / "state", docs=list(loaded.specs.values()))
        try:
            alice = auth.make_user("alice", PASSWORD, "operator", ["plant-a"])
            api.registry.put_user(alice)
            token = auth.issue_access_token(auth.load_secret(api.state_dir), alice)
            env = {**os.environ, "TWIN_TOKEN": token, "TWIN_SERVER": api.url}
            env["TWIN_STATE_DIR"] = str(tmp_path / "cli-state")

            def twin(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [sys.executable, "-m", "twin.cli", *args],
                    env=env,
                    cwd=tmp_path,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )

            proc = await trio.to_thread.run_sync(twin, "apply", str(DEMO), "-o", "json")
            assert proc.returncode == 0, proc.stderr + proc.stdout
            assert json.loads(proc.stdout)["changed"] is False
            # alice edits a plant-a device in her copy of the folder, and a shared model
            mine = tmp_path / "demo"
            shutil.copytree(DEMO, mine)
            devices = mine / "devices.yaml"
            text = devices.read_text()
            assert "site: plant-a" in text
            devices.write_text(text.replace("tags: [", "tags: [alice-was-here, ", 1))
            proc = await trio.to_thread.run_sync(twin, "apply", str(mine), "-o", "json")
            assert proc.returncode == 0, proc.stderr + proc.stdout
            assert json.loads(proc.stdout)["updated"] == 1
            models = mine / "models.yaml"
            models.write_text(models.read_text().replace("description: ", "description: x", 1))
            proc = await trio.to_thread.run_sync(twin, "apply", str(mine), "-o", "json")
            assert proc.returncode != 0
            assert "HTTP 403" in proc.stderr + proc.stdout and "DeviceModel" in (
                proc.stderr + proc.stdout
            )
        finally:
            nursery.cancel_scope.cancel()
            api.registry.close()
